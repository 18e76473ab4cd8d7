"""RECAP: advantage-conditioned policies with a learned value (as in pi*0.6), for the flow-matching VLA.

Each update:

1. the new episodes join the buffer, and their frames at the policy's decision points (plus the last) join the
   value's training set with their returns to go under the detector's labels (``learner.value``);
2. the value is refitted on everything so far;
3. every chunk in the buffer gets an n-step advantage from the refitted value, and the top ``positive_fraction``
   of each task family is marked "positive" (indicator 1), the rest "negative" (indicator 2). The demonstrations
   are positive;
4. the policy trains on all of it, the indicator dropped at random (-> 0, "none") so the unconditioned policy stays
   trained.

At inference the policy is conditioned on "positive" with classifier-free guidance, v = v_none + w (v_pos - v_none):
the actions move away from what the value judged worse than usual, not only toward what worked.

Why per chunk, not per episode: an episode holds about ten decisions. Judged by its outcome alone, a fast, correct
push in an episode that ran out of time counts as a failure, and a wasted chunk in a success counts as a success.
The value credits each chunk with what it changed (steps saved, success made likelier).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from flywheel.contracts import Episode
from learner.filtered_bc import FilteredBCLearner
from learner.value import ValueModel, chunk_advantages, returns_to_go

POSITIVE, NEGATIVE = 1, 2


class _Decisions(NamedTuple):
    """One own episode as the value sees it: features at each chunk step and at the last frame."""

    feats: torch.Tensor
    chunk_steps: np.ndarray
    num_steps: int
    success: bool
    horizon: int
    task: str


class RecapLearner(FilteredBCLearner):
    demo_indicator = POSITIVE
    sampling_indicator = POSITIVE

    def __init__(self, model, demos: list[Episode], *, value_steps: int = 300, lookahead: int = 2,
                 positive_fraction: float = 0.3, **kwargs):
        super().__init__(model, demos, **kwargs)
        horizon = int(demos[0].info.get("max_steps", 40)) if demos else 40
        self.value = ValueModel(model, horizon, seed=kwargs.get("seed", 0))
        self.value_steps, self.lookahead, self.positive_fraction = value_steps, lookahead, positive_fraction
        self._own: dict[str, _Decisions] = {}
        for ep in demos:  # demonstrations teach the value what success looks like from every stage
            frames = np.unique(np.append(np.arange(0, ep.num_steps, 4), ep.num_steps))
            g = returns_to_go(ep.num_steps, True, self._horizon(ep))
            self.value.add(self.value.features(ep, frames), g[frames])

    def _horizon(self, ep: Episode) -> int:
        return int(ep.info.get("max_steps", self.value.horizon))

    def add_episodes(self, episodes: list[Episode]) -> dict[str, float]:
        for ep in episodes:
            if "chunk_steps" not in ep.extras or ep.num_steps == 0:
                continue
            ok, steps = self.judged_success(ep), ep.extras["chunk_steps"]
            frames = np.append(steps, ep.num_steps)
            feats = self.value.features(ep, frames)
            self.value.add(feats, returns_to_go(ep.num_steps, ok, self._horizon(ep))[frames])
            self._own[ep.id] = _Decisions(feats, steps, ep.num_steps, ok, self._horizon(ep), ep.task)
            self.data.add([ep], indicator=NEGATIVE)  # relabelled below
        value_loss = self.value.fit(self.value_steps)
        return {"value_loss": value_loss, **self.relabel()}

    def relabel(self) -> dict[str, float]:
        """Advantages of every buffered chunk under the current value; the top fraction per task is positive."""
        keys = list(self._own)
        advs = {}
        for key in keys:
            d = self._own[key]
            v = self.value.value(d.feats)
            advs[key] = chunk_advantages(v, d.chunk_steps, d.num_steps, d.success, d.horizon, self.lookahead)
        labels, positive = {}, []
        for task in {d.task for d in self._own.values()}:
            mine = [k for k in keys if self._own[k].task == task]
            threshold = np.quantile(np.concatenate([advs[k] for k in mine]), 1.0 - self.positive_fraction)
            for k in mine:
                ind = np.where(advs[k] > threshold, POSITIVE, NEGATIVE)
                labels[k] = (np.ones(len(ind), np.float32), ind)
                positive.append(ind == POSITIVE)
        self.data.relabel(labels)
        all_adv = np.concatenate(list(advs.values())) if advs else np.zeros(1)
        pos = np.concatenate(positive) if positive else np.zeros(1, bool)
        return {"advantage_mean": float(all_adv.mean()), "advantage_std": float(all_adv.std()),
                "positive_fraction": float(pos.mean()), "kept_episodes": len(keys)}
