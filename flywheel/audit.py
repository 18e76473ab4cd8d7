"""The audit in the loop: how far the detector's labels can be trusted right now, on the policy it judges now.

Every iteration, a random sample of the freshly labelled episodes is checked against trusted labels
(``Episode.trusted_success``: the simulator's ground truth here; a human's on a robot). The audit reports, for that
policy version:

- claimed success (the share the detector calls successes) against audited success (the share that are);
- audited precision and recall of the detector's labels.

A detector whose false positives the policy learns to exploit shows up first as claimed success running ahead of
audited success: when the two part by more than ``bound`` (with 95% confidence), the audit raises an alarm and the
loop stops trusting the labels (flywheel/loop.py: updates pause, the detector is retrained on the audited episodes,
the iteration is relabelled, and the policy is rolled back if it regressed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flywheel.contracts import Episode, Label

Z_ONE_SIDED_95 = 1.645


@dataclasses.dataclass
class AuditResult:
    policy_version: int
    detector: str
    n: int
    claimed: float  # share of the sample the detector calls successes
    audited: float  # share that truly are
    precision: float | None  # of the detector's "success" labels on the sample
    recall: float | None
    alarm: bool
    gap_se: float = 0.0  # standard error of the gap (paired: per episode, judged minus true)

    @property
    def gap(self) -> float:
        return self.claimed - self.audited

    def as_metrics(self, prefix: str = "audit") -> dict[str, Any]:
        out = {f"{prefix}/claimed_success": self.claimed, f"{prefix}/audited_success": self.audited,
               f"{prefix}/gap": self.gap, f"{prefix}/gap_se": self.gap_se, f"{prefix}/n": self.n,
               f"{prefix}/alarm": int(self.alarm)}
        out.update({f"{prefix}/{k}": v for k, v in (("precision", self.precision), ("recall", self.recall))
                    if v is not None})
        return out


def audit(episodes: list[Episode], labels: list[Label], sample: int, bound: float,
          rng: np.random.Generator) -> tuple[AuditResult | None, list[tuple[Episode, Label]]]:
    """Check ``sample`` of the episodes' detector ``labels`` against trusted labels.

    Returns the result (None if no sampled episode has a trusted label) and, for the record, a trusted label for
    each audited episode (source ``ground_truth`` or ``human``, version ``audit``), to be appended to the store:
    these are also what a retrained detector learns from."""
    candidates = [i for i, ep in enumerate(episodes) if ep.trusted_success() is not None]
    if not candidates or sample <= 0:
        return None, []
    chosen = rng.choice(candidates, size=min(sample, len(candidates)), replace=False)
    judged = np.array([labels[i].success for i in chosen], bool)
    truth = np.array([episodes[i].trusted_success() for i in chosen], bool)
    tp = int((judged & truth).sum())
    result = AuditResult(
        policy_version=int(episodes[chosen[0]].policy_version), detector=labels[chosen[0]].version, n=len(chosen),
        claimed=float(judged.mean()), audited=float(truth.mean()),
        precision=tp / int(judged.sum()) if judged.any() else None,
        recall=tp / int(truth.sum()) if truth.any() else None,
        alarm=False,
    )
    # The alarm needs the gap beyond the bound with 95% one-sided confidence: a detector that is merely imperfect
    # (precision 0.8 gives a steady +0.1) does not ring it on a 64-episode sample by chance; one that is being
    # exploited, or has gone wrong, does.
    diff = judged.astype(float) - truth.astype(float)
    result.gap_se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    result.alarm = abs(result.gap) - Z_ONE_SIDED_95 * result.gap_se > bound
    source = lambda ep: "human" if ep.latest_label("human") is not None else "ground_truth"  # noqa: E731
    record = [(episodes[i], Label(source=source(episodes[i]), success=bool(t), version="audit"))
              for i, t in zip(chosen, truth)]
    return result, record
