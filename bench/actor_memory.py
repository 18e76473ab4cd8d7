"""A Ray rollout actor's memory and speed over many collections, its heap trimmed after each or never.

    PYTHONPATH=. .venv/bin/python bench/actor_memory.py [collections]     # default 30 collections of 256 episodes

Two Ray rollout actors (the shipped VLA, both cameras), each in its own process and the same in all but
``RolloutGroup(trim=)``: the heap handed back after every collection (``trim_heap``, the default) or never. They
collect the same 256 layouts in turns, one at a time, so that whatever else the machine does falls on both. After
each collection the driver reads each actor's private resident memory (RssAnon). Figures: the growth from the 5th
collection to the last, and env steps per second over all collections. The result is the trimmed actor's speed over
the untrimmed one's (what flat memory costs); the memory of both is beside it. Results:
bench/results/actor_memory.json.
"""

from __future__ import annotations

import sys
import time

from actors.ray_actors import RolloutGroup, vla_policy_factory
from actors.tabletop import split_seed
from bench.common import memory_mb, write_result
from flywheel.contracts import PolicySnapshot
from flywheel.vla.checkpoint import load_policy_checkpoint

MODES = {"trimmed": True, "untrimmed": False}  # RolloutGroup(trim=)


def main(collections: int) -> None:
    import ray

    cfg, weights, _ = load_policy_checkpoint("base")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        groups = {m: RolloutGroup(vla_policy_factory(cfg), {"sensors": ["overhead", "wrist"]}, num_workers=1,
                                  cpus_per_worker=0.5, trim=trim) for m, trim in MODES.items()}
        pids = {}
        for m, g in groups.items():
            g.publish(PolicySnapshot(0, weights))
            pids[m] = g.placement()[0]["pid"]
        memory = {m: [] for m in MODES}
        steps = {m: 0 for m in MODES}
        seconds = {m: 0.0 for m in MODES}
        for i in range(collections):
            seeds = [split_seed("train", 9_000_000 + 256 * i + j) for j in range(256)]
            for m, g in groups.items():
                started = time.perf_counter()
                steps[m] += sum(ep.num_steps for ep in g.collect(seeds, "train", sample_seed=i))
                seconds[m] += time.perf_counter() - started
                memory[m].append(memory_mb(pids[m])["RssAnon"])
        for g in groups.values():
            g.close()
    finally:
        ray.shutdown()
    growth = {m: r[-1] - r[4] for m, r in memory.items()}
    speed = {m: steps[m] / seconds[m] for m in MODES}
    write_result("actor_memory", speed["trimmed"] / speed["untrimmed"], None, None,
                 what=f"env steps/s of a Ray rollout actor over {collections} collections of 256 episodes, its heap "
                      f"trimmed after each (the default) / never trimmed; the actors' memory beside it",
                 steps_per_s=speed, growth_mb=growth,
                 per_collection_mb={m: g / (collections - 5) for m, g in growth.items()},
                 peak_mb={m: max(r) for m, r in memory.items()}, private_mb=memory)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
