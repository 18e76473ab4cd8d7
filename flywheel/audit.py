"""The audit in the loop: how far the detector's labels can be trusted right now, on the policy it judges now.

Every iteration, a random sample of the freshly labelled episodes is checked against trusted labels
(``Episode.trusted_success``: the simulator's ground truth here; a human's on a robot). The audit reports, for that
policy version:

- claimed success (the share the detector calls successes) against audited success (the share that are);
- audited precision and recall of the detector's labels.

A detector whose false positives the policy learns to exploit shows up first as claimed success running ahead of
audited success: when the two part by more than ``bound`` (with 95% confidence), the audit raises an alarm and the
loop stops trusting the labels (``Auditor``: updates pause, the detector is retrained on the audited episodes,
the iteration is relabelled, and the policy is rolled back if it regressed).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from flywheel.contracts import Episode, Label, Learner, SuccessDetector
from flywheel.evaluation import Evaluation, label_episodes
from flywheel.store import EpisodeStore

if TYPE_CHECKING:  # the state holds audit results: only its type is needed here
    from flywheel.state import LoopState

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


@dataclasses.dataclass
class AuditSettings:
    """The audit in the loop. ``retrain``: the run layer's way to train a new detector on the store's trusted
    labels (the audited episodes' included); None: an alarm only pauses updates."""

    sample: int = 64
    bound: float = 0.15
    retrain: Callable[..., SuccessDetector] | None = None  # retrain(exclude=ids) -> a new detector
    seed: int = 0
    retrain_every: int = 0  # > 0: every so many iterations a candidate detector is trained on every trusted label
    #                         but this iteration's audit, and promoted if it judges that audit no worse (AUROC)

    def as_summary(self, state: LoopState) -> dict[str, Any]:
        return {
            "sample": self.sample, "bound": self.bound, "alarms": state.alarms, "promotions": state.promotions,
            "paused_updates": state.paused_updates, "detector_versions": state.detector_versions,
            "rollbacks": state.rollbacks,
            "per_iteration": [dataclasses.asdict(a) | {"gap": a.gap} for a in state.audits],
        }


@dataclasses.dataclass
class Verdict:
    """The audit phase's outcome: the detector labelling from now on, this iteration's labels (relabelled by a
    retrained detector after an alarm), whether they can be trusted, and the metrics."""

    detector: SuccessDetector
    labels: list[Label]
    trusted: bool = True
    row: dict[str, Any] = dataclasses.field(default_factory=dict)


class Auditor:
    """Audits each iteration's labels; on an alarm retrains the detector, relabels, audits again, and rolls the
    policy back if it regressed (to the best evaluated version, which it remembers)."""

    def __init__(self, settings: AuditSettings | None, store: EpisodeStore, learner: Learner):
        self.settings, self.store, self.learner = settings, store, learner
        self.rng = np.random.default_rng(settings.seed if settings else 0)

    @property
    def on(self) -> bool:
        return self.settings is not None and self.settings.sample > 0

    def remember(self, state: LoopState, ev: Evaluation) -> None:
        """The best evaluated weights, kept for the audit's rollback (only where there is an audit)."""
        if self.settings is not None and (state.best is None or ev.success >= state.best[1]):
            state.best = (ev.version, ev.success, self.learner.snapshot().weights)

    def check(self, state: LoopState, detector: SuccessDetector, episodes: list[Episode],
              labels: list[Label]) -> Verdict:
        settings = self.settings
        result, record = audit(episodes, labels, settings.sample, settings.bound, self.rng)
        if result is None:
            return Verdict(detector, labels)
        self.store.add_labels([(ep.id, lab) for ep, lab in record])
        state.audits.append(result)
        row = result.as_metrics()
        if not result.alarm:
            due = settings.retrain_every and (state.iteration + 1) % settings.retrain_every == 0
            if settings.retrain is not None and due:
                detector = self._periodic_retrain(state, detector, record, row)
            return Verdict(detector, labels, True, row)
        state.alarms += 1
        trusted = False
        if settings.retrain is not None:
            detector, labels, trusted = self._retrain(state, episodes, record, row)
        self._roll_back_if_regressed(state, row)
        return Verdict(detector, labels, trusted, row)

    def _retrain(self, state: LoopState, episodes: list[Episode], record: list[tuple[Episode, Label]],
                 row: dict[str, Any]) -> tuple[SuccessDetector, list[Label], bool]:
        """A new detector on every trusted label in the store (the audited episodes are among them) relabels the
        iteration (appended: the first detector's labels stay on record) and is audited on the same sample."""
        detector = self.settings.retrain()
        state.detector_versions.append(detector.version)
        labels = label_episodes(detector, episodes)
        self.store.add_labels([(ep.id, lab) for ep, lab in zip(episodes, labels)])
        position = {ep.id: i for i, ep in enumerate(episodes)}
        again, _ = audit([ep for ep, _ in record], [labels[position[ep.id]] for ep, _ in record], len(record),
                         self.settings.bound, np.random.default_rng(0))
        row.update({"audit/retrained_detector": len(state.detector_versions) - 1,
                    **({"audit/gap_after_retrain": again.gap} if again else {})})
        return detector, labels, again is not None and not again.alarm

    def _roll_back_if_regressed(self, state: LoopState, row: dict[str, Any]) -> None:
        """The policy regressed while the labels were wrong: the newest evaluation's upper 95% bound lies below the
        best one's success. Back to the best weights, as a new version."""
        latest = state.evaluations[-1]
        if state.best is not None and latest.version != state.best[0] and latest.ci95[1] < state.best[1]:
            version, _, weights = state.best
            self.learner.restore(weights)
            state.rollbacks.append({"iteration": state.iteration + 1, "from_version": latest.version,
                                    "to_weights_of": version, "new_version": self.learner.version, "reason": "audit"})
            row["audit/rollback_to"] = version

    def _periodic_retrain(self, state: LoopState, detector: SuccessDetector, record: list[tuple[Episode, Label]],
                          row: dict[str, Any]) -> SuccessDetector:
        """Train a candidate on every trusted label but this iteration's audit, judge both detectors on that audit
        (the newest policy's episodes, which neither trained on), and keep the candidate only if its AUROC is no
        worse."""
        from sklearn.metrics import roc_auc_score

        audited = [ep for ep, _ in record]
        truth = np.array([lab.success for _, lab in record], bool)
        if truth.all() or not truth.any():
            return detector  # one class: nothing to compare on
        candidate = self.settings.retrain(exclude={ep.id for ep in audited})
        current_auroc = float(roc_auc_score(truth, detector.score(audited)))
        candidate_auroc = float(roc_auc_score(truth, candidate.score(audited)))
        promoted = candidate_auroc >= current_auroc
        state.promotions.append({"iteration": state.iteration + 1, "current": detector.version,
                                 "candidate": candidate.version, "current_auroc": current_auroc,
                                 "candidate_auroc": candidate_auroc, "promoted": promoted})
        row.update({"detector/candidate_auroc": candidate_auroc, "detector/current_auroc": current_auroc,
                    "detector/promoted": int(promoted)})
        if promoted:
            state.detector_versions.append(candidate.version)
            return candidate
        return detector
