"""RECAP's critic: a distributional value over the return to go, read from the frozen VLA backbone.

Returns (as in pi*0.6): every step costs 1/H (H the episode horizon) and an episode judged a failure costs 1 more
at its end, so from frame t of an episode of T steps

    success:  G_t = -(T - t) / H              in (-1, 0]
    failure:  G_t = -(T - t) / H - 1          in [-2, -1)

These values lie on a grid of 1/H, so the value is a classifier over the 2H + 1 grid points (a distribution over
steps-to-success, failure included) trained with cross-entropy on Monte-Carlo returns, and V is its expectation.
Success comes from the labels the learner is given (the detector's), never from the simulator.

The features are the VLA encoder's context, from a frozen copy of the starting policy: it already finds the named
block and target (its grounding was trained for acting), so the value head is a small MLP that trains in seconds,
and the features of every frame are computed once (the caller caches them).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from flywheel.contracts import Episode, TrainablePolicy, sensor_inputs


def frozen_copy(model: TrainablePolicy) -> TrainablePolicy:
    """The policy as it is now, for reading features from while the policy itself trains on."""
    copied = copy.deepcopy(model).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def frame_features(model: TrainablePolicy, ep: Episode, frames: np.ndarray) -> torch.Tensor:
    """The policy's features at the given frame indices of one episode: (len(frames), D)."""
    ids = np.repeat(model.token_ids([ep.instruction]), len(frames), axis=0)
    images, proprio = sensor_inputs(ep.observations, model.sensors, frames)
    return model.features(images, ids, proprio)


def returns_to_go(num_steps: int, success: bool, horizon: int) -> np.ndarray:
    """G_t for frames t = 0..T of one episode (T = ``num_steps``), as defined above."""
    g = -(num_steps - np.arange(num_steps + 1, dtype=np.float32)) / horizon
    return g if success else g - 1.0


class ValueModel:
    """V(frame, instruction, proprio) from backbone features; ``fit`` on (features, return) pairs."""

    def __init__(self, policy_model: TrainablePolicy, horizon: int, *, hidden: int = 256, lr: float = 1e-3,
                 seed: int = 0):
        self.backbone = frozen_copy(policy_model)
        self.horizon = horizon
        self.bins = 2 * horizon + 1  # bin b <-> return -b / H
        with torch.random.fork_rng():  # seeded, without moving the global RNG the policy's training draws from
            torch.manual_seed(seed)
            self.head = nn.Sequential(
                nn.LayerNorm(policy_model.feature_dim), nn.Linear(policy_model.feature_dim, hidden), nn.GELU(),
                nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, self.bins),
            )
        self.head.to(policy_model.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=1e-4)
        self.generator = torch.Generator().manual_seed(seed)

    def features(self, ep: Episode, frames: np.ndarray) -> torch.Tensor:
        return frame_features(self.backbone, ep, frames)

    def fit(self, feats: torch.Tensor, returns: np.ndarray, steps: int, batch_size: int = 256) -> float:
        """Cross-entropy steps on features (N, D) and their returns to go (N,); returns the mean loss."""
        if len(feats) == 0:
            return float("nan")
        targets = torch.from_numpy(np.clip(np.rint(-returns * self.horizon), 0, self.bins - 1).astype(np.int64)
                                   ).to(feats.device)
        self.head.train()
        losses = []
        for _ in range(steps):
            idx = torch.randint(0, len(feats), (batch_size,), generator=self.generator)
            loss = nn.functional.cross_entropy(self.head(feats[idx]), targets[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        self.head.eval()
        return float(np.mean(losses))

    @torch.no_grad()
    def value(self, feats: torch.Tensor) -> np.ndarray:
        """Expected return to go, (N,) in [-2, 0]."""
        grid = -torch.arange(self.bins, dtype=torch.float32, device=feats.device) / self.horizon
        return (torch.softmax(self.head(feats), dim=-1) @ grid).cpu().numpy()


def chunk_advantages(values: np.ndarray, chunk_steps: np.ndarray, num_steps: int, success: bool, horizon: int,
                     lookahead: int = 2) -> np.ndarray:
    """The n-step advantage of each sampled chunk of one episode.

    ``values``: V at each chunk step and, last, at the final frame (len(chunk_steps) + 1). For chunk i the return
    runs ``lookahead`` chunks ahead and bootstraps from V there, or from the episode's end (0 after a success, -1
    after a failure):  A_i = -(t_{i+n} - t_i) / H + V(t_{i+n}) - V(t_i).
    """
    k = len(chunk_steps)
    steps = np.append(chunk_steps, num_steps)
    boot = values.astype(np.float64).copy()
    boot[k] = 0.0 if success else -1.0  # the end of the episode is terminal
    ahead = np.minimum(np.arange(k) + lookahead, k)
    return (-(steps[ahead] - steps[:k]) / horizon + boot[ahead] - values[:k]).astype(np.float32)
