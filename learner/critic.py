"""A critic for PPO: V at each decision of an episode, read from a frozen encoder, and GAE over the decisions.

The reward is the judged success at the episode's end, discounted by ``gamma`` per decision, so a quicker success is
worth more. Unlike group-relative credit (GRPO), it needs no repeated attempts at a layout, and it credits every
episode, not only those whose layout's attempts ended differently.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flywheel.contracts import Episode, Extras, TrainablePolicy
from learner.value import frame_features, frozen_copy


class Critic:
    def __init__(self, policy_model: TrainablePolicy, *, gamma: float = 0.95, lam: float = 0.95, epochs: int = 20,
                 minibatch: int = 256, lr: float = 1e-3, seed: int = 0, own_encoder: bool = True):
        """``own_encoder``: read features from a frozen copy of the policy as it is now (for a learner that trains
        the backbone); False: from the policy itself, whose backbone the caller keeps frozen (residual PPO). Named
        ``model`` either way: not training state (learner/base.py)."""
        self.model = frozen_copy(policy_model) if own_encoder else policy_model
        d = policy_model.feature_dim
        with torch.random.fork_rng(devices=[]):  # seeded, without moving the global stream
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(d, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                                     nn.Linear(128, 1)).to(policy_model.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.gamma, self.lam, self.epochs, self.minibatch = gamma, lam, epochs, minibatch

    @torch.no_grad()
    def features(self, episodes: list[Episode]) -> list[torch.Tensor]:
        """The policy's features at each decision and at each episode's last frame: (K+1, D) per episode."""
        return [frame_features(self.model, ep, np.append(ep.extras[Extras.CHUNK_STEPS], ep.num_steps))
                for ep in episodes]

    def advantages(self, feats: list[torch.Tensor], successes: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        """GAE over each episode's decisions -> (advantages, returns), concatenated in decision order."""
        advs, rets = [], []
        with torch.no_grad():
            values = [self.net(f).squeeze(-1).cpu().numpy() for f in feats]
        for v, success in zip(values, successes):
            k = len(v) - 1
            reward = np.zeros(k)
            reward[-1] = float(success)
            nxt = np.append(v[1:k], 0.0)  # after the last decision: nothing (the episode ended)
            delta = reward + self.gamma * nxt - v[:k]
            adv, running = np.zeros(k), 0.0
            for t in reversed(range(k)):
                running = delta[t] + self.gamma * self.lam * running
                adv[t] = running
            advs.append(adv)
            rets.append(adv + v[:k])
        return np.concatenate(advs), np.concatenate(rets)

    def fit(self, ctx: torch.Tensor, returns: torch.Tensor, generator: torch.Generator) -> list[float]:
        """Regress V on the returns (after the policy's step: its advantages used V as it was); the losses."""
        losses = []
        for _ in range(self.epochs):
            for idx in torch.randperm(len(ctx), generator=generator).split(self.minibatch):
                loss = (self.net(ctx[idx]).squeeze(-1) - returns[idx]).pow(2).mean()
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                losses.append(float(loss.detach()))
        return losses
