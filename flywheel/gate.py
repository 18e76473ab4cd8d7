"""The promotion gate: a new policy version reaches practice only if it is not worse than the one it replaces.

After every update the candidate is run on the gate's held-out seeds (ground truth in simulation) and compared, seed
by seed, with the version the actors practise with, which ran the same seeds with the same sampling noise. Pairing
removes the layouts' own difficulty from the comparison, so a few hundred seeds resolve differences that unpaired
rates would not.

The rule: the candidate is held back when it is worse with the stated confidence, i.e. when the one-sided upper
``confidence`` bound of (candidate - deployed) success lies below ``-margin``. The run then rolls back: the learner
returns to the deployed weights, which the actors receive again as a new version. A candidate the test cannot tell
from the deployed one goes through: an improving learner moves in small steps, most of them within the noise, and a
gate that demanded proof of each would stop it.

The gate's seeds are held out from training and disjoint from the evaluation seeds that the run reports on, so
that selecting versions on them does not flatter the reported success.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import numpy as np


@dataclasses.dataclass
class GateDecision:
    iteration: int
    candidate: int  # policy versions
    deployed: int
    n: int  # gate seeds, each run by both
    candidate_success: float
    deployed_success: float
    difference: float  # candidate - deployed
    upper: float  # one-sided upper `confidence` bound of the difference
    confidence: float
    margin: float
    promoted: bool
    judged_by: str = "ground_truth"  # whose verdicts the outcomes are: the simulator's, or a detector's version
    # judged by a detector: its verdicts on the candidate's gate episodes checked against trusted ones (n, claimed,
    # audited, gap, gap_se, alarm: flywheel/audit.py); an alarm holds the candidate back whatever the test said
    audit: dict[str, Any] | None = None

    def as_metrics(self, prefix: str = "gate") -> dict[str, Any]:
        out = {f"{prefix}/candidate_success": self.candidate_success, f"{prefix}/deployed_success":
               self.deployed_success, f"{prefix}/difference": self.difference, f"{prefix}/upper": self.upper,
               f"{prefix}/promoted": int(self.promoted), f"{prefix}/deployed_version": self.deployed}
        if self.audit is not None:
            out.update({f"{prefix}/audit_gap": self.audit["gap"], f"{prefix}/audit_alarm": int(self.audit["alarm"])})
        return out


def judge(candidate: np.ndarray, deployed: np.ndarray, *, confidence: float = 0.95, margin: float = 0.0,
          iteration: int = 0, candidate_version: int = -1, deployed_version: int = -1) -> GateDecision:
    """Compare per-seed outcomes (0/1, the same seeds in the same order) of a candidate and the deployed policy."""
    candidate, deployed = np.asarray(candidate, float), np.asarray(deployed, float)
    if candidate.shape != deployed.shape or candidate.size == 0:
        raise ValueError(f"the gate compares outcomes on the same seeds: got {candidate.shape} and {deployed.shape}")
    difference, se = paired_difference(candidate, deployed)
    upper = difference + statistics.NormalDist().inv_cdf(confidence) * se
    return GateDecision(iteration=iteration, candidate=candidate_version, deployed=deployed_version,
                        n=int(candidate.size), candidate_success=float(candidate.mean()),
                        deployed_success=float(deployed.mean()),
                        difference=difference, upper=upper, confidence=confidence, margin=margin,
                        promoted=upper >= -margin)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The mean of per-seed differences a - b (0/1 outcomes on the same seeds, in the same order) and its standard
    error: what the gate judges by, and what bench/rl_comparison.py pairs two runs' final evaluations with."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
