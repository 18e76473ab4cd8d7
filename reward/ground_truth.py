"""The simulator as the judge: the reward that the comparison benchmark's upper bound learns from (``reward=
ground_truth``). It has the ``SuccessDetector`` contract, so the loop labels with it exactly as with a learned one
and the learner cannot tell the difference; only a simulator records the truth it reads, so on a robot it fails."""

from __future__ import annotations

import numpy as np

from flywheel.contracts import Episode


class GroundTruthJudge:
    """P(success) is 1 or 0, as the simulator recorded (``Episode.ground_truth["success"]``)."""

    version = "ground-truth"
    threshold = 0.5

    def score(self, episodes: list[Episode], instructions: list[str] | None = None) -> np.ndarray:
        if instructions is not None:
            raise ValueError("the simulator's truth is of the instruction an episode was given, not another one")
        lacking = [ep.id for ep in episodes if not ep.ground_truth or "success" not in ep.ground_truth]
        if lacking:
            raise ValueError(f"reward=ground_truth, but {len(lacking)} episodes (e.g. {lacking[0]}) carry no simulator "
                             f"success (a robot's do not): use reward=detector")
        return np.array([float(bool(ep.ground_truth["success"])) for ep in episodes], np.float32)
