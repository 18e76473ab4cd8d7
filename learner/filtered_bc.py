"""Success-filtered behaviour cloning on the policy's own, detector-labelled episodes.

Why this algorithm first: with a binary success detector as the only reward, the episodes the detector calls
successes are exactly the positive-advantage samples of RECAP / AWR with a 0-1 return, and cloning them is the
simplest update that provably cannot be hacked by reward scale. The policy practises in layouts its demonstrations
never covered; its own successes there become new demonstrations, and its success on held-out layouts rises.
The pretraining demonstrations are replayed alongside (pinned in the buffer) so that the policy does not drift from
what it already knew. RECAP and PPO/GRPO build on the same ``Learner`` contract (issue 5).
"""

from __future__ import annotations

import numpy as np
import torch

from flywheel.contracts import Episode, PolicySnapshot, Sampling, TrainablePolicy
from learner.base import LearnerBase
from learner.bc import BCTrainer, ChunkDataset, warmup_cosine


class FilteredBCLearner(LearnerBase):
    """The ``Learner`` contract: ``update(labelled episodes) -> stats``; ``snapshot() -> PolicySnapshot``."""

    def __init__(
        self,
        model: TrainablePolicy,
        demos: list[Episode],
        *,
        version: int = 0,
        steps_per_update: int = 200,
        batch_size: int = 64,
        lr: float = 3e-4,
        max_episodes: int = 4000,
        seed: int = 0,
        demo_fraction: float = 0.5,
        indicator_dropout: float = 0.0,
        guidance: float = 1.0,
        shrink: float = 0.0,
        perturb: float = 0.01,
        indicator_lr: float | None = None,
        freeze_backbone: bool = False,
        practice_noise: float = 1.0,
        clone: str = "chunks",
        ema: float = 0.0,
        augment: bool = False,
    ):
        """``ema`` > 0: publish an exponential moving average of the weights (this decay per step) rather than the
        weights the last step left, which carry that step's noise; training goes on from the latter."""
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"learner.ema={ema}: a decay per step in [0, 1) (0: publish the trained weights)")
        self.model = model
        self.version = version
        self.steps_per_update = steps_per_update
        self.batch_size = batch_size
        self.demo_fraction = demo_fraction
        if freeze_backbone:
            # Train the action expert only: the vision-language backbone keeps what pretraining gave it, and every
            # sample's context is computed once (learner/bc.py ChunkDataset(encode=True)).
            for p in model.backbone_parameters():
                p.requires_grad_(False)
        self.data = ChunkDataset(model, max_episodes=max_episodes, encode=freeze_backbone)
        self.guidance = guidance
        self.shrink, self.perturb, self.lr = shrink, perturb, lr
        if clone not in ("chunks", "executed"):
            raise ValueError(f"learner.clone={clone!r}: choose chunks or executed")
        self.practice_noise, self.executed = practice_noise, clone == "executed"
        self.indicator_dropout = indicator_dropout
        self.data.add(demos, pinned=True, indicator=self.demo_indicator)
        self.indicator_lr = indicator_lr
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)  # batches, and the trainer's draws: checkpointed
        self.trainer = self._trainer()
        self.ema = ema
        self._average = self._trained_weights() if ema > 0 else None

    def _trainer(self) -> BCTrainer:
        return BCTrainer(self.model, lr=self.lr, indicator_dropout=self.indicator_dropout,
                         indicator_lr=self.indicator_lr, generator=self.generator, augment=self.augment)

    @classmethod
    def advantages(cls, episodes: list[Episode]) -> np.ndarray:
        """Group-relative advantage of each episode: its judged success minus the mean of the attempts at the same
        layout (same env seed), as in GRPO. A success where the policy usually fails weighs most; a success in a
        layout it always solves weighs nothing (there is nothing to learn there). Single attempts fall back to the
        batch mean."""
        success = np.array([float(cls.judged_success(ep)) for ep in episodes])
        baseline = np.empty_like(success)
        for members in cls.layout_groups(episodes):
            baseline[members] = success[members].mean() if len(members) > 1 else success.mean()
        return success - baseline

    demo_indicator = 0  # filtered BC trains without the advantage indicator
    sampling_indicator = 0

    def add_episodes(self, episodes: list[Episode]) -> dict[str, float]:
        """Put newly labelled episodes in the buffer: successes with positive group advantage, weighted by it."""
        if not episodes:
            return {"kept_episodes": 0, "kept_fraction": 0.0, "mean_positive_advantage": 0.0}
        adv = self.advantages(episodes)
        for ep, a in zip(episodes, adv):
            if a > 0:
                self.data.add([ep], weight=float(a), executed=self.executed)
        kept = int((adv > 0).sum())
        return {
            "kept_episodes": kept,
            "kept_fraction": kept / max(1, len(episodes)),
            "mean_positive_advantage": float(adv[adv > 0].mean()) if kept else 0.0,
        }

    def take(self, episodes: list[Episode]) -> dict[str, float]:
        """New labelled episodes into the buffer: the steps a person corrected, as demonstrations are (always, and
        "positive" where the policy is conditioned on its advantage, as in pi*0.6), then the policy's own steps as
        ``add_episodes`` decides."""
        corrected = self.data.add_corrections(episodes, indicator=self.demo_indicator)
        return {**self.add_episodes(episodes), "corrected_episodes": corrected}

    def refill(self, episodes: list[Episode]) -> None:
        self.take(episodes)

    @torch.no_grad()
    def shrink_and_perturb(self) -> None:
        """theta <- shrink * theta + perturb * noise on every weight matrix (Ash & Adams 2020, "On warm-starting
        neural network training"): the base, warm-started on 1,124 expert demos, stays at 0.39-0.43 for 1,500
        steps; shrunk by 0.5 first, it reaches 0.62."""
        for p in self.model.parameters():
            if p.ndim > 1 and p.requires_grad:
                p.mul_(self.shrink).add_(torch.randn(p.shape, generator=self.generator).to(p.device) * self.perturb)

    def update(self, episodes: list[Episode]) -> dict[str, float]:
        stats = self.take(episodes)
        if self.shrink > 0:
            # Retrain from a shrunk copy on the whole buffer, with a fresh optimizer and its own warm-up + cosine
            # schedule: a warm start from the converged base does not absorb new data (see shrink_and_perturb).
            self.shrink_and_perturb()
            self.trainer = self._trainer()
        losses = []
        for step in range(self.steps_per_update if self.data.num_episodes else 0):  # nothing kept, no demos: no step
            if self.shrink > 0:
                self.trainer.schedule(warmup_cosine(step, self.steps_per_update, self.steps_per_update // 10))
            batch = self.data.sample(self.batch_size, self.generator, self.demo_fraction)
            losses.append(self.trainer.step(batch, weighted=True))
            if self._average is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(self._average.values()), self._trained_tensors(), 1.0 - self.ema)
        self.version += 1
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "buffer_episodes": self.data.num_episodes,
                **stats}

    def snapshot(self) -> PolicySnapshot:
        weights = self.model.get_weights()
        if self._average is not None:
            weights.update({k: v.detach().cpu().numpy().copy() for k, v in self._average.items()})
        sampling = Sampling(indicator=self.sampling_indicator,
                            guidance=self.guidance if self.sampling_indicator else 1.0, practice_noise=self.practice_noise)
        return PolicySnapshot(version=self.version, weights=weights, meta={"algorithm": type(self).__name__},
                              sampling=sampling)

    # ---- the moving average (``ema``): published and checkpointed; the trained weights are training state ----

    def _trained_tensors(self) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        return [params[k] for k in self._average]

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        """What the average follows: the parameters that train (a frozen backbone's never change, and its steps are
        cheap enough that averaging it too would be a tenth of each)."""
        return {k: p.detach().clone() for k, p in self.model.named_parameters() if p.requires_grad}

    def training_state(self) -> dict:
        """With ``ema``, a checkpoint's weights are the average (what was published), and the weights training
        continues from are kept here."""
        state = super().training_state()
        if self._average is not None:
            state["trained_weights"] = {k: v.cpu() for k, v in self._trained_weights().items()}
        return state

    def resume_from(self, weights: dict, training: dict) -> None:
        super().resume_from(weights, training)  # the checkpoint's weights: the average, with ema
        if self._average is not None:
            self._average = self._trained_weights()
            trained = training.get("trained_weights")
            if trained is not None:  # (a checkpoint written without ema: training goes on from its weights)
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for k, v in trained.items():
                        params[k].copy_(v)

    def restore(self, weights: dict) -> None:
        super().restore(weights)
        if self._average is not None:  # a rollback: the average restarts from the weights rolled back to
            self._average = self._trained_weights()
