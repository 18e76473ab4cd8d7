"""π0 on a GPU: inference latency against π0's published 73 ms on an RTX 4090, and training MFU (issue 7, item 6;
issue 33, item 5).

    PYTHONPATH=. .venv/bin/python bench/pi0_latency.py          # needs CUDA; bf16
    PYTHONPATH=. .venv/bin/python bench/pi0_latency.py --small  # flywheel's small π0 on the CPU: checks the code path

The model is flywheel's π0 (flywheel/vla/pi0.py, the one ``policy=pi0`` loads), randomly initialised at π0's size
(SigLIP So400m, Gemma 2B, a 300M action expert; 3.24B parameters). Inference as π0 runs it: the prefix (3 cameras
of 224 px, 48 prompt tokens) once, its keys and values kept, then 10 Euler steps of the action expert.

- ``pi0_inference``: milliseconds of one chunk (the prefix and 10 flow steps, batch 1, bf16 weights) / 73 ms, π0 on
  an RTX 4090 with 3 cameras as published (image encoders 14 ms, prefix 32 ms, flow steps 27 ms).
- ``pi0_training_mfu``: model FLOP/s of a flow-matching training step (batch 8, bf16 autocast over float32 weights,
  gradient checkpointing, AdamW; FLOPs counted by torch's FlopCounterMode) / FLOP/s of an 8192x8192 bf16 matmul on
  the same GPU in the same process.

Without CUDA nothing is written unless ``--small`` asks for the small π0 on the CPU (float32), which prints its
figures and writes no result: they would say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from flywheel.vla.pi0 import Pi0, Pi0Config, Prefix

PUBLISHED_MS = 73.0  # pi0, 3 cameras, RTX 4090 (Black et al. 2024, "pi0: A Vision-Language-Action Flow Model")
FULL = Pi0Config()
SMALL = Pi0Config(paligemma_variant="gemma_small", action_expert_variant="gemma_small", vision_variant="siglip_small",
                  vocab_size=256, max_token_len=24, action_horizon=8, precision="float32")


def inputs(c: Pi0Config, batch: int, device, dtype):
    """(prefix arguments, target chunk) of random data in π0's shapes."""
    g = torch.Generator(device="cpu").manual_seed(0)
    s = c.vision.image
    images = (torch.rand(batch, c.image_slots, 3, s, s, generator=g) * 2 - 1).to(device, dtype)
    valid = torch.ones(batch, c.image_slots, dtype=torch.bool, device=device)
    text = torch.randint(1, c.vocab_size, (batch, c.max_token_len), generator=g).to(device)
    text_valid = torch.ones_like(text, dtype=torch.bool)
    state = torch.randn(batch, c.action_dim, generator=g).to(device, dtype)
    actions = torch.randn(batch, c.action_horizon, c.action_dim, generator=g).clamp(-1, 1).to(device, dtype)
    return (images, valid, text, text_valid, state), actions


@torch.no_grad()
def sample(model: Pi0, prefix_args, noise: torch.Tensor) -> torch.Tensor:
    prefix = model.prefix(*prefix_args)[0]
    x, steps = noise, model.cfg.flow_steps
    for k in range(steps):
        x = x - model.velocity(prefix, x, torch.full((x.shape[0],), 1 - k / steps, device=x.device, dtype=x.dtype)) / steps
    return x


def loss(model: Pi0, prefix_args, actions: torch.Tensor) -> torch.Tensor:
    """openpi's flow-matching loss."""
    noise = torch.randn_like(actions)
    t = torch.rand(actions.shape[0], device=actions.device, dtype=actions.dtype)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    prefix: Prefix = model.prefix(*prefix_args)[0]
    return (model.velocity(prefix, x_t, t) - (noise - actions)).pow(2).mean()


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
    parser.add_argument("--small", action="store_true", help="flywheel's small π0 on the CPU (float32)")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.small
    if not cuda and not args.small:  # not an error: make bench runs everywhere
        print("pi0_latency needs a CUDA GPU (none here): nothing measured. For the small π0 on the CPU, which checks "
              "the code path and writes no result: --small")
        return
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    c = FULL if cuda else SMALL
    torch.manual_seed(0)
    model = Pi0(c).to(device)
    params = sum(p.numel() for p in model.parameters())
    # inference: bf16 weights, batch 1, as deployed
    infer = Pi0(c).to(device, dtype).eval() if cuda else model.eval()
    prefix_args, actions = inputs(c, 1, device, dtype)
    noise = torch.randn_like(actions)
    latency = timed(lambda: sample(infer, prefix_args, noise), device, args.repeats)
    del infer
    # training: float32 weights, bf16 autocast and gradient checkpointing on a GPU, AdamW
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    model.gradient_checkpointing = cuda
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    batch = inputs(c, args.train_batch, device, torch.float32)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            value = loss(model, *batch)
        value.backward()
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
               "peak_memory_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "config": dataclasses.asdict(c)}
    if not cuda:
        print({k: v for k, v in figures.items() if k != "config"})
        print("the small π0 on the CPU: no result written (the figures the issue asks for need a GPU)")
        return
    from bench.common import write_result

    write_result("pi0_inference", latency * 1e3 / PUBLISHED_MS, None, None,
                 what=f"ms of one action chunk of flywheel's π0 at full size ({params / 1e9:.2f}B parameters, random "
                      f"weights, bf16, 3 cameras, 10 flow steps, batch 1) on {figures['device']} / π0's published "
                      f"73 ms on an RTX 4090", **figures)
    write_result("pi0_training_mfu", figures["mfu"], None, None,
                 what=f"model FLOP/s of a π0 flow-matching training step (batch {args.train_batch}, bf16 autocast, "
                      f"gradient checkpointing, AdamW) / FLOP/s of an 8192x8192 bf16 matmul, same GPU and process",
                 **figures)


if __name__ == "__main__":
    main()
