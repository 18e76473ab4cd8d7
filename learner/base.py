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

    def restore(self, weights: dict) -> None:
        """Roll the policy back to earlier weights (the loop's audit does, after a regression); the result is a
        new version, so actors pick it up like any other."""
        self.model.load_weights(weights)
        self.version += 1
