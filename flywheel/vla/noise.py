"""DSRL's latent-noise policy (Wagenmaker et al. 2025, "Steering Your Diffusion Policy with Latent Space
Reinforcement Learning"): a small policy that picks the starting noise of a frozen flow policy's sampler, trained by
RL while the flow policy itself is never touched, so it can be a VLA served on another machine, without gradients.

    observation -> NoisePolicy -> w ~ N(mean(obs), sigma^2)  (C, A)
    observation + w -> the served flow policy (its protocol's ``noise`` field) -> actions

It is a ``TrainablePolicy`` whose "action" is the noise: PPO trains it as it trains a Gaussian policy around a
flow's output (``log_prob`` of the recorded draw, "drawn"). Its mean starts at zero, where the served policy acts
as it does when evaluated from its flow's mean, so the run starts from the base exactly. Its encoder is the small
VLA's vision-language encoder, optionally initialised from the shipped base's (``encoder="base"``), which already
finds what an instruction names on the built-in tasks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flywheel.vla.model import NumpyWeights, VisionLanguageEncoder, VLAConfig
from flywheel.vla.tokenizer import Tokenizer


class NoisePolicy(NumpyWeights, nn.Module):
    action_head = "flow"  # PPO credits its draws as it credits a Gaussian around a flow ("drawn", noise_at=output)
    capabilities = frozenset({"log_prob"})

    def __init__(self, cfg: VLAConfig):
        """``cfg``: the encoder's shape, and in ``chunk`` and ``action_dim`` the shape of the served sampler's noise."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.max_tokens)
        self.encoder = VisionLanguageEncoder(cfg, self.tokenizer.vocab_size)
        self.mean = nn.Linear(self.encoder.out_dim, cfg.chunk * cfg.action_dim)
        nn.init.zeros_(self.mean.weight)
        nn.init.zeros_(self.mean.bias)

    @property
    def chunk(self) -> int:
        return self.cfg.chunk

    @property
    def action_dim(self) -> int:
        return self.cfg.action_dim

    @property
    def sensors(self) -> tuple[str, ...]:
        return tuple(self.cfg.sensors)

    @property
    def device(self) -> torch.device:
        return self.mean.weight.device

    @property
    def feature_dim(self) -> int:
        return self.encoder.out_dim

    def token_ids(self, instructions: list[str]) -> np.ndarray:
        return self.tokenizer(instructions)[0]

    def context(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.encoder(images, ids, proprio)

    @torch.no_grad()
    def features(self, images: np.ndarray, ids: np.ndarray, proprio: np.ndarray) -> torch.Tensor:
        return self.encoder.contexts(images, ids, proprio)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def noise_mean(self, ctx: torch.Tensor) -> torch.Tensor:
        """(B, D) -> the mean starting noise (B, C, A)."""
        return self.mean(ctx).view(-1, self.cfg.chunk, self.cfg.action_dim)

    def imitation_loss(self, ctx: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor | None = None,
                       indicator: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """There is nothing to imitate in noise space: the pull back toward the served policy's own behaviour
        (mean zero), which is what an anchor to the demonstrations keeps (``learner.anchor``)."""
        per_sample = self.noise_mean(ctx).pow(2).mean(dim=(1, 2))
        return per_sample.mean() if weights is None else (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)

    def log_prob(self, ctx: torch.Tensor, recorded: dict[str, torch.Tensor], flow_noise: float = 0.0) -> torch.Tensor:
        """log N(drawn; mean(ctx), flow_noise^2) per number (B, C, A)."""
        if flow_noise <= 0:
            raise ValueError("the noise policy's draws have a log-probability only with learner.flow_noise > 0")
        return torch.distributions.Normal(self.noise_mean(ctx), flow_noise).log_prob(recorded["drawn"])

    @torch.no_grad()
    def draw(self, images: np.ndarray, proprio: np.ndarray, instructions: list[str], std: float,
             generator: torch.Generator | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(noise (B, C, A), what to record: the draw and its log-probability where ``std`` > 0; the mean where 0)."""
        ids = self.tokenize(instructions)
        mean = self.noise_mean(self.context(torch.from_numpy(images).to(self.device), ids,
                                            torch.from_numpy(np.asarray(proprio, np.float32)).to(self.device))).cpu()
        if std <= 0:
            return mean.numpy(), {}
        drawn = mean + std * torch.randn(mean.shape, generator=generator)
        logp = torch.distributions.Normal(mean, std).log_prob(drawn)
        return drawn.numpy(), {"drawn": drawn.numpy(), "logp": logp.numpy()}
