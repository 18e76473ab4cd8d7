"""The built-in small VLA: camera image + instruction + proprioception -> a chunk of continuous actions.

One module both sides import: actors run it, the learner trains it, and the success detector reuses its
vision-language encoder.

Architecture (sizes for the defaults; B batch, N = (64/4)^2 = 256 patches, L = 12 tokens, d = 64):

    image uint8 (B,64,64,3) + xy coordinate planes --conv 4x4/4--> patch tokens (B,N,d) (+ depthwise 3x3 context)
    instruction --Tokenizer--> ids (B,L) --embedding + 1 self-attention layer--> text tokens (B,L,d)
    proprio (B,3) --linear--> one proprio token
    grounding:  [text tokens, proprio token] cross-attend over the patch tokens (x2)   <- instruction picks objects
    trunk:      self-attention over [cls, grounded tokens] (x2)                       -> context (B,2d)
    action expert (flow matching): MLP(context, noisy chunk, t) -> velocity (B,C,A)
      or action tokens (action_head="tokens"): MLP(context) -> logits over bins (B,C,A,bins), exact log-probs

Why grounding by cross-attention: a quick trial found that FiLM conditioning with spatial-softmax keypoints fitted
its demonstrations but ignored the colour words on new layouts; a colour word needs a way to *look up* where the
object of that colour is. A text token's query matches the patches of its object, and the values it reads back
carry their position (learned position embeddings plus the coordinate planes fed to the patch conv).

Flow matching (as in pi0's action expert): x_t = t*a + (1-t)*eps, the head regresses v = a - eps, and sampling
integrates dx/dt = v from pure noise at t=0 to an action chunk at t=1 in ``flow_steps`` Euler steps.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flywheel.checkpoint import numpy_state
from flywheel.contracts import Sampling, image_channels
from flywheel.vla.tokenizer import Tokenizer


@dataclasses.dataclass
class VLAConfig:
    """Shape of the small VLA. Stored beside every checkpoint; a checkpoint only loads into the same shape."""

    image_size: int = 64
    patch: int = 8  # patch side in pixels
    dim: int = 64  # token width
    heads: int = 4
    ground_layers: int = 2  # cross-attention blocks: text/proprio tokens over image patches
    trunk_layers: int = 2
    max_tokens: int = 12
    proprio_dim: int = 3
    chunk: int = 8  # C: actions per predicted chunk
    action_dim: int = 3  # A
    head_hidden: int = 256
    flow_steps: int = 10  # Euler steps when sampling
    action_head: str = "flow"  # "flow" (pi0-style action expert) or "tokens" (RT-2 / OpenVLA-style action bins)
    bins: int = 64  # tokens: bins per action dimension, evenly spaced over [-1, 1]
    sensors: tuple[str, ...] = ("overhead",)  # what it reads (flywheel/contracts.py sensor_inputs)
    frames: int = 1  # frames stacked on the image's channels, newest first (the detector judges a window of them)
    subtask_head: bool = False  # π0.5-style: name the next subtask in words (SubtaskHead), then act on those words

    def __post_init__(self):
        self.sensors = tuple(self.sensors)  # a checkpoint's metadata stores a list
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"action_head={self.action_head!r} is unknown: choose one of {ACTION_HEADS}")


ACTION_HEADS = ("flow", "tokens")


class GroundingBlock(nn.Module):
    """Queries attend over image patches, then over each other, then an MLP (pre-norm residual).

    Besides the usual attention read-out, each head also returns where it looked: the attention-weighted mean of
    the patch centres, a language-conditioned keypoint. Acting is mostly "move from here to there", so handing the
    trunk explicit coordinates makes grounding much faster to learn than recovering them from value vectors.
    """

    def __init__(self, d: int, heads: int, patch_xy: torch.Tensor):
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.ln_q, self.ln_kv, self.ln_s, self.ln_m = (nn.LayerNorm(d) for _ in range(4))
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.where = nn.Linear(2 * heads, d)
        self.register_buffer("patch_xy", patch_xy, persistent=False)  # (N, 2) patch centres in [-0.5, 0.5]
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, patches: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, lq, d = x.shape
        q = self.q(self.ln_q(x)).view(b, lq, self.heads, self.dh).transpose(1, 2)  # (B,h,Lq,dh)
        k, v = self.kv(self.ln_kv(patches)).view(b, -1, 2, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)  # (B,h,Lq,N)
        read = (attn @ v).transpose(1, 2).reshape(b, lq, d)
        where = (attn @ self.patch_xy).transpose(1, 2).reshape(b, lq, 2 * self.heads)  # keypoints (B,Lq,2h)
        x = x + self.o(read) + self.where(where)
        h = self.ln_s(x)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.ln_m(x))


LOGIT_SCALE_INIT = 8.0


class PixelKeypoints(nn.Module):
    """Language-conditioned spatial softmax over a fine pixel grid.

    Each query token, per head, scores every cell of the image pooled 2x2 (32x32 cells for a 64x64 image; keys
    from each cell's colour only, so that attention cannot latch onto positions) and returns the expected cell
    position under the softmax: a precise keypoint for "the red block" at little cost. Patch attention alone
    localises only to a patch (8 px = 0.125 of the table), coarser than a grasp needs. Because keys come from
    colours alone, a scene of few colours is computed per colour rather than per cell (``colour_groups``).
    """

    RETRY_AFTER = 64  # calls after a batch of too many colours before the next check

    def __init__(self, d: int, heads: int, in_channels: int, key_dim: int = 16):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        # Calls left before grouping is tried again. Inputs that have too many colours keep having them (a textured
        # scene; the detector's window of 3 frames from two cameras, one of them moving: 1,344-2,101 in a batch of 64
        # against 1,024 cells an image), and the check would cost them ~5% of a step at every call (bench/RESULTS.md,
        # the detector's keypoint layer). Grouped or not, the function is the same to float rounding.
        self._skip = 0
        # Linear layers per cell (not 1x1 convs: those are several times slower on CPU at this width).
        self.keys = nn.Sequential(nn.Linear(in_channels - 2, 32), nn.GELU(), nn.Linear(32, heads * key_dim))
        self.q = nn.Linear(d, heads * key_dim)
        self.out = nn.Linear(2 * heads, d)
        self.ln = nn.LayerNorm(d)
        self.ln_k = nn.LayerNorm(heads * key_dim)
        # A softmax over ~1,000 cells starts out uniform, and then each object cell gets ~1/1000 of the gradient:
        # learning to find anything is slow. A large learnable logit scale lets attention sharpen from the start.
        self.log_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE_INIT)))

    def forward(self, x: torch.Tensor, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B,Lq,d), pixels (B,C,H,W), the last two channels the x/y planes -> (x + keypoint features,
        keypoints (B, Lq*2*heads))."""
        b, lq, _ = x.shape
        cells = cell_means(pixels)  # (B,HW/4,C), cells in row-major order
        xy, colour = cells[..., -2:], cells[..., :-2]  # (B,HW/4,2) cell centres; the colours keys are made from
        q = self.q(self.ln(x)).view(b, lq, self.heads, self.key_dim)
        q = q * (self.log_scale.exp() / math.sqrt(self.key_dim))
        groups = None
        if self._skip:
            self._skip -= 1
        elif (groups := colour_groups(colour, limit=colour.shape[1])) is None:
            self._skip = self.RETRY_AFTER
        if groups is not None:  # few colours (a flat-shaded scene): attend over colours, not cells
            palette, inverse = groups
            k = self.ln_k(self.keys(palette)).view(-1, self.heads, self.key_dim)  # (U,h,k)
            # A cell's logit depends on its colour alone, so the softmax over cells sums to one over colours, each
            # weighted by how many cells have it, and the keypoint is the mean position of each colour's cells under
            # that: the same function, computed on ~100 colours instead of 1,024 cells (bench/keypoint_colours.py).
            count = xy.new_zeros(b, len(palette)).scatter_add_(1, inverse, torch.ones_like(inverse, dtype=xy.dtype))
            centre = xy.new_zeros(b, len(palette), 2).scatter_add_(1, inverse[..., None].expand(-1, -1, 2), xy)
            centre = centre / count.clamp_min(1.0)[..., None]  # (B,U,2): where each colour is, on average
            logits = torch.einsum("blhk,uhk->bhlu", q, k) + count.log()[:, None, None]  # absent colours: -inf
            where = (torch.softmax(logits, dim=-1) @ centre[:, None]).permute(0, 2, 1, 3).reshape(b, lq, 2 * self.heads)
            return x + self.out(where), where.flatten(1)
        k = self.ln_k(self.keys(colour)).view(b, -1, self.heads, self.key_dim)  # (B,HW/4,h,k)
        # One head at a time: each head's keys are a strided view that a matmul reads as it is. All heads at once
        # need the keys transposed to (B,h,k,HW/4), a copy, and its gradient another (measured: ~10% of this layer).
        where = torch.stack([torch.softmax(q_h @ k_h.transpose(1, 2), dim=-1) @ xy  # (B,Lq,HW/4) @ (B,HW/4,2)
                             for q_h, k_h in zip(q.unbind(2), k.unbind(2))], dim=2).reshape(b, lq, 2 * self.heads)
        return x + self.out(where), where.flatten(1)


def cell_means(pixels: torch.Tensor) -> torch.Tensor:
    """The mean of each 2x2 cell, pixels (B,C,H,W) laid out channels-last (``VisionLanguageEncoder.pixels``) ->
    (B,HW/4,C), cells in row-major order. Four strided adds on the channels-last memory: 2.9x faster than
    ``avg_pool2d`` and the copy that permutes its output (0.13 against 0.36 ms for 16 images; the same means to
    1e-7)."""
    b, c, h, w = pixels.shape
    x = pixels.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c)
    return ((x[:, :, 0, :, 0] + x[:, :, 0, :, 1]) + (x[:, :, 1, :, 0] + x[:, :, 1, :, 1])).mul_(0.25).flatten(1, 2)


