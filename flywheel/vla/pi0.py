"""π0 and π0.5 (Physical Intelligence's flow-matching VLAs) in plain PyTorch, with the parameter names openpi's
PyTorch checkpoints use, so that ``model.safetensors`` loads into it as it is (flywheel/vla/openpi.py).

The architecture (Black et al. 2024; openpi ``models_pytorch/pi0_pytorch.py``)::

    cameras (each S x S) -> SigLIP vision tower -> projector --+
    prompt tokens -> Gemma embedding * sqrt(width) ------------+-> prefix -> Gemma backbone (bidirectional over
                                                                            the prefix) -> each layer's keys/values
    [state ->] noisy action chunk x_t, flow time t -> action expert (a second, smaller Gemma whose tokens attend,
        layer by layer, to the backbone's prefix keys/values and to their own) -> velocity -> action_out_proj

- π0: the state is one continuous token of the expert (``state_proj``); the time is mixed into each action token
  by an MLP (``action_time_mlp_in/out``).
- π0.5: the state is discretised into the prompt (256 bins, "Task: ..., State: ...;\\nAction: "); the time enters
  through adaptive RMSNorm (adaRMS: each expert norm's ``dense`` gives a scale, shift and gate) from ``time_mlp_*``.

openpi's flow runs backwards in time: x_t = t * noise + (1 - t) * actions, the model regresses u = noise - actions,
and sampling integrates from noise at t=1 to actions at t=0 in ``flow_steps`` Euler steps.

Written natively rather than on ``transformers``: openpi's own PyTorch model needs transformers 4.53.2 with patched
files (adaRMS, gated residuals) that no release carries, and the two streams' joint attention is a layer loop of
its own in any case. Only the forward computation is here; loading, tokens and normalisation are in
flywheel/vla/openpi.py and the flywheel side (``TrainablePolicy``) in flywheel/vla/pi0_policy.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Additive attention mask for "may not attend": large and finite, as openpi's, so that a padded query row (which may
# attend to nothing) averages rather than turning into NaN and spreading through the keys of later layers.
BLOCKED = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class Gemma:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class Siglip:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch: int
    image: int  # S: the square input every camera is resized to


# openpi's Gemma variants (models/gemma.py; "_lora" variants share their base's shapes), and flywheel's small one.
GEMMA = {
    "gemma_2b": Gemma(2048, 18, 16_384, 8, 1, 256),
    "gemma_300m": Gemma(1024, 18, 4096, 8, 1, 256),
    "dummy": Gemma(64, 4, 128, 8, 1, 16),
    "gemma_small": Gemma(128, 4, 512, 4, 1, 32),  # flywheel's: a few million parameters that learn on a CPU
}
GEMMA.update({f"{k}_lora": v for k, v in list(GEMMA.items()) if k in ("gemma_2b", "gemma_300m")})
# SigLIP So400m/14 at 224 px (openpi's PyTorch PaliGemma, always), and small towers for CPU work and tests.
SIGLIP = {
    "so400m": Siglip(1152, 27, 4304, 16, 14, 224),
    "siglip_small": Siglip(128, 4, 512, 4, 8, 64),
    "siglip_tiny": Siglip(64, 2, 256, 4, 8, 64),
    "siglip_dummy": Siglip(32, 1, 64, 2, 8, 32),
}
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's image slots, in its order


@dataclasses.dataclass
class Pi0Config:
    """The first five fields are openpi's ``config.json``; ``pi05`` follows from the weights when it is absent (a
    π0.5 has ``time_mlp_*``, a π0 ``state_proj``). The rest are flywheel's additions, whose defaults are what openpi
    fixes: a stock openpi checkpoint has none of them."""

    action_dim: int = 32  # the padded action (and state) width; a robot's own dims come first
    action_horizon: int = 50  # actions per chunk
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    precision: str = "bfloat16"  # how the weights are stored; computed in float32 on a CPU
    pi05: bool = False
    vision_variant: str = "so400m"
    vocab_size: int = 257_152
    max_token_len: int = 48  # openpi: 48 for π0, 200 for π0.5 (its prompt holds the state)
    flow_steps: int = 10
    image_slots: int = 3  # openpi's three (CAMERAS), each always in the prefix; fewer for a model of fewer cameras

    def __post_init__(self):
        for key, table in (("paligemma_variant", GEMMA), ("action_expert_variant", GEMMA),
                           ("vision_variant", SIGLIP)):
            if getattr(self, key) not in table:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {sorted(table)}")
        if not 1 <= self.image_slots <= len(CAMERAS):
            raise ValueError(f"image_slots={self.image_slots}: openpi's model has 1 to {len(CAMERAS)} {CAMERAS}")
        if self.precision not in ("bfloat16", "float32"):
            raise ValueError(f"precision={self.precision!r}: openpi writes bfloat16 or float32")
        vlm, expert = self.vlm, self.expert
        if (vlm.depth, vlm.num_heads, vlm.num_kv_heads, vlm.head_dim) != \
                (expert.depth, expert.num_heads, expert.num_kv_heads, expert.head_dim):
            raise ValueError(f"{self.paligemma_variant} and {self.action_expert_variant} cannot share attention: the "
                             f"expert attends to the backbone layer by layer, so depth and heads must match")

    @property
    def vlm(self) -> Gemma:
        return GEMMA[self.paligemma_variant]

    @property
    def expert(self) -> Gemma:
        return GEMMA[self.action_expert_variant]

    @property
    def vision(self) -> Siglip:
        return SIGLIP[self.vision_variant]

    @property
    def prefix_len(self) -> int:
        """Prefix tokens: every camera's patches, then the prompt."""
        return self.image_slots * (self.vision.image // self.vision.patch) ** 2 + self.max_token_len


def _module(**children: nn.Module) -> nn.Module:
    """A plain container, so that parameter names follow openpi's (``paligemma.model.vision_tower...``)."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


class RMSNorm(nn.Module):
    """Gemma's RMSNorm, x * (1 + weight); or, with ``cond_dim`` (π0.5's expert), adaptive: ``dense(cond)`` gives a
    scale, a shift and a gate for the residual that follows."""

    def __init__(self, dim: int, cond_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        scale, shift, gate = self.dense(cond)[:, None].chunk(3, dim=-1)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate


def gated(residual: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return residual + (out if gate is None else out * gate)


class GemmaLayer(nn.Module):
    def __init__(self, g: Gemma, cond_dim: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(g.width, cond_dim)
        self.post_attention_layernorm = RMSNorm(g.width, cond_dim)
        self.self_attn = _module(q_proj=nn.Linear(g.width, g.num_heads * g.head_dim, bias=False),
                                 k_proj=nn.Linear(g.width, g.num_kv_heads * g.head_dim, bias=False),
                                 v_proj=nn.Linear(g.width, g.num_kv_heads * g.head_dim, bias=False),
                                 o_proj=nn.Linear(g.num_heads * g.head_dim, g.width, bias=False))
        self.mlp = _module(gate_proj=nn.Linear(g.width, g.mlp_dim, bias=False),
                           up_proj=nn.Linear(g.width, g.mlp_dim, bias=False),
                           down_proj=nn.Linear(g.mlp_dim, g.width, bias=False))
        self.g = g

    def qkv(self, x: torch.Tensor, cond: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]):
        """(queries (B, H, T, hd), keys and values (B, KV, T, hd), the adaRMS gate), rotated to their positions."""
        h, gate = self.input_layernorm(x, cond)
        b, t, _ = h.shape
        a = self.self_attn
        q = a.q_proj(h).view(b, t, -1, self.g.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, -1, self.g.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, -1, self.g.head_dim).transpose(1, 2)
        return rotate(q, *rope), rotate(k, *rope), v, gate

    def finish(self, x: torch.Tensor, attended: torch.Tensor, gate: torch.Tensor | None,
               cond: torch.Tensor | None) -> torch.Tensor:
        """The rest of the layer after attention: output projection, (gated) residuals, GeGLU MLP."""
        x = gated(x, self.self_attn.o_proj(attended.transpose(1, 2).flatten(2)), gate)
        h, gate = self.post_attention_layernorm(x, cond)
        m = self.mlp
        return gated(x, m.down_proj(F.gelu(m.gate_proj(h), approximate="tanh") * m.up_proj(h)), gate)


class GemmaModel(nn.Module):
    def __init__(self, g: Gemma, vocab_size: int | None, cond_dim: int | None = None):
        super().__init__()
        if vocab_size is not None:  # the action expert reads no tokens
            self.embed_tokens = nn.Embedding(vocab_size, g.width)
            # Gemma scales its embeddings by sqrt(width): from scratch, start them at unit scale after it, as the
            # image tokens are, not sqrt(width) times larger (a checkpoint overwrites this)
            nn.init.normal_(self.embed_tokens.weight, std=g.width ** -0.5)
        self.layers = nn.ModuleList(GemmaLayer(g, cond_dim) for _ in range(g.depth))
        self.norm = RMSNorm(g.width, cond_dim)


class SiglipLayer(nn.Module):
    def __init__(self, s: Siglip):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(s.width, eps=1e-6), nn.LayerNorm(s.width, eps=1e-6)
        self.self_attn = _module(q_proj=nn.Linear(s.width, s.width), k_proj=nn.Linear(s.width, s.width),
                                 v_proj=nn.Linear(s.width, s.width), out_proj=nn.Linear(s.width, s.width))
        self.mlp = _module(fc1=nn.Linear(s.width, s.mlp_dim), fc2=nn.Linear(s.mlp_dim, s.width))
        self.heads = s.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        h = self.layer_norm1(x)
        a = self.self_attn
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side², width) fixed 2-D sine-cosine positions (MAE's): half the channels encode the row, half the column,
    so that nearby patches get nearby codes from the start: the initial value of SigLIP's learned table for a tower
    trained from scratch, which would otherwise learn each patch's place from its demonstrations alone."""
    quarter = width // 4
    freq = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    codes = [f(g.reshape(-1, 1) * freq) for g in (rows, cols) for f in (torch.sin, torch.cos)]
    out = torch.cat(codes, dim=1)
    return F.pad(out, (0, width - out.shape[1])).float()


