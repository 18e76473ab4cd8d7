"""The promotion gate: a new policy version reaches practice only if it is not worse than the one it replaces.

After every update (or every ``every``-th: the candidates between go to practice untested) the candidate is run on
the gate's held-out seeds (ground truth in simulation) and compared, seed by seed, with the version last promoted,
which ran the same seeds with the same sampling noise. Pairing removes the layouts' own difficulty from the
comparison, so a few hundred seeds resolve differences that unpaired rates would not.

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
from typing import TYPE_CHECKING, Any

import numpy as np

from flywheel.audit import audit
from flywheel.contracts import Learner, PolicySnapshot, Rollouts, SuccessDetector
from flywheel.evaluation import evaluate, score_held_out

if TYPE_CHECKING:  # the state holds gate decisions: only its type is needed here
    from flywheel.state import LoopState


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


def judge_outcomes(candidate: np.ndarray, deployed: np.ndarray, *, confidence: float = 0.95, margin: float = 0.0,
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


@dataclasses.dataclass
class GateSettings:
    """The promotion gate: ``seeds`` held out from training and from the reported evaluation.

    Judged by the detector (a robot), the candidate's gate episodes are also audited: up to ``audit`` of those with
    a trusted verdict (a person's on a robot, the simulator's here) are checked against the detector's, and a gap
    beyond ``bound`` (95%, as flywheel/audit.py) holds the candidate back, however the detector rates it: its
    approval of this policy cannot be trusted."""

    seeds: list[int]
    every: int = 1  # updates between tests
    confidence: float = 0.95
    margin: float = 0.0
    sample_seed: int = 54321
    audit: int = 64
    bound: float = 0.15


class Gatekeeper:
    """Runs each candidate on the gate's seeds and promotes it, or rolls the learner and the actors back to the
    deployed weights (as a new version). ``judge``: None (the simulator's verdicts) or the detector that labels."""

    def __init__(self, settings: GateSettings, rollouts: Rollouts, learner: Learner):
        self.settings, self.rollouts, self.learner = settings, rollouts, learner

    def start(self, state: LoopState, judge: SuccessDetector | None) -> None:
        """The deployed version's outcomes on the gate's seeds, once, before the first candidate."""
        if state.deployed is None:
            ran = self._run(self.learner.version, judge)
            state.deployed = (self.learner.version, ran.outcomes, self.learner.snapshot().weights)
            state.deployed_judged_by = ran.judged_by

    def due(self, state: LoopState) -> bool:
        """Whether the update the loop just made (its ``state.iteration + 1``-th) is tested; the candidates between
        tests go to practice untested, and a held-back one takes them back with it to the deployed version."""
        return (state.iteration + 1) % self.settings.every == 0

    def needs_rejudging(self, state: LoopState, judge: SuccessDetector | None) -> bool:
        return judge is not None and state.deployed_judged_by != judge.version

    def rejudge(self, state: LoopState, judge: SuccessDetector) -> None:
        """The detector judging the gate was replaced: run the deployed version (which the actors hold between
        gates) on the gate's seeds again, so that candidates are compared with it by the same detector."""
        version, _, weights = state.deployed
        ran = self._run(version, judge)
        state.deployed, state.deployed_judged_by = (version, ran.outcomes, weights), ran.judged_by

    def decide(self, state: LoopState, snapshot: PolicySnapshot, judge: SuccessDetector | None
              ) -> tuple[PolicySnapshot, dict[str, Any]]:
        """The candidate (just published) against the deployed version's outcomes -> (the snapshot the actors hold
        now, metrics)."""
        gate = self.settings
        episodes = self.rollouts.collect(gate.seeds, "eval", sample_seed=gate.sample_seed)
        ran = score_held_out(episodes, gate.seeds, snapshot.version, judge)
        deployed_version, deployed_outcomes, deployed_weights = state.deployed
        decision = judge_outcomes(np.array(ran.outcomes), np.array(deployed_outcomes), confidence=gate.confidence,
                                  margin=gate.margin, iteration=state.iteration + 1,
                                  candidate_version=snapshot.version, deployed_version=deployed_version)
        decision.judged_by = ran.judged_by
        if judge is not None:
            rng = np.random.default_rng([gate.sample_seed, state.iteration])  # the same sample in a resumed run
            checked, _ = audit(episodes, [ep.latest_label("detector") for ep in episodes], gate.audit, gate.bound,
                               rng)
            if checked is not None:
                decision.audit = {"n": checked.n, "claimed": checked.claimed, "audited": checked.audited,
                                  "gap": checked.gap, "gap_se": checked.gap_se, "alarm": checked.alarm}
                decision.promoted = decision.promoted and not checked.alarm
        state.gates.append(decision)
        row = decision.as_metrics()
        if decision.promoted:
            state.deployed = (snapshot.version, ran.outcomes, snapshot.weights)
            state.deployed_judged_by = ran.judged_by
            return snapshot, row
        self.learner.restore(deployed_weights)
        restored = self.learner.snapshot()
        self.rollouts.publish(restored)
        state.rollbacks.append({"iteration": state.iteration + 1, "from_version": snapshot.version,
                                "to_weights_of": deployed_version, "new_version": restored.version,
                                "reason": "gate"})
        state.deployed = (restored.version, deployed_outcomes, deployed_weights)  # the same weights and outcomes
        row["gate/rollback_to"] = deployed_version
        return restored, row

    def _run(self, version: int, judge: SuccessDetector | None):
        return evaluate(self.rollouts, self.settings.seeds, version, sample_seed=self.settings.sample_seed,
                        detector=judge)