LEVELS = 4 * 255  # a 2x2 cell of uint8 pixels: its mean colour is one of 1,021 levels per channel


@torch.no_grad()
def colour_groups(colour: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The distinct colours of a batch of 2x2 cells (pixels as ``VisionLanguageEncoder.pixels`` makes them from uint8
    images, so each channel of a cell is one of ``LEVELS + 1`` levels), or None when there are more than ``limit``.

    colour (B,N,C) -> (palette (U,C), inverse (B,N) int64): ``palette[inverse]`` is ``colour``.
    Exact: the channels are packed into 1-D integer keys, as many as an int64 holds (six, then four a pass), and
    numbered by ``torch.unique`` (along a dimension it is ~100x slower than on a 1-D key). It stops as soon as the
    count passes ``limit``, so a textured scene costs one pass."""
    b, n, c = colour.shape
    flat = colour.reshape(b * n, c)
    ids, bound, ch = torch.zeros(b * n, dtype=torch.int64, device=colour.device), 1, 0
    while ch < c:  # pack as many channels into one int64 key as fit, then renumber the keys 0..distinct-1
        while ch < c and bound * (LEVELS + 1) < 2**62:
            code = torch.round((flat[:, ch] + 0.5) * LEVELS).to(torch.int64)  # per channel: a textured scene
            ids, bound, ch = ids * (LEVELS + 1) + code, bound * (LEVELS + 1), ch + 1  # converts only what it reads
        distinct, ids = torch.unique(ids, return_inverse=True)
        if len(distinct) > limit:
            return None
        bound = len(distinct)
    first = torch.full((len(distinct),), b * n, dtype=torch.int64, device=colour.device)
    first = first.scatter_reduce_(0, ids, torch.arange(b * n, device=colour.device), "amin")  # a cell of each colour
    return flat[first], ids.view(b, n)


class VisionLanguageEncoder(nn.Module):
    """image uint8 (B,H,W,channels of cfg.sensors) + token ids (B,L) + proprio (B,P[+touch]) or None -> context."""

    def __init__(self, cfg: VLAConfig, vocab_size: int, use_proprio: bool = True):
        super().__init__()
        d, n_side = cfg.dim, cfg.image_size // cfg.patch
        channels = image_channels(cfg.sensors) * cfg.frames
        self.sensors = cfg.sensors
        self.use_proprio = use_proprio
        self.patchify = nn.Conv2d(channels + 2, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.context = nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d)
        self.patch_pos = nn.Parameter(torch.randn(1, n_side * n_side, d) * 0.02)
        coords = (torch.arange(cfg.image_size, dtype=torch.float32) + 0.5) / cfg.image_size - 0.5
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        self.register_buffer("coord_planes", torch.stack([xx, yy], dim=-1)[None], persistent=False)  # (1,H,W,2)
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.tok_pos = nn.Parameter(torch.randn(1, cfg.max_tokens, d) * 0.02)
        self.text = nn.TransformerEncoderLayer(d, cfg.heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        proprio_dim = cfg.proprio_dim + ("touch" in cfg.sensors)
        self.proprio = nn.Linear(proprio_dim, d) if use_proprio else None
        self.keypoints = PixelKeypoints(d, cfg.heads, channels + 2)
        centres = (torch.arange(n_side, dtype=torch.float32) + 0.5) / n_side - 0.5
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        patch_xy = torch.stack([gx.flatten(), gy.flatten()], dim=-1)
        self.ground = nn.ModuleList(GroundingBlock(d, cfg.heads, patch_xy) for _ in range(cfg.ground_layers))
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.trunk = nn.TransformerEncoder(layer, cfg.trunk_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(2 * d)
        # Context = [cls, proprio token] (normalised) + every keypoint + raw proprio: the keypoints also reach the
        # heads directly. Through the trunk alone they arrive slowly (a probe: position MSE 0.014 after 600 steps
        # via the trunk, 0.0003 straight from the keypoints).
        queries = cfg.max_tokens + (1 if use_proprio else 0)
        self.out_dim = 2 * d + queries * 2 * cfg.heads + (proprio_dim if use_proprio else 0)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B,H,W,C) -> float (B,C+2,H,W) in [-0.5, 0.5], with x/y coordinate planes appended.

        Channels-last in memory (a (B,H,W,C+2) tensor, permuted): the patch convolution and the pooling run on it
        2-5x faster than on the usual layout, the more so the more channels (a detector's window of frames from two
        cameras has 20): bench/encoder_layout.py; bench/RESULTS.md, the encoder's memory layout."""
        b, h, w, c = images.shape
        out = self.coord_planes.new_empty(b, h, w, c + 2)  # written in place: one pass, not three (~9x faster)
        out[..., :c] = images.float().div_(255.0).sub_(0.5)  # on contiguous memory: 2.4x faster than in place
        out[..., c:] = self.coord_planes
        return out.permute(0, 3, 1, 2)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.patchify(pixels))
        x = x + self.context(x)
        return x.permute(0, 2, 3, 1).flatten(1, 2) + self.patch_pos  # (B,N,d), patches in row-major order

    @torch.no_grad()
    def contexts(self, images: np.ndarray, ids: np.ndarray, proprio: np.ndarray, batch: int = 512) -> torch.Tensor:
        """The context of many samples (numpy in, one row each; no grad; in batches; on the encoder's device): the
        features a learner caches from a frozen encoder."""
        dev = self.cls.device
        return torch.cat([
            self(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(dev),
                 torch.from_numpy(ids[i : i + batch]).to(dev),
                 torch.from_numpy(np.asarray(proprio[i : i + batch], np.float32)).to(dev))
            for i in range(0, len(images), batch)
        ])

    def forward(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor | None = None) -> torch.Tensor:
        pixels = self.pixels(images)
        patches = self.patches(pixels)
        pad = ids == 0
        tokens = self.tok_emb(ids) + self.tok_pos[:, : ids.shape[1]]
        tokens = self.text(tokens, src_key_padding_mask=pad)
        if self.proprio is not None:
            tokens = torch.cat([tokens, self.proprio(proprio)[:, None]], dim=1)
            pad = torch.cat([pad, torch.zeros_like(pad[:, :1])], dim=1)
        tokens, where = self.keypoints(tokens, pixels)
        for block in self.ground:
            tokens = block(tokens, patches, pad)
        b = ids.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1)
        pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        x = self.trunk(x, src_key_padding_mask=pad)
        if self.proprio is not None:
            last = x[:, -1]
        else:  # mean over the real text tokens
            keep = (~pad[:, 1:]).float().unsqueeze(-1)
            last = (x[:, 1:] * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        parts = [self.out_norm(torch.cat([x[:, 0], last], dim=-1)), where]
        if self.proprio is not None:
            parts.append(proprio - 0.5)
        return torch.cat(parts, dim=-1)


def time_features(t: torch.Tensor, n: int = 16) -> torch.Tensor:
    """Sinusoidal features of the flow time t in [0, 1]: (B,) -> (B, n)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), n // 2, device=t.device))
    angles = t[:, None] * freqs[None] * math.pi
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FlowActionHead(nn.Module):
    """The action expert: (context, noisy chunk x_t, t) -> velocity, all chunks flattened to C*A."""

    def __init__(self, cfg: VLAConfig, ctx_dim: int):
        super().__init__()
        self.flat = cfg.chunk * cfg.action_dim
        h = cfg.head_hidden
        self.inp = nn.Linear(ctx_dim + self.flat + 16, h)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.GELU()) for _ in range(2))
        self.out = nn.Linear(h, self.flat)

    def forward(self, ctx: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(self.given(ctx), x_t, time_features(t))

    def given(self, ctx: torch.Tensor) -> torch.Tensor:
        """The input layer's part that reads the context (its bias included): the same at every Euler step of a
        chunk, so sampling computes it once rather than ``flow_steps`` times (bench/RESULTS.md, the rollout step
        profiled)."""
        return F.linear(ctx, self.inp.weight[:, : ctx.shape[-1]], self.inp.bias)

    def velocity(self, given: torch.Tensor, x_t: torch.Tensor, t_features: torch.Tensor) -> torch.Tensor:
        """The velocity at x_t from ``given(ctx)`` and ``time_features(t)``."""
        rest = self.inp.weight[:, self.inp.in_features - self.flat - t_features.shape[-1]:]
        h = F.gelu(given + F.linear(torch.cat([x_t.flatten(1), t_features], dim=-1), rest))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view_as(x_t)


class TokenActionHead(nn.Module):
    """Discrete action tokens (RT-2 / OpenVLA style): each of the chunk's C*A numbers is one of ``bins`` evenly
    spaced values in [-1, 1], and the head gives every one of them a categorical distribution from the context.

    Decoded in parallel (as OpenVLA-OFT does), not one token after another: one forward pass per chunk, and the
    chunk's log-probability is exactly the sum of its tokens' log-softmaxes, which is what PPO needs. The price is
    that the tokens of a chunk are independent given the context: it cannot represent two distinct ways of acting in
    the same state as the flow head can (scripted demonstrations rarely have two)."""

    def __init__(self, cfg: VLAConfig, ctx_dim: int):
        super().__init__()
        self.shape, self.bins = (cfg.chunk, cfg.action_dim), cfg.bins
        h = cfg.head_hidden
        self.inp = nn.Linear(ctx_dim, h)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.GELU()) for _ in range(2))
        self.out = nn.Linear(h, cfg.chunk * cfg.action_dim * cfg.bins)
        self.register_buffer("centres", torch.linspace(-1.0, 1.0, cfg.bins), persistent=False)

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        """-> logits (B, C, A, bins)."""
        h = F.gelu(self.inp(ctx))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view(ctx.shape[0], *self.shape, self.bins)

    def tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions (B, C, A) in [-1, 1] -> the index of the nearest bin (B, C, A)."""
        return ((actions.clamp(-1.0, 1.0) + 1.0) / 2.0 * (self.bins - 1)).round().long()

    def log_prob(self, logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Exact log-probability of each token (B, C, A) under ``logits`` (B, C, A, bins): actions are binned first.
        A chunk's is their sum."""
        return logits.log_softmax(-1).gather(-1, self.tokens(actions)[..., None]).squeeze(-1)

    def soft_targets(self, actions: torch.Tensor, sigma_bins: float = 0.75) -> torch.Tensor:
        """Actions (B, C, A) -> target distributions over the bins (B, C, A, bins): a Gaussian around each action,
        sigma 0.75 bin widths, integrated over each bin (HL-Gauss, Farebrother et al. 2024, "Stop Regressing").
        Neighbouring bins share the credit, so cloning learns that bin 30 is nearly right where bin 0 is far off; a
        one-hot target treats both as equally wrong, and the small VLA did not reach a single success after 2,500
        steps with it."""
        width = 2.0 / (self.bins - 1)
        edges = torch.cat([self.centres - width / 2, self.centres[-1:] + width / 2])
        edges[0], edges[-1] = -float("inf"), float("inf")  # the end bins take the tails
        cdf = torch.special.ndtr((edges - actions.clamp(-1.0, 1.0)[..., None]) / (sigma_bins * width))
        return cdf[..., 1:] - cdf[..., :-1]


class ResidualHead(nn.Module):
    """A Gaussian correction of the sampled chunk, learned by RL (learner/residual_ppo.py), the VLA frozen.

    From the context and the flow's chunk it gives r = (log-gain, offset per action dim): the chunk's movement dims
    are scaled by exp(log-gain) and shifted by their offsets, the gripper (the last dim) shifted by its own. The last
    layer starts at zero, so a VLA with an untrained residual acts exactly as without one. ``log_std`` is the
    exploration noise of each of the R = A + 1 numbers."""

    def __init__(self, cfg: VLAConfig, ctx_dim: int, hidden: int = 128):
        super().__init__()
        self.dim = cfg.action_dim + 1
        self.net = nn.Sequential(nn.Linear(ctx_dim + cfg.chunk * cfg.action_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, self.dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.log_std = nn.Parameter(torch.full((self.dim,), math.log(0.1)))

    def forward(self, ctx: torch.Tensor, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mean (B, R), std (R,))."""
        return self.net(torch.cat([ctx, chunk.flatten(1)], dim=-1)), self.log_std.exp()

    @staticmethod
    def apply(chunk: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        move = chunk[..., :-1] * r[:, None, :1].exp() + r[:, None, 1:-1]
        grip = chunk[..., -1:] + r[:, None, -1:]
        return torch.cat([move, grip], dim=-1).clamp(-1.0, 1.0)

    def log_prob(self, ctx: torch.Tensor, chunk: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        mean, std = self(ctx, chunk)
        return torch.distributions.Normal(mean, std).log_prob(r).sum(-1)


class SubtaskHead(nn.Module):
    """π0.5's high level, small: from the context of (observation, task instruction), the next subtask's text, one
    word at a time over the instruction vocabulary (a GRU whose state starts from the context). ``<pad>`` ends the
    text. Autoregressive, so that the words agree with each other: with two blocks left to sort, "put the red block
    in the" is followed by "red", where independent word classifiers could each pick a different block.

    Each word is generated or copied from the task instruction (a pointer-generator): the context holds where the
    named objects are rather than which words named them, and copying lets "open the green drawer" come out of "put
    the red block in the green drawer and close it" for colour pairs never narrated (a generator alone memorised
    the pairs of its demonstrations: 0.02 of held-out steps named right, against 0.71 of its training steps)."""

    def __init__(self, ctx_dim: int, vocab: int, max_len: int, patch_dim: int, hidden: int = 128):
        super().__init__()
        self.max_len = max_len
        self.start = nn.Linear(ctx_dim, hidden)
        self.embed = nn.Embedding(vocab + 1, hidden)  # the last row is the start-of-text token
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.look_q, self.look_kv = nn.Linear(hidden, hidden), nn.Linear(patch_dim, 2 * hidden)
        self.out = nn.Linear(hidden, vocab)
        self.key_pos = nn.Parameter(torch.randn(1, max_len, hidden) * 0.02)  # which word of the instruction
        self.copy_gate = nn.Linear(hidden, 1)

    def _look(self, states: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Each state (B, S, H) plus what it reads from the image's patches (B, N, patch_dim): a colour word of "put
        each block in its bowl" is read off the blocks still out of their bowls, which the context (where the
        instruction's words point) does not say."""
        k, v = self.look_kv(patches).chunk(2, dim=-1)
        attn = torch.softmax(self.look_q(states) @ k.transpose(1, 2) / math.sqrt(k.shape[-1]), dim=-1)
        return states + attn @ v

    def _words(self, states: torch.Tensor, task_ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """log p of every vocabulary word (B, S, vocab), from the GRU's states (B, S, hidden): a mixture of the
        generator's softmax and attention over the instruction's words (their embeddings plus positions)."""
        states = self._look(states, patches)
        keys = self.embed(task_ids) + self.key_pos[:, : task_ids.shape[1]]  # (B, L, H)
        scores = torch.einsum("bsh,blh->bsl", states, keys) / math.sqrt(states.shape[-1])
        scores = scores.masked_fill((task_ids == 0)[:, None], float("-inf"))
        copy = torch.zeros(*states.shape[:2], self.out.out_features, device=states.device, dtype=states.dtype)
        copy = copy.scatter_add(2, task_ids[:, None].expand(-1, states.shape[1], -1), scores.softmax(-1))
        gate = torch.sigmoid(self.copy_gate(states))
        return torch.log(gate * self.out(states).softmax(-1) + (1 - gate) * copy + 1e-9)

    def log_probs(self, ctx: torch.Tensor, patches: torch.Tensor, task_ids: torch.Tensor, ids: torch.Tensor
                  ) -> torch.Tensor:
        """Teacher-forced: (B, L, vocab) log-probabilities of each word of ``ids`` (B, L) given the words before it."""
        bos = torch.full((ids.shape[0], 1), self.embed.num_embeddings - 1, dtype=ids.dtype, device=ids.device)
        states, _ = self.gru(self.embed(torch.cat([bos, ids[:, :-1]], 1)), torch.tanh(self.start(ctx))[None])
        return self._words(states, task_ids, patches)

    def loss(self, ctx: torch.Tensor, patches: torch.Tensor, task_ids: torch.Tensor, ids: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every word up to and including the ending ``<pad>``, averaged over the texts where
        ``mask`` (B,) is True."""
        per_word = -self.log_probs(ctx, patches, task_ids, ids).gather(2, ids[..., None])[..., 0]  # (B, L)
        ended = (ids == 0).long().cumsum(1)
        counted = (ended <= 1) & ((ids != 0) | (ended == 1))  # the words, and the first pad: the end of the text
        per_text = (per_word * counted).sum(1) / counted.sum(1).clamp_min(1)
        return (per_text * mask).sum() / mask.sum().clamp_min(1)

    @torch.no_grad()
    def decode(self, ctx: torch.Tensor, patches: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Greedy: the most likely word at each step, padded after the first ``<pad>`` -> int64 (B, L)."""
        b = ctx.shape[0]
        word = torch.full((b, 1), self.embed.num_embeddings - 1, dtype=torch.long, device=ctx.device)
        h, ids = torch.tanh(self.start(ctx))[None], []
        ended = torch.zeros(b, dtype=torch.bool, device=ctx.device)
        for _ in range(self.max_len):
            state, h = self.gru(self.embed(word), h)
            word = self._words(state, task_ids, patches).argmax(-1)
            ended = ended | (word[:, 0] == 0)
            ids.append(word[:, 0].masked_fill(ended, 0))
        return torch.stack(ids, 1)


@dataclasses.dataclass
class Draw:
    """How a VLA draws a chunk (``sample``'s keywords; ``VLAPolicy`` sets them from the snapshot's ``Sampling``)."""

    indicator: int = 0  # the advantage it is conditioned on: 0 none, 1 positive, 2 negative
    guidance: float = 1.0  # classifier-free guidance toward the indicator
    residual: str = "off"  # off | sample | mean: the residual head's correction
    greedy: bool = False  # action tokens: each one's most likely bin
    noise: float = 1.0  # the scale of the flow's starting draw (0: from its mean)
    flow_noise: float = 0.0  # a Gaussian draw's std, at each Euler step or of the chunk (noise_at)
    noise_at: str = "steps"  # steps | output
    start: torch.Tensor | None = None  # the flow's starting noise itself (B, C, A), instead of a draw
    subtask: bool = True  # with a subtask head: act on the subtask it names (False: on the task instruction itself)
    told: torch.Tensor | None = None  # with a subtask head: (B, L) words a person said, acted on in the rows where
    #                                   they are not all padding instead of the head's (verbal coaching)

    def __post_init__(self):
        if self.noise_at not in ("steps", "output"):
            raise ValueError(f"noise_at={self.noise_at!r}: choose steps (each Euler step draws) or output (the chunk "
                             f"does)")


class NumpyWeights:
    """What every VLA here shares besides its network: weights in and out as numpy arrays (``share`` without a copy,
    for a model that only acts), and its instructions as token ids on its device."""

    def tokenize(self, instructions: list[str], device: torch.device | None = None) -> torch.Tensor:
        return torch.from_numpy(self.token_ids(instructions)).to(device or self.device)

    def get_weights(self) -> dict[str, np.ndarray]:
        return numpy_state(self)

    def share(self, weights: dict[str, np.ndarray]) -> None:
        share_weights(self, weights)

    def load_weights(self, weights: dict[str, np.ndarray], strict: bool = True):
        """Load every weight (a missing or unexpected one is an error naming it; with ``strict=False``, the names
        missing and unexpected are returned instead)."""
        return self.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=strict)


class SmallVLA(NumpyWeights, nn.Module):
    """flywheel's own VLA, a ``TrainablePolicy`` (flywheel/contracts.py) with every capability: exact log-probabilities
    of its draws, RECAP's advantage indicator, a residual head, and privileged auxiliary supervision."""

    capabilities = frozenset({"log_prob", "indicator", "residual", "aux"})

    def __init__(self, cfg: VLAConfig | None = None):
        super().__init__()
        self.cfg = cfg or VLAConfig()
        self.tokenizer = Tokenizer(self.cfg.max_tokens)
        self.encoder = VisionLanguageEncoder(self.cfg, self.tokenizer.vocab_size)
        self.head = (FlowActionHead if self.cfg.action_head == "flow" else TokenActionHead)(self.cfg,
                                                                                             self.encoder.out_dim)
        # Auxiliary grounding head: predicts the named block's and target's (x, y) from the context. Trained only
        # where an episode carries them (scripted demonstrations in simulation); unused when acting.
        self.aux_head = nn.Linear(self.encoder.out_dim, 4)
        # RECAP-style advantage indicator added to the context: 0 = none, 1 = positive, 2 = negative. Zero at
        # first, so it changes nothing for a checkpoint trained without it.
        self.indicator = nn.Embedding(3, self.encoder.out_dim)
        nn.init.zeros_(self.indicator.weight)
        with torch.random.fork_rng(devices=[]):  # drawn aside: the global stream (pretraining's noise) is unchanged
            torch.manual_seed(0)
            self.residual = ResidualHead(self.cfg, self.encoder.out_dim)
            # π0.5's high level (SubtaskHead), where the shape asks for one: the low level then acts on its words
            self.subtasker = SubtaskHead(self.encoder.out_dim, self.tokenizer.vocab_size, self.cfg.max_tokens,
                                         self.cfg.dim) if self.cfg.subtask_head else None
        if self.subtasker is not None:
            self.capabilities = self.capabilities | {"subtask"}

    # ---- the TrainablePolicy contract --------------------------------------------------------------------------

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
    def action_head(self) -> str:
        return self.cfg.action_head

    @property
    def device(self) -> torch.device:
        return self.encoder.cls.device

    @property
    def feature_dim(self) -> int:
        return self.encoder.out_dim

    @property
    def noise_shape(self) -> tuple[int, int]:
        """The flow's starting noise per observation (what ``sample(start=)`` takes)."""
        return self.cfg.chunk, self.cfg.action_dim

    def token_ids(self, instructions: list[str]) -> np.ndarray:
        """int64 (B, L): the instructions as its tokenizer reads them."""
        return self.tokenizer(instructions)[0]

    def context(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """The backbone's context (B, D), with gradients."""
        return self.encoder(images, ids, proprio)

    @torch.no_grad()
    def features(self, images: np.ndarray, ids: np.ndarray, proprio: np.ndarray) -> torch.Tensor:
        """The backbone's context (B, D) of numpy inputs, in batches, without gradients."""
        return self.encoder.contexts(images, ids, proprio)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """What computes the context: frozen when a learner trains the action expert alone."""
        return [*self.encoder.parameters(), *self.aux_head.parameters()]

    def conditioning_parameters(self) -> list[nn.Parameter]:
        """The advantage indicator's embedding: a learner gives it a learning rate of its own."""
        return list(self.indicator.parameters())

    @torch.no_grad()
    def start_conditioning(self) -> None:
        """"Positive" and "negative" start as "none" when the base never learned them: conditioning on an untrained
        zero row would change how the base acts before any update."""
        rows = self.indicator.weight
        if not rows[1:].any():
            rows[1:] = rows[0]

    def auxiliary_loss(self, ctx: torch.Tensor, aux: torch.Tensor | None, aux_mask: torch.Tensor | None) -> torch.Tensor:
        """The regression of the named block's and target's true positions (B, 4) from the context, where known
        (``aux_mask`` (B,) True): privileged supervision that teaches the encoder to find what the instruction
        names far faster than the action loss alone (a pixel-only trial sat at 0% success after 1,500 steps where
        the same model given positions reached 46%)."""
        if aux is None or aux_mask is None or not bool(aux_mask.any()):
            return ctx.new_zeros(())
        err = (self.aux_head(ctx) - (aux - 0.5)).pow(2).mean(dim=1)
        return (err * aux_mask).sum() / aux_mask.sum()

    def subtask_loss(self, images: torch.Tensor, task_ids: torch.Tensor, proprio: torch.Tensor,
                     subtask_ids: torch.Tensor, mask: torch.Tensor, head_only: bool = False) -> torch.Tensor:
        """The subtask head's cross-entropy on the subtask texts ``subtask_ids`` (B, L) a demonstrator narrated (or a
        coach said), read from the observation and the task instruction ``task_ids``, weighted by ``mask`` (B,).
        ``head_only``: the trunk's context and patches without gradient, the head alone learning (48 ms a step of 64
        on 2 cores, against 109 ms through the trunk)."""
        if not bool(mask.any()):
            return images.new_zeros((), dtype=torch.float32)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not head_only):
            ctx, patches = self.context(images, task_ids, proprio), self.patches(images)
        return self.subtasker.loss(ctx, patches, task_ids, subtask_ids, mask)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """The image's patch tokens (B, N, dim), which the subtask head looks over."""
        return self.encoder.patches(self.encoder.pixels(images))

    @torch.no_grad()
    def name_subtasks(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """The subtask head's text for each observation and task instruction, as token ids (B, L)."""
        return self.subtasker.decode(self.encoder(images, ids, proprio), self.patches(images), ids)

    def subtask_texts(self, images: np.ndarray, proprio: np.ndarray, instruction: str) -> list[str]:
        """What the subtask head names at each of a batch of observations (``sensor_inputs``' arrays) of one task."""
        ids = self.name_subtasks(torch.from_numpy(images).to(self.device), self.tokenize([instruction] * len(images)),
                                 torch.from_numpy(proprio).float().to(self.device))
        return [self.tokenizer.decode(row.tolist()) for row in ids.cpu()]

    def action_loss(
        self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor, actions: torch.Tensor,
        weights: torch.Tensor | None = None, aux: torch.Tensor | None = None, aux_mask: torch.Tensor | None = None,
        indicator: torch.Tensor | None = None, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Behaviour-cloning loss for target chunks ``actions`` (B,C,A) from raw inputs: ``imitation_loss`` on the
        context, plus ``auxiliary_loss`` where ``aux`` positions are given."""
        ctx = self.context(images, ids, proprio)
        return self.imitation_loss(ctx, actions, weights, indicator, generator) + self.auxiliary_loss(ctx, aux, aux_mask)

    def imitation_loss(self, ctx: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor | None = None,
                  indicator: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The action head's loss alone, given the backbone's context (B, out_dim): what a learner with a frozen
        backbone trains on cached contexts. Flow: the flow-matching regression; tokens: each token's cross-entropy
        against a Gaussian over the bins around its action (``TokenActionHead.soft_targets``), averaged.
        ``generator`` (a CPU one): draws the flow's noise and times, so that a learner that checkpoints it resumes
        exactly; without one they come from torch's global stream."""
        # the context as sample() conditions it: no indicator is "none" (row 0, which pretraining learns)
        ctx = ctx + (self.indicator(indicator) if indicator is not None else self.indicator.weight[0])
        if self.cfg.action_head == "tokens":
            log_p = self.head(ctx).log_softmax(-1)
            per_sample = -(self.head.soft_targets(actions) * log_p).sum(-1).mean(dim=(1, 2))
            return per_sample.mean() if weights is None else \
                (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)
        if generator is None:  # the global stream (pretraining saves and restores it)
            noise = torch.randn_like(actions)
            t = torch.rand(actions.shape[0], device=actions.device)
        else:  # drawn on the CPU, as the generator is
            noise = torch.randn(actions.shape, generator=generator).to(actions.device)
            t = torch.rand(actions.shape[0], generator=generator).to(actions.device)
        x_t = t[:, None, None] * actions + (1 - t[:, None, None]) * noise
        per_sample = (self.head(ctx, x_t, t) - (actions - noise)).pow(2).mean(dim=(1, 2))
        if weights is None:
            return per_sample.mean()
        return (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)

    @torch.no_grad()
    def sample(self, images: torch.Tensor, ids: torch.Tensor, proprio: torch.Tensor,
               generator: torch.Generator | None = None, extras: dict | None = None, **how) -> torch.Tensor:
        """An action chunk (B,C,A) in [-1, 1]: the flow integrated from noise, or action tokens drawn from their
        categoricals (then ``extras``, if given, receives each token's exact log-probability, "logp" (B,C,A)), or with
        ``greedy`` each token's most likely bin. ``how``: ``Draw``'s fields.

        ``indicator`` conditions on an advantage (1 = positive); ``guidance`` > 1 applies classifier-free guidance,
        v = v_none + guidance * (v_indicator - v_none), pushing the actions further from what failed.
        ``noise`` scales the flow's starting noise: 1 samples the learned distribution, 0 follows the flow from its
        mean alone (one deterministic chunk per observation).
        ``flow_noise`` > 0 makes every Euler step a Gaussian draw around where the flow would go (flow-noise, as in
        piRL): x_{k+1} ~ N(x_k + dt v(x_k, t_k), flow_noise^2). The chunk then has an exact log-probability, the sum
        over steps of those Gaussians'; ``extras``, if given, receives the chain ("flow_chain" (B, K+1, C, A)) and
        each step's log-probability per number ("logp" (B, K, C, A)), which ``log_prob`` recomputes under
        other weights: what PPO on the flow VLA needs. With ``noise_at="output"`` the flow runs deterministically and
        only its chunk draws, x ~ N(flow(s), flow_noise^2): a Gaussian policy whose mean is the flow, with C*A numbers a
        chunk instead of K*C*A; ``extras`` then receives the draw before clamping ("drawn" (B, C, A)) and its
        log-probability per number ("logp" (B, C, A)).
        ``start`` (B, C, A): the flow's starting noise itself, rather than a draw scaled by ``noise`` (a served policy
        steered by DSRL is given it: flywheel/vla/noise.py).
        ``subtask`` (with a subtask head): the chunk is drawn for the subtask the head names from ``ids`` (then
        ``extras`` receives its token ids, "prompt" (B, L)), rather than for ``ids`` themselves; ``told`` (B, L),
        where a row is not all padding: for the words a person said instead (recorded as "prompt" the same way).
        ``residual`` = "sample" (or "mean") corrects the chunk with a draw from (or the mean of) the residual head;
        then ``extras``, if given, receives the flow's chunk ("base_chunks"), the draw ("residuals") and its
        log-probability ("residual_logp"): what an RL learner needs of every decision.
        """
        d = Draw(**how)
        if self.subtasker is not None and d.subtask:  # name the subtask, then act on it (its ids are recorded:
            named = self.name_subtasks(images, ids, proprio)  # a learner conditions on what the actions were drawn for)
            ids = named if d.told is None else torch.where((d.told != 0).any(1, keepdim=True), d.told, named)
            if extras is not None:
                extras.update(prompt=ids)
        ctx = self.encoder(images, ids, proprio)
        b, cfg = images.shape[0], self.cfg
        cond = ctx + self.indicator.weight[d.indicator]
        free = ctx + self.indicator.weight[0]
        if cfg.action_head == "tokens":
            logits = self.head(cond)
            if d.guidance != 1.0:
                free_logits = self.head(free)
                logits = free_logits + d.guidance * (logits - free_logits)
            idx = logits.argmax(-1) if d.greedy else \
                torch.multinomial(logits.softmax(-1).reshape(-1, cfg.bins), 1, generator=generator)
            x = self.head.centres[idx.view(b, cfg.chunk, cfg.action_dim)]
            if extras is not None:  # the exact log-probability of each token drawn: PPO's denominators
                extras.update(logp=self.head.log_prob(logits, x))
        else:
            x = self._integrate(cond, free, d, generator, extras).clamp(-1.0, 1.0)
        if d.residual == "off":
            return x
        mean, std = self.residual(ctx, x)
        r = mean + std * torch.randn(mean.shape, generator=generator) if d.residual == "sample" else mean
        if extras is not None:
            extras.update(base_chunks=x, residuals=r,
                          residual_logp=torch.distributions.Normal(mean, std).log_prob(r).sum(-1))
        return self.residual.apply(x, r)

    def _integrate(self, cond: torch.Tensor, free: torch.Tensor, d: "Draw", generator: torch.Generator | None,
                   extras: dict | None = None) -> torch.Tensor:
        """The flow head's chunk: Euler steps from noise (t=0) to actions (t=1), with classifier-free guidance, and
        with ``flow_noise`` a Gaussian draw at every step, or only of the chunk (``noise_at``; see ``sample``). Not
        clamped to the action range, so that a log-probability is that of the draw."""
        cfg = self.cfg
        shape = (cond.shape[0], cfg.chunk, cfg.action_dim)
        # from the mean (noise 0) nothing is drawn: the learner's recomputation must not consume the global stream
        if d.start is not None:
            x = d.start.to(cond.device, cond.dtype).view(shape)
        elif d.noise:
            x = d.noise * torch.randn(shape, generator=generator, device=cond.device)
        else:
            x = torch.zeros(shape, device=cond.device, dtype=cond.dtype)
        guidance, flow_noise = d.guidance, d.flow_noise
        step_noise = flow_noise if d.noise_at == "steps" else 0.0
        dt = 1.0 / cfg.flow_steps
        chain = [x]
        # what every step shares, computed once: the context's part of the input layer, and the steps' times
        given = self.head.given(cond)
        given_free = self.head.given(free) if guidance != 1.0 else None
        times = time_features(torch.arange(cfg.flow_steps, device=cond.device, dtype=cond.dtype) * dt)
        for k in range(cfg.flow_steps):
            t = times[k].expand(cond.shape[0], -1)
            v = self.head.velocity(given, x, t)
            if guidance != 1.0:
                v_free = self.head.velocity(given_free, x, t)
                v = v_free + guidance * (v - v_free)
            x = x + dt * v
            if step_noise > 0:
                x = x + step_noise * torch.randn(x.shape, generator=generator).to(x.device)
                chain.append(x)
        if flow_noise > 0 and d.noise_at == "output":
            mean, x = x, x + flow_noise * torch.randn(x.shape, generator=generator).to(x.device)
            if extras is not None:
                extras.update(drawn=x, logp=torch.distributions.Normal(mean, flow_noise).log_prob(x))
        elif step_noise > 0 and extras is not None:
            chain = torch.stack(chain, dim=1)
            extras.update(flow_chain=chain, logp=self._chain_log_prob(cond, chain, flow_noise))
        return x  # unclamped: sample() clamps what is executed

    def _chain_log_prob(self, ctx: torch.Tensor, chain: torch.Tensor, flow_noise: float) -> torch.Tensor:
        """log N(x_{k+1}; x_k + dt v(x_k, t_k), flow_noise^2) of each step of each number of a recorded flow chain
        (B, K+1, C, A) -> (B, K, C, A)."""
        b, steps = chain.shape[0], chain.shape[1] - 1
        dt = 1.0 / steps
        x = chain[:, :-1].flatten(0, 1)  # (B*K, C, A): every step of every chain in one pass of the head
        t = (torch.arange(steps, device=ctx.device, dtype=ctx.dtype) * dt).repeat(b)
        mean = x + dt * self.head(ctx.repeat_interleave(steps, dim=0), x, t)
        return torch.distributions.Normal(mean, flow_noise).log_prob(chain[:, 1:].flatten(0, 1)).view_as(chain[:, 1:])

    def log_prob(self, ctx: torch.Tensor, recorded: dict[str, torch.Tensor],
                          flow_noise: float = 0.0) -> torch.Tensor:
        """The exact log-probability, under these weights, of what a practice decision drew (what ``sample`` put in
        ``extras``, unconditioned: indicator 0, no guidance), per number: action tokens (B, C, A) from "chunks"; the
        flow with flow-noise at its steps, (B, K, C, A) from "flow_chain"; the flow with noise at its output, (B, C, A)
        from "drawn", the mean being the flow from its mean (starting noise 0), differentiated through every step.
        ``ctx`` is the encoder's context."""
        ctx = ctx + self.indicator.weight[0]  # "none", as sample() and imitation_loss() condition it
        if self.cfg.action_head == "tokens":
            return self.head.log_prob(self.head(ctx), recorded["chunks"])
        if flow_noise <= 0:
            raise ValueError("the flow's chunk has a log-probability only when sampled with flow_noise > 0")
        if "drawn" in recorded:
            mean = self._integrate(ctx, ctx, Draw(noise=0.0), None)
            return torch.distributions.Normal(mean, flow_noise).log_prob(recorded["drawn"])
        return self._chain_log_prob(ctx, recorded["flow_chain"], flow_noise)


class VLAPolicy:
    """The ``Policy`` contract around a SmallVLA, or any ``TrainablePolicy`` with the same ``sample``, ``tokenize``
    and ``share`` (π0: flywheel/vla/pi0_policy.py), in numpy at its edges (converted once here)."""

    def __init__(self, cfg: VLAConfig | None = None, model: Any = None, eval_noise: float | None = None):
        """``eval_noise``: the flow's starting noise when not exploring (evaluation, the gate), whatever the snapshot
        asks (``eval.noise``); None leaves it to the snapshot's sampling."""
        self.model = model or SmallVLA(cfg)
        self.eval_noise = eval_noise
        self.model.eval()
        self.sampling = Sampling()  # set per snapshot by the learner that made it
        self.last_extras: dict[str, np.ndarray] = {}  # what the last act() drew besides its actions, by row
        self.explore = False  # set by the rollout worker: True while collecting practice episodes
        self.subtasks = True  # with a subtask head: act on the subtask it names (False: on the task instruction)
        self.chunk = self.model.chunk
        self.action_dim = self.model.action_dim
        self.sensors = self.model.sensors  # what act() is given: contracts.sensor_inputs for these

    @property
    def names_subtasks(self) -> bool:
        """Whether it names a subtask before each chunk (a subtask head, in use): what a coach can correct."""
        return "subtask" in self.model.capabilities and self.subtasks

    def words(self, ids: np.ndarray) -> str:
        """The text of token ids (L,), such as a recorded "prompt" row."""
        return self.model.tokenizer.decode(np.asarray(ids, np.int64).tolist())

    def act(self, images: np.ndarray, proprio: np.ndarray, instructions: list[str], seed: int | None = None,
            noise: np.ndarray | None = None, told: list[str | None] | None = None):
        """``noise`` float32 (B, C, A): the flow's starting noise itself (what a DSRL noise policy picks, sent to
        ``flywheel serve`` in the protocol's ``noise`` field), for a flow head. ``told``: per row, the words a person
        said (verbal coaching), acted on instead of the subtask the head would name; None where they said nothing."""
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        ids = self.model.tokenize(instructions)
        extras: dict = {}
        s = self.sampling
        sampling = {"indicator": s.indicator, "guidance": s.guidance, "residual": s.residual, "noise": s.noise}
        if "subtask" in self.model.capabilities:
            sampling["subtask"] = self.subtasks
        if told is not None and any(t is not None for t in told):
            if not self.names_subtasks:
                raise ValueError("a person's words were given, but this policy names no subtasks to act on them: "
                                 "coaching needs a subtask head (VLAConfig.subtask_head)")
            sampling["told"] = self.model.tokenize([t or "" for t in told])
        if s.residual == "explore":  # draw corrections in practice; their mean in evaluation
            sampling["residual"] = "sample" if self.explore else "mean"
        if self.explore and self.model.action_head == "flow":
            sampling.update(noise=s.practice_noise, flow_noise=s.flow_noise, noise_at=s.noise_at)
        elif self.eval_noise is not None and self.model.action_head == "flow":
            sampling["noise"] = self.eval_noise
        if self.model.action_head == "tokens":
            # Action tokens are drawn in practice (PPO needs the draws and their probabilities) and decoded greedily
            # otherwise, as token VLAs are evaluated: each token drawn on its own, a chunk's gripper tokens would
            # let go of a block whenever one of them came up "open".
            sampling["greedy"] = not self.explore
        if noise is not None:
            if self.model.action_head != "flow":
                raise ValueError("a starting noise was given, but action tokens are drawn without one")
            sampling["start"] = torch.from_numpy(np.asarray(noise, np.float32))
        out = self.model.sample(torch.from_numpy(images), ids, torch.from_numpy(proprio).float(), generator=gen,
                                extras=extras, **sampling)
        self.last_extras = {k: v.numpy().astype(np.float32) for k, v in extras.items()}  # per row: recorded
        return out.numpy().astype(np.float32)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def load_weights(self, weights: dict[str, np.ndarray], sampling: Sampling | None = None) -> None:
        """All the weights, or the arrays that changed (a delta), shared rather than copied (``SmallVLA.share``):
        this copy of the policy only acts, so a snapshot in Ray's object store is used where it lies."""
        self.model.share(weights)
        self.sampling = sampling or Sampling()


@torch.no_grad()
def share_weights(module: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Make the named parameters and buffers the given arrays themselves, without a copy: for a model that only
    acts (a rollout worker), given a snapshot it will not write to. Arrays from Ray's object store are
    read-only shared memory; they stay pinned while the model holds them. A subset of the names (a delta)
    changes only those. Through copies an actor applies a 100M-parameter snapshot in ~109 ms; shared, 4 actors
    apply it in 8-16 ms in all, Ray calls included (bench/weight_sync.py)."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    unknown = sorted(set(weights) - set(tensors))
    if unknown:
        raise KeyError(f"weights for {unknown[:3]} ({len(unknown)} names) that this model does not have: the "
                       f"snapshot comes from another architecture")
    with warnings.catch_warnings():  # read-only shared memory: this model never writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, array in weights.items():
            new = torch.from_numpy(np.asarray(array))
            old = tensors[name]
            if old.ndim == 0 and new.shape == (1,):  # a scalar saved as one element (load_state_dict's rule)
                new = new.reshape(())
            if new.shape != old.shape or new.dtype != old.dtype:
                raise ValueError(f"{name}: the snapshot has {tuple(new.shape)} {new.dtype}, this model "
                                 f"{tuple(old.shape)} {old.dtype}")
            old.data = new
