"""RECAP: advantage-conditioned policies with a learned value (as in pi*0.6), for the flow-matching VLA.

Each update:

1. the new episodes join the buffer, and their frames at the policy's decision points (plus the last) join the
   value's training set with their returns to go under the detector's labels (``learner.value``);
2. the value is refitted on everything so far;
3. every buffered episode's advantage is recomputed under the refitted value and its chunks are marked "positive"
   (indicator 1) or "negative" (indicator 2). The demonstrations are positive;
4. the policy trains on all of it, the indicator dropped at random (-> 0, "none") so the unconditioned policy stays
   trained.

At inference the policy is conditioned on "positive" with classifier-free guidance, v = v_none + w (v_pos - v_none):
the actions move away from what the value judged worse than usual, not only toward what worked.

Two ways to credit (``credit``):

- "episode" (the default): an episode's advantage is its return against the value of where it started,
  A = G_0 - V(s_0), and all its chunks share it. Positive: A > 0 (``positive_fraction`` 0), or the top fraction of
  each task's chunks (so of its episodes, weighed by their length). A failure is never positive (its return is below any value); a success is positive when it
  was quicker than the value expected from its layout, so a success where the policy usually fails counts most.
- "chunk": each chunk's n-step advantage (``lookahead`` chunks, then the value), the top ``positive_fraction`` of
  each task's chunks positive. In principle finer, crediting a good push in an episode that ran out of time. On the
  shipped base's own practice the value is not accurate enough within an episode for that: it marks 23-38% of the
  failures' chunks positive, and the policy conditioned on "positive" falls below the base (bench/RESULTS.md, RECAP:
  episode credit against chunk credit).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from flywheel.contracts import Episode, Extras
from learner.filtered_bc import FilteredBCLearner
from learner.value import ValueModel, chunk_advantages, returns_to_go

POSITIVE, NEGATIVE = 1, 2


class _Decisions(NamedTuple):
    """One episode as the value sees it: backbone features at its frames, and the returns to go there."""

    feats: torch.Tensor  # (K+1, D): at each chunk step and at the last frame (demonstrations: every ``execute``)
    returns: np.ndarray  # (K+1,)
    chunk_steps: np.ndarray
    acted: np.ndarray  # the steps the policy acted (not a person correcting it)
    num_steps: int
    success: bool
    horizon: int
    task: str


class RecapLearner(FilteredBCLearner):
    demo_indicator = POSITIVE
    sampling_indicator = POSITIVE

    def __init__(self, model, demos: list[Episode], *, value_steps: int = 300, credit: str = "episode",
                 lookahead: int = 2, positive_fraction: float = 0.0, **kwargs):
        if credit not in ("episode", "chunk"):
            raise ValueError(f"learner.credit={credit!r}: choose episode or chunk")
        if credit == "chunk" and not 0 < positive_fraction < 1:
            raise ValueError(f"learner.positive_fraction={positive_fraction}: chunk credit marks the top fraction of "
                             "each task's chunks positive, so it must lie in (0, 1)")
        if "indicator" not in model.capabilities:
            raise ValueError(f"recap conditions the policy on an advantage indicator, which {type(model).__name__} "
                             f"does not take (capabilities {sorted(model.capabilities)}): use filtered_bc")
        model.start_conditioning()
        super().__init__(model, demos, **kwargs)
        horizon = int(demos[0].info.get("max_steps", 40)) if demos else 40
        self.value = ValueModel(model, horizon, seed=kwargs.get("seed", 0))
        self.value_steps, self.lookahead, self.positive_fraction = value_steps, lookahead, positive_fraction
        self.credit = credit
        # Demonstrations teach the value what success looks like from every stage, at the policy's decision rate.
        self._demos = [self._decisions(ep, True, np.arange(0, ep.num_steps, int(ep.info.get("execute", 4))))
                       for ep in demos if ep.num_steps]
        self._own: dict[str, _Decisions] = {}  # the policy's episodes still in the buffer, by id
        self._fit_value = True  # off while refilling (refill)

    def _decisions(self, ep: Episode, success: bool, steps: np.ndarray) -> _Decisions:
        horizon = int(ep.info.get("max_steps", self.value.horizon))
        frames = np.append(steps, ep.num_steps)
        return _Decisions(self.value.features(ep, frames), returns_to_go(ep.num_steps, success, horizon)[frames],
                          steps, np.flatnonzero(~ep.intervened()), ep.num_steps, success, horizon, ep.task)

    def add_episodes(self, episodes: list[Episode]) -> dict[str, float]:
        for ep in episodes:
            if Extras.CHUNK_STEPS not in ep.extras or ep.num_steps == 0:
                continue
            self._own[ep.id] = self._decisions(ep, self.judged_success(ep), ep.extras[Extras.CHUNK_STEPS])
            self.data.add([ep], indicator=NEGATIVE, executed=self.executed)  # relabelled below
        held = self.data.keys()  # past max_episodes the oldest leave the buffer; the value forgets them too
        self._own = {k: d for k, d in self._own.items() if k in held}
        every = [*self._demos, *self._own.values()]
        value_loss = self.value.fit(torch.cat([d.feats for d in every]), np.concatenate([d.returns for d in every]),
                                    self.value_steps) if every and self._fit_value else float("nan")
        return {"value_loss": value_loss, **self.relabel()}

    def refill(self, episodes: list[Episode]) -> None:
        """Back in the buffer (a resumed run, a restarted learner), labelled under the value as the checkpoint kept
        it: fitted on these episodes already, before the stop. Fitted again here, it (and so every later update)
        would differ from the run that never stopped (measured: up to 3e-4 in a weight at the next version)."""
        self._fit_value = False
        try:
            super().refill(episodes)
        finally:
            self._fit_value = True

    def advantages_of(self, d: _Decisions) -> np.ndarray:
        """One advantage per sampled chunk of an episode under the current value (see the module's docstring)."""
        if self.credit == "episode":
            return np.full(len(d.chunk_steps), d.returns[0] - self.value.value(d.feats[:1])[0], np.float32)
        return chunk_advantages(self.value.value(d.feats), d.chunk_steps, d.num_steps, d.success, d.horizon,
                                self.lookahead)

    def relabel(self) -> dict[str, float]:
        """Advantages of every buffered episode's chunks under the current value, and their indicators."""
        advs = {k: self.advantages_of(d) for k, d in self._own.items()}
        labels, share = {}, {}
        for task in {d.task for d in self._own.values()}:
            mine = [k for k, d in self._own.items() if d.task == task]
            threshold = 0.0 if self.positive_fraction <= 0 else \
                np.quantile(np.concatenate([advs[k] for k in mine]), 1.0 - self.positive_fraction)
            for k in mine:
                ind = np.where(advs[k] > threshold, POSITIVE, NEGATIVE)
                share[k] = float((ind == POSITIVE).mean())
                if self.executed:  # a sample per step it acted: each takes the indicator of the chunk it was acted in
                    d = self._own[k]
                    ind = ind[np.searchsorted(d.chunk_steps, d.acted, side="right") - 1]
                labels[k] = (np.ones(len(ind), np.float32), ind)
        self.data.relabel(labels)
        all_adv = np.concatenate(list(advs.values())) if advs else np.zeros(1)
        chunks = {k: len(a) for k, a in advs.items()}

        def positive(keys: list[str]) -> float:  # the share of these episodes' chunks marked positive
            return sum(share[k] * chunks[k] for k in keys) / max(1, sum(chunks[k] for k in keys))

        won = [k for k, d in self._own.items() if d.success]
        lost = [k for k, d in self._own.items() if not d.success]
        # how much of what the judge called success (and failure) the value marked positive: on a dashboard, the
        # first near 1 and the second near 0 say the value agrees with the judge
        return {"advantage_mean": float(all_adv.mean()), "advantage_std": float(all_adv.std()),
                "positive_fraction": positive(list(advs)), "positive_of_successes": positive(won),
                "positive_of_failures": positive(lost), "kept_episodes": len(self._own)}
