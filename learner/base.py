"""What every learner shares: how it reads a judgement, and how it rolls back."""

from __future__ import annotations

from flywheel.contracts import Episode


class LearnerBase:
    """Part of the ``Learner`` contract common to all algorithms; subclasses set ``self.model`` and
    ``self.version`` and implement ``update`` and ``snapshot``."""

    @staticmethod
    def judged_success(ep: Episode) -> bool:
        label = ep.latest_label("detector")
        if label is None:
            raise ValueError(f"episode {ep.id} has no detector label: label episodes before the update")
        return label.success

    @staticmethod
    def layout_groups(episodes: list[Episode]) -> list[list[int]]:
        """The indices of the attempts at each layout (same env seed): what group-relative advantages compare."""
        groups: dict[int, list[int]] = {}
        for i, ep in enumerate(episodes):
            groups.setdefault(ep.seed, []).append(i)
        return list(groups.values())

    def restore(self, weights: dict) -> None:
        """Roll the policy back to earlier weights (the loop's audit does, after a regression); the result is a
        new version, so actors pick it up like any other."""
        self.model.load_weights(weights)
        self.version += 1