class SiglipVision(nn.Module):
    def __init__(self, s: Siglip):
        super().__init__()
        n = (s.image // s.patch) ** 2
        self.vision_model = _module(
            embeddings=_module(patch_embedding=nn.Conv2d(3, s.width, s.patch, stride=s.patch),
                               position_embedding=nn.Embedding(n, s.width)),
            encoder=_module(layers=nn.ModuleList(SiglipLayer(s) for _ in range(s.depth))),
            post_layernorm=nn.LayerNorm(s.width, eps=1e-6))
        with torch.no_grad():  # from scratch, nearby patches start with nearby codes (a checkpoint overwrites)
            m = self.vision_model.embeddings.position_embedding.weight
            m.copy_(sincos_2d(s.image // s.patch, s.width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images float (N, 3, S, S) in [-1, 1] -> (N, patches, width)."""
        m = self.vision_model
        x = m.embeddings.patch_embedding(images).flatten(2).transpose(1, 2) + m.embeddings.position_embedding.weight
        for layer in m.encoder.layers:
            x = layer(x)
        return m.post_layernorm(x)


def rope(positions: torch.Tensor, head_dim: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gemma's rotary embedding at integer ``positions`` (B, T) -> (cos, sin), each (B, 1, T, head_dim)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """openpi's sine-cosine embedding of the flow time t (B,) -> (B, dim)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    scale = 2 * math.pi / (min_period * (max_period / min_period) ** fraction)
    angles = scale[None] * t.double()[:, None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).to(t.dtype)


@dataclasses.dataclass
class Prefix:
    """What the action expert reads of an observation: every backbone layer's keys and values of the prefix
    (B, KV, L, hd) each, which prefix tokens are real (B, L), and the state (B, action_dim; π0's expert reads it)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    state: torch.Tensor

    def pack(self) -> torch.Tensor:
        """One float tensor (B, D) of it all: what flywheel's learners hold and index as a policy's context."""
        b = self.state.shape[0]
        kv = torch.stack([torch.stack([k, v], dim=1) for k, v in zip(self.keys, self.values)], dim=1)
        return torch.cat([kv.reshape(b, -1), self.valid.to(kv.dtype), self.state.to(kv.dtype)], dim=1)

    @staticmethod
    def unpack(packed: torch.Tensor, cfg: Pi0Config) -> "Prefix":
        g, n = cfg.vlm, cfg.prefix_len
        b = packed.shape[0]
        size = g.depth * 2 * g.num_kv_heads * n * g.head_dim
        kv = packed[:, :size].reshape(b, g.depth, 2, g.num_kv_heads, n, g.head_dim)
        valid = packed[:, size:size + n] > 0.5
        return Prefix([kv[:, i, 0] for i in range(g.depth)], [kv[:, i, 1] for i in range(g.depth)], valid,
                      packed[:, size + n:])


class Pi0(nn.Module):
    """π0 / π0.5 with openpi's parameter names; ``prefix`` and ``velocity`` are the two halves of its forward pass
    (the backbone never attends to the expert, so the split is exact), plus flywheel's advantage indicator: an
    embedding added to every action token (zero at first, so it changes nothing for a checkpoint trained without
    it), RECAP's conditioning input."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.cfg = cfg
        vlm, expert, vision = cfg.vlm, cfg.expert, cfg.vision
        cond = expert.width if cfg.pi05 else None
        self.paligemma_with_expert = _module(
            paligemma=_module(model=_module(vision_tower=SiglipVision(vision),
                                            multi_modal_projector=_module(linear=nn.Linear(vision.width, vlm.width)),
                                            language_model=GemmaModel(vlm, cfg.vocab_size))),
            gemma_expert=_module(model=GemmaModel(expert, None, cond)))
        self.action_in_proj = nn.Linear(cfg.action_dim, expert.width)
        self.action_out_proj = nn.Linear(expert.width, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(expert.width, expert.width)
            self.time_mlp_out = nn.Linear(expert.width, expert.width)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, expert.width)
            self.action_time_mlp_in = nn.Linear(2 * expert.width, expert.width)
            self.action_time_mlp_out = nn.Linear(expert.width, expert.width)
        self.flywheel_indicator = nn.Embedding(3, expert.width)  # 0 none, 1 positive, 2 negative
        nn.init.zeros_(self.flywheel_indicator.weight)
        self.gradient_checkpointing = False

    @property
    def _vlm(self) -> nn.Module:
        return self.paligemma_with_expert.paligemma.model

    @property
    def _expert(self) -> GemmaModel:
        return self.paligemma_with_expert.gemma_expert.model

    def _maybe_checkpoint(self, fn, *args):
        """Recompute ``fn`` in the backward pass rather than keep its activations (``gradient_checkpointing``)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def prefix(self, images: torch.Tensor, image_valid: torch.Tensor, tokens: torch.Tensor,
               token_valid: torch.Tensor, state: torch.Tensor) -> tuple[Prefix, torch.Tensor]:
        """images float (B, cameras, 3, S, S) in [-1, 1], image_valid bool (B, cameras), tokens int64 (B, L),
        token_valid bool (B, L), state float (B, action_dim) -> (the ``Prefix``, the backbone's last hidden states
        (B, prefix_len, width))."""
        vlm, b = self._vlm, images.shape[0]
        patches = self._maybe_checkpoint(vlm.vision_tower, images.flatten(0, 1))
        image_tokens = vlm.multi_modal_projector.linear(patches).view(b, -1, self.cfg.vlm.width)
        text = vlm.language_model.embed_tokens(tokens) * math.sqrt(self.cfg.vlm.width)
        x = torch.cat([image_tokens, text.to(image_tokens.dtype)], dim=1)
        valid = torch.cat([image_valid.repeat_interleave(patches.shape[1], dim=1), token_valid], dim=1)
        mask = torch.where(valid[:, None, :] & valid[:, :, None], 0.0, BLOCKED)[:, None].to(x.dtype)
        cos_sin = rope(valid.long().cumsum(1) - 1, self.cfg.vlm.head_dim)
        keys, values = [], []
        for layer in vlm.language_model.layers:
            def step(x, layer=layer):
                q, k, v, _ = layer.qkv(x, None, cos_sin)
                attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                return layer.finish(x, attended, None, None), k, v
            x, k, v = self._maybe_checkpoint(step, x)
            keys.append(k)
            values.append(v)
        hidden, _ = vlm.language_model.norm(x)
        return Prefix(keys, values, valid, state), hidden

    def _suffix(self, prefix: Prefix, x_t: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor | None):
        """The expert's input tokens (π0: the state's, then the actions'), its attention blocks and adaRMS input."""
        width = self.cfg.expert.width
        actions = self.action_in_proj(x_t)
        time = time_embedding(t, width).to(actions.dtype)
        if self.cfg.pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time))))
            tokens, blocks = actions, [1] + [0] * (x_t.shape[1] - 1)
        else:
            cond = None
            mixed = torch.cat([actions, time[:, None].expand_as(actions)], dim=-1)
            actions = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(mixed)))
            tokens = actions
            blocks = [1, 1] + [0] * (x_t.shape[1] - 1)
        if indicator is None:
            tokens = tokens + self.flywheel_indicator.weight[0]
        else:
            tokens = tokens + self.flywheel_indicator(indicator)[:, None]
        if not self.cfg.pi05:
            tokens = torch.cat([self.state_proj(prefix.state.to(actions.dtype))[:, None], tokens], dim=1)
        return tokens, torch.tensor(blocks, device=x_t.device), cond

    def velocity(self, prefix: Prefix, x_t: torch.Tensor, t: torch.Tensor,
                 indicator: torch.Tensor | None = None) -> torch.Tensor:
        """The expert at flow time t (B,) on the noisy chunk x_t (B, H, action_dim) -> the velocity (B, H,
        action_dim). Its tokens attend to the valid prefix and, by block, to each other (π0's state token sees only
        itself; the actions see it and each other)."""
        x, blocks, cond = self._suffix(prefix, x_t, t, indicator)
        b, n = x.shape[:2]
        cum = blocks.cumsum(0)
        own = (cum[None, :] <= cum[:, None])[None].expand(b, n, n)
        mask = torch.where(torch.cat([prefix.valid[:, None, :].expand(b, n, -1), own], dim=2), 0.0, BLOCKED)
        mask = mask[:, None].to(x.dtype)
        positions = prefix.valid.sum(1, keepdim=True) + torch.arange(n, device=x.device)[None]
        cos_sin = rope(positions, self.cfg.expert.head_dim)
        for layer, pk, pv in zip(self._expert.layers, prefix.keys, prefix.values):
            def step(x, pk, pv, layer=layer):
                q, k, v, gate = layer.qkv(x, cond, cos_sin)
                attended = F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2),
                                                          attn_mask=mask, enable_gqa=True)
                return layer.finish(x, attended, gate, cond)
            x = self._maybe_checkpoint(step, x, pk, pv)
        out, _ = self._expert.norm(x, cond)
        return self.action_out_proj(out[:, -x_t.shape[1]:].float())
