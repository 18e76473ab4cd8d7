"""A learned success detector: the last frame of an episode + its instruction -> P(success).

It reuses the VLA's vision-language encoder (instruction tokens cross-attending over image patches), because judging
"is the *red* block on the *green* pad" is the same grounding problem as acting on it. It has no proprioception
input: it judges what the camera shows, as it would on a robot.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from flywheel.contracts import Episode
from flywheel.vla.model import VisionLanguageEncoder, VLAConfig
from flywheel.vla.tokenizer import Tokenizer


@dataclasses.dataclass
class DetectorConfig:
    image_size: int = 64
    patch: int = 8
    dim: int = 64
    heads: int = 4
    ground_layers: int = 2
    trunk_layers: int = 1
    max_tokens: int = 12


class DetectorNet(nn.Module):
    def __init__(self, cfg: DetectorConfig | None = None):
        super().__init__()
        self.cfg = cfg or DetectorConfig()
        c = self.cfg
        enc_cfg = VLAConfig(
            image_size=c.image_size, patch=c.patch, dim=c.dim, heads=c.heads, ground_layers=c.ground_layers,
            trunk_layers=c.trunk_layers, max_tokens=c.max_tokens,
        )
        self.tokenizer = Tokenizer(c.max_tokens)
        self.encoder = VisionLanguageEncoder(enc_cfg, self.tokenizer.vocab_size, use_proprio=False)
        self.head = nn.Sequential(nn.Linear(self.encoder.out_dim, c.dim), nn.GELU(), nn.Linear(c.dim, 1))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """images uint8 (B,H,W,3), ids int64 (B,L) -> success logits (B,)."""
        return self.head(self.encoder(images, ids)).squeeze(-1)


class LearnedSuccessDetector:
    """The ``SuccessDetector`` contract: a frozen DetectorNet, its version and its decision threshold."""

    def __init__(self, net: DetectorNet, version: str, threshold: float = 0.5):
        self.net = net.eval()
        self.version = version
        self.threshold = float(threshold)

    @torch.no_grad()
    def score_frames(self, frames: np.ndarray, instructions: list[str], batch: int = 256) -> np.ndarray:
        out = []
        for i in range(0, len(frames), batch):
            ids, _ = self.net.tokenizer(instructions[i : i + batch])
            logits = self.net(torch.from_numpy(frames[i : i + batch]), torch.from_numpy(ids))
            out.append(torch.sigmoid(logits).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def score(self, episodes: list[Episode]) -> np.ndarray:
        frames = np.stack([ep.observations["image"][-1] for ep in episodes]) if episodes else np.zeros((0,))
        return self.score_frames(frames, [ep.instruction for ep in episodes])
