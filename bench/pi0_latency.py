"""A pi0-sized VLA on a GPU: inference latency against pi0's published 73 ms on an RTX 4090, and training MFU
(issue 7, item 6).

    PYTHONPATH=. .venv/bin/python bench/pi0_latency.py                 # needs CUDA; bf16
    PYTHONPATH=. .venv/bin/python bench/pi0_latency.py --scale 0.0625  # a tiny copy on the CPU: checks the code path

The model (``Pi0``, randomly initialised) has pi0's shapes (Black et al. 2024, and its open implementation): a
SigLIP-So400m-sized vision tower (27 layers, width 1152, 14-px patches of 224x224 images), a Gemma-2B-sized backbone
(18 layers, width 2048, 8 query heads and 1 key/value head of 256, GeGLU MLP 16384, vocabulary 257,152) and a 300M
action expert (18 layers, width 1024, MLP 4096) whose 50 action tokens (and one state token) attend, layer by layer,
to the backbone's keys and values of the prefix as well as to their own. Inference as pi0 runs it: the prefix (3
cameras, 48 text tokens) once, its keys and values cached, then 10 Euler steps of the action expert. No rotary
positions (they cost a few elementwise ops a layer, nothing next to the matmuls). About 3.3B parameters.

- ``pi0_inference``: milliseconds of one chunk (the prefix and 10 flow steps, batch 1) / 73 ms, pi0 on an RTX 4090
  with 3 cameras as published (image encoders 14 ms, prefix 32 ms, flow steps 27 ms).
- ``pi0_training_mfu``: model FLOP/s of a flow-matching training step (batch 8, bf16 autocast over float32 weights,
  AdamW; FLOPs counted by torch's FlopCounterMode) / FLOP/s of an 8192x8192 bf16 matmul on the same GPU in the same
  process.

Without CUDA nothing is written unless ``--scale`` asks for a small copy on the CPU (float32), which prints its
figures and writes no result: they would say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

PUBLISHED_MS = 73.0  # pi0, 3 cameras, RTX 4090 (Black et al. 2024, "pi0: A Vision-Language-Action Flow Model")


@dataclasses.dataclass
class Pi0Size:
    vision_layers: int = 27
    vision_width: int = 1152
    vision_heads: int = 16
    vision_mlp: int = 4304
    image: int = 224
    patch: int = 14
    cameras: int = 3
    layers: int = 18  # backbone and action expert alike (they attend to each other layer by layer)
    width: int = 2048
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    mlp: int = 16384
    vocab: int = 257_152
    text_tokens: int = 48
    expert_width: int = 1024
    expert_mlp: int = 4096
    chunk: int = 50
    action_dim: int = 32
    flow_steps: int = 10

    def scaled(self, s: float) -> "Pi0Size":
        """A copy with widths and depths scaled by ``s`` (at least 1 layer, 1 head; head sizes kept even)."""
        w = lambda n, m=1: max(m, int(round(n * s / m)) * m)  # noqa: E731
        return dataclasses.replace(self, vision_layers=w(self.vision_layers), vision_width=w(self.vision_width, 16),
                                   vision_heads=w(self.vision_heads), vision_mlp=w(self.vision_mlp, 16),
                                   layers=w(self.layers), width=w(self.width, 16), head_dim=w(self.head_dim, 8),
                                   mlp=w(self.mlp, 16), vocab=w(self.vocab, 16), expert_width=w(self.expert_width, 16),
                                   expert_mlp=w(self.expert_mlp, 16), image=max(self.patch * 2, w(self.image, 14)))


class VisionBlock(nn.Module):
    def __init__(self, c: Pi0Size):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c.vision_width), nn.LayerNorm(c.vision_width)
        self.attn = nn.MultiheadAttention(c.vision_width, c.vision_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(c.vision_width, c.vision_mlp), nn.GELU("tanh"),
                                 nn.Linear(c.vision_mlp, c.vision_width))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class Stream(nn.Module):
    """One layer's weights for one stream of tokens (the backbone's or the action expert's): norms, q/k/v/o, GeGLU."""

    def __init__(self, width: int, mlp: int, c: Pi0Size):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(width), nn.RMSNorm(width)
        self.q = nn.Linear(width, c.heads * c.head_dim, bias=False)
        self.kv = nn.Linear(width, 2 * c.kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.heads * c.head_dim, width, bias=False)
        self.gate_up = nn.Linear(width, 2 * mlp, bias=False)
        self.down = nn.Linear(mlp, width, bias=False)
        self.c = c

    def qkv(self, x):
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, self.c.heads, self.c.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, n, 2, self.c.kv_heads, self.c.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def finish(self, x, attended):
        x = x + self.o(attended.transpose(1, 2).flatten(2))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.gelu(gate, approximate="tanh") * up)


def attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class Pi0(nn.Module):
    """pi0's shapes, randomly initialised: see the module docstring."""

    def __init__(self, c: Pi0Size):
        super().__init__()
        self.c = c
        self.patchify = nn.Conv2d(3, c.vision_width, c.patch, stride=c.patch)
        self.vision_pos = nn.Parameter(torch.randn(1, (c.image // c.patch) ** 2, c.vision_width) * 0.02)
        self.vision = nn.ModuleList(VisionBlock(c) for _ in range(c.vision_layers))
        self.vision_out = nn.Sequential(nn.LayerNorm(c.vision_width), nn.Linear(c.vision_width, c.width))
        self.embed = nn.Embedding(c.vocab, c.width)
        self.backbone = nn.ModuleList(Stream(c.width, c.mlp, c) for _ in range(c.layers))
        self.expert = nn.ModuleList(Stream(c.expert_width, c.expert_mlp, c) for _ in range(c.layers))
        self.state_in = nn.Linear(c.action_dim, c.expert_width)
        self.action_in = nn.Linear(c.action_dim, c.expert_width)
        self.time_mlp = nn.Sequential(nn.Linear(2 * c.expert_width, c.expert_width), nn.SiLU(),
                                      nn.Linear(c.expert_width, c.expert_width))
        self.norm = nn.RMSNorm(c.expert_width)
        self.action_out = nn.Linear(c.expert_width, c.action_dim)

    def prefix_tokens(self, images, text):
        """images (B, cameras, 3, H, W), text ids (B, T) -> (B, cameras*patches + T, width)."""
        b = images.shape[0]
        x = self.patchify(images.flatten(0, 1)).flatten(2).transpose(1, 2) + self.vision_pos
        for block in self.vision:
            x = block(x)
        x = self.vision_out(x).view(b, -1, self.c.width)
        return torch.cat([x, self.embed(text)], dim=1)

    def suffix_tokens(self, state, x_t, t):
        half = self.c.expert_width // 2
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), half, device=t.device, dtype=t.dtype))
        time = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], -1)
        acts = self.action_in(x_t)
        acts = self.time_mlp(torch.cat([acts, time[:, None].expand_as(acts)], dim=-1))
        return torch.cat([self.state_in(state)[:, None], acts], dim=1)

    def prefix_cache(self, prefix):
        """The prefix through the backbone: each layer's keys and values (what inference caches)."""
        cache = []
        for i, layer in enumerate(self.backbone):
            q, k, v = layer.qkv(prefix)
            cache.append((k, v))
            if i < len(self.backbone) - 1:  # the last layer's prefix output feeds nothing: only its keys and values
                prefix = layer.finish(prefix, attend(q, k, v))
        return cache

    def velocity(self, cache, state, x_t, t):
        """The action expert at flow time t: its tokens attend to the cached prefix and to each other."""
        x = self.suffix_tokens(state, x_t, t)
        for layer, (pk, pv) in zip(self.expert, cache):
            q, k, v = layer.qkv(x)
            x = layer.finish(x, attend(q, torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)))
        return self.action_out(self.norm(x[:, 1:]))

    @torch.no_grad()
    def sample(self, images, text, state, noise):
        cache = self.prefix_cache(self.prefix_tokens(images, text))
        x, dt = noise, 1.0 / self.c.flow_steps
        for k in range(self.c.flow_steps):
            t = torch.full((x.shape[0],), k * dt, device=x.device, dtype=x.dtype)
            x = x + dt * self.velocity(cache, state, x, t)
        return x

    def joint(self, images, text, state, x_t, t):
        """The velocity with both streams in one pass (the prefix attends to itself, the suffix to both), as
        training runs it; the same function as ``velocity`` over ``prefix_cache``, which inference runs."""
        prefix, suffix = self.prefix_tokens(images, text), self.suffix_tokens(state, x_t, t)
        for i, (layer, expert) in enumerate(zip(self.backbone, self.expert)):
            q, k, v = layer.qkv(prefix)
            eq, ek, ev = expert.qkv(suffix)
            if i < len(self.backbone) - 1:
                prefix = layer.finish(prefix, attend(q, k, v))
            suffix = expert.finish(suffix, attend(eq, torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)))
        return self.action_out(self.norm(suffix[:, 1:]))

    def loss(self, images, text, state, actions):
        """Flow matching: regress the velocity from noise to the actions at a random time."""
        noise = torch.randn_like(actions)
        t = torch.rand(actions.shape[0], device=actions.device, dtype=actions.dtype)
        x_t = t[:, None, None] * actions + (1 - t[:, None, None]) * noise
        return (self.joint(images, text, state, x_t, t) - (actions - noise)).pow(2).mean()


