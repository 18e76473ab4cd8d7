"""A served flow policy steered by DSRL's noise policy (flywheel/vla/noise.py): the ``Policy`` the rollout actors
run for ``policy=dsrl``. The noise policy (local, small, trained) picks each chunk's starting noise; the served
policy (remote, frozen) integrates its flow from it.

In practice the noise is drawn around the noise policy's mean, with the std the learner's snapshot asks
(``Sampling.flow_noise``), and the draw and its log-probability are recorded for PPO; in evaluation it is the mean.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.remote_policy import RemotePolicy
from flywheel.contracts import Sampling
from flywheel.vla.noise import NoisePolicy


class SteeredPolicy:
    def __init__(self, served: RemotePolicy, steer: NoisePolicy):
        self.served, self.steer = served, steer
        self.steer.eval()
        self.chunk, self.action_dim, self.sensors = served.chunk, served.action_dim, served.sensors
        self.sampling = Sampling()
        self.explore = False
        self.last_extras: dict[str, np.ndarray] = {}

    def act(self, images: np.ndarray, proprio: np.ndarray, instructions: list[str], seed: int | None = None):
        std = self.sampling.flow_noise if self.explore else 0.0
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        noise, self.last_extras = self.steer.draw(images, proprio, instructions, std, gen)
        return self.served.act(images, proprio, instructions, seed=seed, noise=noise)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.steer.get_weights()

    def load_weights(self, weights: dict[str, np.ndarray], sampling: Sampling | None = None) -> None:
        self.steer.share(weights)
        self.sampling = sampling or Sampling()

    def close(self) -> None:
        self.served.close()


def steered(url: str, cfg, **remote: object) -> SteeredPolicy:
    """A rollout actor's policy for ``policy.name=dsrl``: the server at ``url`` (RemotePolicy's keyword arguments in
    ``remote``), steered by a noise policy of shape ``cfg`` (its weights arrive with each snapshot)."""
    return SteeredPolicy(RemotePolicy(url, **remote), NoisePolicy(cfg))
