"""Residual PPO: the VLA stays frozen; a small Gaussian residual on its action chunks learns from the detector.

Why this, for a base that has converged by behaviour cloning (bench/RESULTS.md, why the learners stop short of more
demonstrations): its failures are continuous (it moves slower than its teacher and closes its gripper a little off
the block), and every update that clones its own samples, however they are filtered or weighted, re-learns the same
imprecision. A residual policy does not imitate: it adds a correction to every sampled chunk (a gain on the
movement, an offset per action dimension, ``flywheel.vla.model.ResidualHead``) and PPO moves it toward what the
detector judged successful, with exact log-probabilities of its own Gaussian draws. Corrections of this kind are
what residual RL on top of imitation policies is known to learn well (Ankile et al. 2024, "From Imitation to
Refinement").

Each update, on freshly collected, detector-labelled episodes (every episode records its decisions: the flow's
chunk, the residual draw and its log-probability, flywheel.vla.model.SmallVLA.sample):

1. the frozen backbone encodes the frame of every decision (once);
2. the reward is the detector's verdict at the end, discounted by ``gamma`` per decision, so a quicker success is
   worth more; a value network on the same features is refitted to those returns;
3. advantages by GAE(``gae_lambda``) from that value, normalised;
4. ``ppo_epochs`` passes of the clipped PPO objective over the decisions, in minibatches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flywheel.contracts import Episode, Extras, PolicySnapshot, Sampling, TrainablePolicy
from learner.base import LearnerBase
from learner.critic import Critic


class ResidualPPOLearner(LearnerBase):
    """The ``Learner`` contract: ``update(labelled episodes) -> stats``; ``snapshot() -> PolicySnapshot``."""

    def __init__(
        self,
        model: TrainablePolicy,
        demos: list[Episode] | None = None,  # unused: nothing is cloned
        *,
        version: int = 0,
        seed: int = 0,
        ppo_lr: float = 3e-4,
        ppo_epochs: int = 8,
        ppo_clip: float = 0.2,
        ppo_minibatch: int = 256,
        gamma: float = 0.95,
        gae_lambda: float = 0.95,
        value_epochs: int = 20,
    ):
        if "residual" not in model.capabilities:
            raise ValueError(f"residual_ppo trains a residual head, which {type(model).__name__} does not have "
                             f"(capabilities {sorted(model.capabilities)}): use ppo or filtered_bc")
        self.model, self.version = model, version
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.residual.parameters():
            p.requires_grad_(True)
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(model.residual.parameters(), lr=ppo_lr)
        self.critic = Critic(model, gamma=gamma, lam=gae_lambda, epochs=value_epochs, minibatch=ppo_minibatch,
                             seed=seed, own_encoder=False)  # the VLA is frozen: its encoder serves as it is
        self.epochs, self.clip, self.minibatch = ppo_epochs, ppo_clip, ppo_minibatch

    def update(self, episodes: list[Episode]) -> dict[str, float]:
        episodes = [ep for ep in episodes
                    if len(ep.extras.get(Extras.CHUNK_STEPS, ())) and Extras.RESIDUALS in ep.extras]
        if not episodes:
            raise ValueError("residual_ppo needs episodes acted by the residual policy (extras 'residuals'); "
                             "were they collected with this learner's snapshot?")
        feats = self.critic.features(episodes)
        ctx = torch.cat([f[:-1] for f in feats])
        on = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(ctx.device)  # noqa: E731
        base = on(np.concatenate([ep.extras[Extras.BASE_CHUNKS] for ep in episodes]))
        drawn = on(np.concatenate([ep.extras[Extras.RESIDUALS] for ep in episodes]))
        old_logp = on(np.concatenate([ep.extras[Extras.RESIDUAL_LOGP] for ep in episodes]))
        adv, ret = self.critic.advantages(feats, [self.judged_success(ep) for ep in episodes])
        adv_t, ret_t = on((adv - adv.mean()) / (adv.std() + 1e-8)), on(ret)

        n, stats = len(ctx), {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
        for _ in range(self.epochs):
            for idx in torch.randperm(n, generator=self.generator).split(self.minibatch):
                logp = self.model.residual.log_prob(ctx[idx], base[idx], drawn[idx])
                ratio = (logp - old_logp[idx]).exp()
                a = adv_t[idx]
                loss = -torch.min(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a).mean()
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.model.residual.parameters(), 1.0)
                self.optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"].append(float(loss))
                    stats["clip_fraction"].append(float(((ratio - 1).abs() > self.clip).float().mean()))
                    stats["approx_kl"].append(float((old_logp[idx] - logp).mean()))
        stats["value_loss"] = self.critic.fit(ctx, ret_t, self.generator)
        self.version += 1
        with torch.no_grad():
            mean, std = self.model.residual(ctx[:1], base[:1])
        return {**{k: float(np.mean(v)) for k, v in stats.items()}, "decisions": n,
                "judged_success": float(np.mean([self.judged_success(ep) for ep in episodes])),
                "residual_std": float(std.mean()), "residual_gain": float(mean[0, 0].exp())}

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(version=self.version, weights=self.model.get_weights(),
                              meta={"algorithm": type(self).__name__},
                              sampling=Sampling(residual="explore"))