def inputs(c: Pi0Size, batch: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(batch, c.cameras, 3, c.image, c.image, generator=g).to(device, dtype)
    text = torch.randint(0, c.vocab, (batch, c.text_tokens), generator=g).to(device)
    state = torch.randn(batch, c.action_dim, generator=g).to(device, dtype)
    actions = torch.randn(batch, c.chunk, c.action_dim, generator=g).clamp(-1, 1).to(device, dtype)
    return images, text, state, actions


def timed(job, device, repeats: int) -> float:
    """Median seconds of ``repeats`` runs of job (after two warm-ups), synchronised on a GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 2):
        sync()
        started = time.perf_counter()
        job()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=None, help="a copy this much smaller, on the CPU (float32)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and args.scale is None
    if not cuda and args.scale is None:  # not an error: make bench runs everywhere
        print("pi0_latency needs a CUDA GPU (none here): nothing measured. For a small copy on the CPU, which checks "
              "the code path and writes no result: --scale 0.0625")
        return
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    c = Pi0Size() if cuda else Pi0Size().scaled(args.scale)
    torch.manual_seed(0)
    model = Pi0(c).to(device)
    params = sum(p.numel() for p in model.parameters())
    # inference: bf16 weights, batch 1, as deployed
    infer = Pi0(c).to(device, dtype).eval() if cuda else model.eval()
    images, text, state, actions = inputs(c, 1, device, dtype)
    noise = torch.randn_like(actions)
    latency = timed(lambda: infer.sample(images, text, state, noise), device, args.repeats)
    del infer
    # training: float32 weights, bf16 autocast on a GPU, AdamW
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    batch = inputs(c, args.train_batch, device, torch.float32)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model.loss(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step_s = timed(step, device, max(3, args.repeats // 2))
    n = 8192 if cuda else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    peak = 2 * n ** 3 * 10 / timed(lambda: [a @ b for _ in range(10)], device, 5)
    figures = {"params": params, "latency_ms": latency * 1e3, "train_step_s": step_s, "train_flops": flops,
               "achieved_tflops": flops / step_s / 1e12, "matmul_tflops": peak / 1e12, "mfu": flops / step_s / peak,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "size": dataclasses.asdict(c)}
    if not cuda:
        print({k: v for k, v in figures.items() if k != "size"})
        print("a small copy on the CPU: no result written (the figures the issue asks for need a GPU)")
        return
    from bench.common import write_result

    write_result("pi0_inference", latency * 1e3 / PUBLISHED_MS, None, None,
                 what=f"ms of one action chunk of a randomly initialised pi0-sized VLA ({params / 1e9:.2f}B "
                      f"parameters, bf16, 3 cameras, 10 flow steps, batch 1) on {figures['device']} / pi0's published "
                      f"73 ms on an RTX 4090", **figures)
    write_result("pi0_training_mfu", figures["mfu"], None, None,
                 what=f"model FLOP/s of a pi0-sized flow-matching training step (batch {args.train_batch}, bf16 "
                      f"autocast, AdamW) / FLOP/s of an 8192x8192 bf16 matmul, same GPU and process", **figures)


if __name__ == "__main__":
    main()
