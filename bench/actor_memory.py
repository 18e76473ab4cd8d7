"""A rollout worker's own memory over many collections, with the heap trimmed after each (the default) and without.

    PYTHONPATH=. .venv/bin/python bench/actor_memory.py [collections]     # default 30 collections of 256 episodes

Each mode runs in a fresh process: one RolloutWorker (``trim=True``, as Ray actors run it, or ``False``) (the shipped VLA, both cameras), collections of 256 episodes,
private resident memory (RssAnon) read after each. The figure is the growth from the 5th collection to the last,
trimmed against untrimmed, measured in this run. Results: bench/results/actor_memory.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import memory_mb, write_result


def measure(trim: bool, collections: int) -> list[float]:
    import functools

    import torch

    import actors.rollout as rollout
    from flywheel.contracts import PolicySnapshot
    from flywheel.vla.checkpoint import load_policy_checkpoint
    from flywheel.vla.model import VLAPolicy

    torch.set_num_threads(1)
    cfg, weights, _ = load_policy_checkpoint("base")
    worker = rollout.RolloutWorker(functools.partial(VLAPolicy, cfg), {"sensors": ["overhead", "wrist"]}, trim=trim)
    worker.set_weights(PolicySnapshot(0, weights))
    out = []
    for i in range(collections):
        worker.collect(list(range(1000 * i, 1000 * i + 256)), "train", sample_seed=i)
        out.append(memory_mb()["RssAnon"])
    return out


def main(collections: int) -> None:
    if len(sys.argv) > 2:  # a child: one mode
        print(json.dumps(measure(sys.argv[2] == "trim", collections)))
        return
    runs = {}
    for mode in ("trim", "none"):
        done = subprocess.run([sys.executable, __file__, str(collections), mode], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONPATH": "."})
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    growth = {m: r[-1] - r[4] for m, r in runs.items()}
    write_result("actor_memory", growth["trim"] / growth["none"], None, None,
                 what="a rollout worker's private memory growth from the 5th collection of 256 episodes to the last: "
                      "heap trimmed after each collection / not trimmed",
                 growth_mb=growth, per_collection_mb={m: g / (collections - 5) for m, g in growth.items()},
                 private_mb=runs)

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
