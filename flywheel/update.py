"""The update phase: the learner learns from the iteration's labelled episodes, as ``learner_view`` shows them.

It recovers from the two ways an update fails overnight: a learner process that died (``LearnerLost``: restarted
from the deployed checkpoint, the same update made again) and weights that diverged (NaN/inf: back to the deployed
version's checkpoint, the update lost, its episodes kept; three in a row stop the run).
"""

from __future__ import annotations

import dataclasses
from typing import Collection

import numpy as np

from flywheel.checkpoint import CheckpointDir
from flywheel.contracts import Episode, Extras, Learner, LearnerLost, Rollouts
from flywheel.state import LoopState

MAX_DIVERGED_IN_A_ROW = 3


def learner_view(ep: Episode, reads: Collection[str] | None = None) -> Episode:
    """The episode as the learner may see it: no ground-truth success (nor an audit's ground-truth label), no
    privileged simulator state; with ``reads`` (the observation keys the policy reads), no other observations
    either: a camera recorded for the detector alone would otherwise double what the learner's replay holds."""
    extras = {k: v for k, v in ep.extras.items() if k not in Extras.PRIVILEGED}
    labels = [lab for lab in ep.labels if lab.source != "ground_truth"]
    observations = ep.observations if reads is None else {k: v for k, v in ep.observations.items() if k in reads}
    return dataclasses.replace(ep, ground_truth=None, extras=extras, labels=labels, observations=observations)


class Updater:
    """One update per iteration whose labels can be trusted. ``reads``: the observation keys the policy reads."""

    def __init__(self, learner: Learner, checkpoints: CheckpointDir, rollouts: Rollouts,
                 reads: Collection[str] | None = None):
        self.learner, self.checkpoints, self.rollouts, self.reads = learner, checkpoints, rollouts, reads

    def update(self, state: LoopState, episodes: list[Episode]) -> dict[str, float]:
        # A robot episode a safety stop cut short (actors/robot.py) is stored but not learned from: the policy did
        # not fail it, the camera froze or a person pressed e-stop. In the order the seeds were listed, as a resumed
        # run refills its buffer (flywheel/resume.py).
        view = [learner_view(ep, self.reads) for ep in sorted(episodes, key=Episode.collection_order)
                if not ep.info.get("cut_short")]
        try:
            try:
                stats = self.learner.update(view)
            except LearnerLost as e:  # restarted from the deployed checkpoint: the same update, once more
                state.recoveries.append({"iteration": state.iteration + 1, "error": str(e)[:300],
                                         "restored": self.learner.version, "action": "update made again"})
                stats = self.learner.update(view)
            self._check_finite()
            state.diverged_in_a_row = 0
            return stats
        except FloatingPointError as e:
            return self._recover(state, e)

    def _check_finite(self) -> None:
        """The NaN/inf guard after every update (trainers check each step's loss; this checks what it left)."""
        weights = self.learner.snapshot().weights
        bad = [k for k, v in weights.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"the update left NaN/inf in {bad[:3]}")

    def _recover(self, state: LoopState, error: FloatingPointError) -> dict[str, float]:
        """Back to the checkpoint of the version the actors run (weights, optimizer, generators)."""
        state.diverged_in_a_row += 1
        version = self.rollouts.published_version
        weights, _, training = self.checkpoints.load(version, with_state=True)
        self.learner.resume_from(weights, training)
        state.recoveries.append({"iteration": state.iteration + 1, "error": str(error)[:300], "restored": version})
        if state.diverged_in_a_row >= MAX_DIVERGED_IN_A_ROW:
            raise FloatingPointError(
                f"the learner diverged (NaN/inf) in {state.diverged_in_a_row} updates in a row, each time restored "
                f"from checkpoint v{version}: {error}. Lower learner.lr (or learner.ppo_lr), then resume the run with "
                f"flywheel run run_dir=... ; its episodes and checkpoints are intact.") from error
        return {"diverged": 1.0}
