"""What every learner shares: how it reads a judgement, and how it rolls back."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flywheel.contracts import Episode


class LearnerBase:
    """Part of the ``Learner`` contract common to all algorithms; subclasses set ``self.model`` and
    ``self.version`` and implement ``update`` and ``snapshot``."""

    @staticmethod
    def judged_success(ep: Episode) -> bool:
        """The policy's success as the detector judged it. An episode a person had to take over (a correction,
        ``Episode.intervened``) or to correct in words (``Episode.coached``: a hint of failure, whatever the verdict)
        is not the policy's success, whatever its end: the person's steps are credited as demonstrations instead, and
        their words as the subtask head's targets (learner/bc.py ``add_corrections``, ``add_coaching``)."""
        label = ep.latest_label("detector")
        if label is None:
            raise ValueError(f"episode {ep.id} has no detector label: label episodes before the update")
        return label.success and not ep.intervened().any() and not ep.coached().any()

    @classmethod
    def verdicts(cls, episodes: list[Episode], unsure: tuple[float, float] | None = None) -> np.ndarray:
        """1.0 / 0.0 per episode as judged (``judged_success``), NaN where the detector was unsure: its P(success)
        in [``unsure[0]``, ``unsure[1]``). A label without a score (a person's, the simulator's) is always sure."""
        out = np.array([float(cls.judged_success(ep)) for ep in episodes])
        if unsure is not None and unsure[1] > unsure[0]:
            for i, ep in enumerate(episodes):
                score = ep.latest_label("detector").score
                helped = ep.intervened().any() or ep.coached().any()
                if score is not None and unsure[0] <= score < unsure[1] and not helped:
                    out[i] = np.nan
        return out

    @staticmethod
    def layout_groups(episodes: list[Episode]) -> list[list[int]]:
        """The indices of the attempts at each layout (same env seed): what group-relative advantages compare."""
        groups: dict[int, list[int]] = {}
        for i, ep in enumerate(episodes):
            groups.setdefault(ep.seed, []).append(i)
        return list(groups.values())

    def training_state(self) -> dict[str, Any]:
        """What an update depends on besides the policy's weights, for a checkpoint: the version, and every
        optimizer, random generator and auxiliary network (a value, a critic) the learner holds, directly or in a
        helper (a trainer). Tensors and plain values only, so it loads with ``torch.load(weights_only=True)``.
        The replay buffer is not in it: ``refill`` rebuilds it from the episode store."""
        return {"version": self.version, **_on_cpu(_state_of(self, ""))}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore ``training_state()`` into a learner built the same way (same algorithm and options)."""
        _load_state_of(self, "", state)
        self.version = int(state["version"])

    def resume_from(self, weights: dict, training: dict[str, Any]) -> None:
        """Become a checkpoint again: its policy weights and ``training_state()`` (version included)."""
        self.model.load_weights(weights)
        self.load_training_state(training)

    def refill(self, episodes: list[Episode]) -> None:
        """Put episodes an earlier process of this run already learned from back in the replay buffer, without an
        update (a resumed run; a learner restarted after a crash). On-policy learners keep no buffer: nothing."""

    def restore(self, weights: dict) -> None:
        """Roll the policy back to earlier weights (the loop's audit does, after a regression); the result is a
        new version, so actors pick it up like any other."""
        self.model.load_weights(weights)
        self.version += 1


def _on_cpu(tree: Any) -> Any:
    """Every tensor in a nested state on the CPU: a learner on a GPU hands its state to a driver that may have none."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(v) for v in tree)
    return tree


def _state_of(obj: Any, prefix: str, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in vars(obj).items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.optim.Optimizer):
            out[f"optimizer:{key}"] = value.state_dict()
        elif isinstance(value, torch.Generator):
            out[f"generator:{key}"] = value.get_state()
        elif isinstance(value, torch.nn.Module):
            # not the policy (its weights are the checkpoint itself), nor a frozen encoder a helper reads features
            # from (made again, the same, whenever the learner is built)
            if name != "model" and any(p.requires_grad for p in value.parameters()):
                out[f"module:{key}"] = value.state_dict()
        elif depth == 0 and type(value).__module__.startswith("learner."):  # a helper: a trainer, a value model
            out.update(_state_of(value, f"{key}.", depth + 1))
    return out


def _load_state_of(obj: Any, prefix: str, state: dict[str, Any], depth: int = 0) -> None:
    for name, value in vars(obj).items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.optim.Optimizer) and f"optimizer:{key}" in state:
            value.load_state_dict(state[f"optimizer:{key}"])
        elif isinstance(value, torch.Generator) and f"generator:{key}" in state:
            value.set_state(state[f"generator:{key}"])
        elif isinstance(value, torch.nn.Module) and f"module:{key}" in state:
            value.load_state_dict(state[f"module:{key}"])
        elif depth == 0 and type(value).__module__.startswith("learner."):
            _load_state_of(value, f"{key}.", state, depth + 1)
