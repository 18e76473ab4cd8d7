"""The learner's training step: samples per second, and how much of the machine's arithmetic it uses (issue 7,
item 6).

    PYTHONPATH=. .venv/bin/python bench/learner_step.py [batch]      # default 64, the default learner.batch_size

One behaviour-cloning step of the shipped small VLA (``BCTrainer.step``: forward, backward, AdamW; what every
update of filtered BC and RECAP is made of) on a batch of the base's own demonstration chunks, with the torch
threads a run's learner gets (all the machine's cores). Its FLOPs are counted by torch's FlopCounterMode
(forward and backward matmuls and convolutions). The ratio is the step's FLOP/s against a large float32 matmul's
FLOP/s in the same process and threads: the CPU's model FLOP utilisation. No target is set for the CPU; the GPU
figures the issue asks for (a pi0-sized configuration's inference latency, training MFU) need a GPU and are not
measured here.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import best_of, write_result
from flywheel.vla.checkpoint import load_policy_checkpoint
from learner.bc import BCTrainer, ChunkDataset


def matmul_flops_per_s(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = best_of(lambda: [a @ b for _ in range(repeats)])
    return 2 * n ** 3 * repeats / seconds


def main(batch: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    model, _ = load_policy_checkpoint("base", as_model=True)
    demos = run_episodes([split_seed("train", i) for i in range(32)], "train", None, policy_version=-1)
    data = ChunkDataset(model)
    data.add(demos, pinned=True)
    trainer = BCTrainer(model, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [data.sample(batch, gen) for _ in range(20)]
    for b in batches[:3]:  # warm up
        trainer.step(b)
    with FlopCounterMode(display=False) as counter:
        trainer.step(batches[0])
    flops = counter.get_total_flops()
    steps = 10
    seconds = best_of(lambda: [trainer.step(b) for b in batches[:steps]]) / steps
    peak = matmul_flops_per_s()
    achieved = flops / seconds
    write_result("learner_step", achieved / peak, None, None,
                 what=f"FLOP/s of one behaviour-cloning step of the small VLA (batch {batch}, forward + backward + "
                      f"AdamW) / FLOP/s of a 1024x1024 float32 matmul, same process and threads",
                 samples_per_s=batch / seconds, step_ms=seconds * 1e3, flops_per_step=flops,
                 achieved_gflops=achieved / 1e9, matmul_gflops=peak / 1e9, batch=batch,
                 params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads(),
                 gpu="not measured: no GPU on this machine" if not torch.cuda.is_available() else None)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
