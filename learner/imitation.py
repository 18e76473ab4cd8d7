"""The imitation baselines of the comparison (bench/rl_comparison.py): behaviour cloning on demonstrations alone.

It is filtered BC that keeps nothing of practice: every update is the same number of steps, at the same learning
rate, batch and moving average, on the replayed demonstrations only. With ``learner.demos`` the base's own count
(100) it is "the same number of updates on the demonstrations alone"; with more (``learner.demos=200``: demonstrations
of new layouts by the same operators, as if the team had recorded as many again) it is "more demonstrations, no RL".
Whatever gain an RL algorithm shows must exceed these, or practice taught nothing that more cloning would not.
"""

from __future__ import annotations

from flywheel.contracts import Episode
from learner.filtered_bc import FilteredBCLearner


class ImitationLearner(FilteredBCLearner):
    def take(self, episodes: list[Episode]) -> dict[str, float]:
        """Practice is not learned from, nor its corrections (the loop still runs it, so that runs compare at equal
        env steps)."""
        return {"kept_episodes": 0, "kept_fraction": 0.0}
