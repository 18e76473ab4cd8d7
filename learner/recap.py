"""RECAP-style advantage conditioning (as in pi*0.6), with a binary success detector as the value signal.

Every judged episode trains the policy, not only the successes: the policy is told whether each chunk came from an
episode with positive advantage (indicator 1: judged a success, and the demonstrations) or negative advantage
(indicator 2: judged a failure). The indicator is dropped at random (-> 0, "none") so that the unconditioned policy
stays trained. At inference the policy is conditioned on "positive" with classifier-free guidance,
v = v_none + w * (v_positive - v_none), which pushes its actions away from what failed, not only toward what worked.

The value here is the episode's judged success (a Monte-Carlo return of 0 or 1); a learned distributional value
over steps-to-success (issue 5) refines the same update.
"""

from __future__ import annotations

from flywheel.contracts import Episode
from learner.filtered_bc import FilteredBCLearner

POSITIVE, NEGATIVE = 1, 2


class AdvantageConditionedLearner(FilteredBCLearner):
    demo_indicator = POSITIVE
    sampling_indicator = POSITIVE

    def add_episodes(self, episodes: list[Episode]) -> dict[str, float]:
        judged = [self.judged_success(ep) for ep in episodes]
        for ep, ok in zip(episodes, judged):
            self.data.add([ep], indicator=POSITIVE if ok else NEGATIVE)
        kept = sum(judged)
        return {"kept_episodes": kept, "kept_fraction": kept / max(1, len(episodes))}
