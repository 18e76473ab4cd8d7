"""Held-out evaluation and labelling: what a policy version achieves on seeds it never practised on, and a
frozen detector's verdicts on episodes (appended as labels, never replacing older ones)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from flywheel.config import ConfigError
from flywheel.contracts import Episode, Label, Rollouts, SuccessDetector
from flywheel.metrics import wilson_interval


@dataclasses.dataclass
class Evaluation:
    """Success of one policy version on held-out seeds, as ``judged_by`` saw it: ``ground_truth`` (the simulator's
    verdict) or a detector's version (an environment that cannot judge itself, such as a robot)."""

    version: int
    episodes: int
    successes: int
    ci95: tuple[float, float]
    per_task: dict[str, float]
    outcomes: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # 1/0 per seed, in seed order
    judged_by: str = "ground_truth"

    @property
    def success(self) -> float:
        return self.successes / max(1, self.episodes)

    @property
    def outcomes_text(self) -> str:
        """The per-seed outcomes as one string of 0s and 1s, in seed order: how run_state.json and summary.json keep
        them, so that two runs evaluated on the same seeds can be compared seed by seed (a paired test)."""
        return "".join(map(str, self.outcomes))

    def as_metrics(self, prefix: str = "eval") -> dict[str, Any]:
        out = {
            f"{prefix}/success": self.success,
            f"{prefix}/ci95_low": self.ci95[0],
            f"{prefix}/ci95_high": self.ci95[1],
            f"{prefix}/episodes": self.episodes,
            f"{prefix}/version": self.version,
        }
        out.update({f"{prefix}/success_{task}": rate for task, rate in self.per_task.items()})
        return out


def evaluate(rollouts: Rollouts, seeds: list[int], version: int, sample_seed: int = 12345,
             detector: SuccessDetector | None = None, split: str = "eval") -> Evaluation:
    """Run the current policy on the held-out seeds and score it with the simulator's ground truth, or, given a
    ``detector``, with its verdicts (``eval.judge=detector``: a robot, whose episodes carry no ground truth).
    ``split="robust"``: in the scenes of the held-out randomisation (the robustness split).

    The same seeds and the same sampling seed every time, so two versions are compared on identical layouts.
    Evaluation episodes are not stored and never reach the learner.
    """
    return score_held_out(rollouts.collect(seeds, split, sample_seed=sample_seed), seeds, version, detector)


def score_held_out(episodes: list[Episode], seeds: list[int], version: int,
                   detector: SuccessDetector | None = None) -> Evaluation:
    """``evaluate``'s verdicts on episodes already run (the detector's are appended to their labels)."""
    if detector is not None:
        verdicts = [lab.success for lab in label_episodes(detector, episodes)]
    else:
        unjudged = [ep.seed for ep in episodes if not ep.ground_truth or "success" not in ep.ground_truth]
        if unjudged:
            raise ConfigError(
                f"{len(unjudged)} of {len(episodes)} held-out episodes came back without a ground-truth success "
                f"(the environment's info['success']; seed {unjudged[0]} first): an environment that cannot judge "
                f"itself, such as a robot, is evaluated by the detector. Give eval.judge=detector (and, for the "
                f"promotion gate's audit, have a person judge some episodes: info['success'] where they did).")
        verdicts = [bool(ep.ground_truth["success"]) for ep in episodes]
    succeeded = {ep.seed: ok for ep, ok in zip(episodes, verdicts)}
    ok = np.array([succeeded.get(s, False) for s in seeds])  # an episode lost to a crashing environment failed
    tasks = sorted({ep.task for ep in episodes})
    per_task = {t: float(np.mean([succeeded[ep.seed] for ep in episodes if ep.task == t])) for t in tasks}
    return Evaluation(version, len(ok), int(ok.sum()), wilson_interval(int(ok.sum()), len(ok)), per_task,
                      tuple(int(o) for o in ok), "ground_truth" if detector is None else detector.version)


def label_episodes(detector: SuccessDetector, episodes: list[Episode]) -> list[Label]:
    """One frozen detector version judges every episode; the labels are appended, never replacing older ones."""
    scores = detector.score(episodes)
    labels = [
        Label(source="detector", success=bool(s >= detector.threshold), version=detector.version,
              score=float(s), threshold=detector.threshold)
        for s in scores
    ]
    for ep, lab in zip(episodes, labels):
        ep.labels.append(lab)
    return labels
