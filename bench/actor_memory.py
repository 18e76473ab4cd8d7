"""A Ray rollout actor's memory and speed over many collections, its heap trimmed after each or never.

    PYTHONPATH=. .venv/bin/python bench/actor_memory.py [collections]     # default 30 collections of 256 episodes

Two Ray rollout actors (the shipped VLA, both cameras), each in its own process and the same in all but
``RolloutGroup(trim_idle_s=)``: the heap handed back as soon as each collection ends (``trim_heap``; 0 s: what an
actor that waits for the learner after every collection does, at the default 5 s) or never (None: what an actor
kept busy does). They collect the same 256 layouts in turns, one at a time, so that whatever else the machine does
falls on both. The driver samples each actor's private resident memory (RssAnon) every 20 ms while it collects (the
peak) and once after (what it holds while it waits). Figures: env steps per second over all collections, and the
memory. The result is the trimmed actor's speed over the untrimmed one's (what trimming costs a collection).
Results: bench/results/actor_memory.json.
"""

from __future__ import annotations

import functools
import sys
import threading
import time

from actors.ray_actors import RolloutGroup
from actors.tabletop import split_seed
from bench.common import memory_mb, write_result
from flywheel.contracts import PolicySnapshot
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import VLAPolicy

MODES = {"trimmed": 0.0, "untrimmed": None}  # RolloutGroup(trim_idle_s=)


def main(collections: int) -> None:
    import ray

    cfg, weights, _ = load_policy_checkpoint("base")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        groups = {m: RolloutGroup(functools.partial(VLAPolicy, cfg), {"sensors": ["overhead", "wrist"]},
                                  num_workers=1, cpus_per_worker=0.5, trim_idle_s=t) for m, t in MODES.items()}
        pids = {}
        for m, g in groups.items():
            g.publish(PolicySnapshot(0, weights))
            pids[m] = g.placement()[0]["pid"]
        memory = {m: [] for m in MODES}
        during = {m: [] for m in MODES}  # the highest private memory sampled while each collection ran
        steps = {m: 0 for m in MODES}
        seconds = {m: 0.0 for m in MODES}
        for i in range(collections):
            seeds = [split_seed("train", 9_000_000 + 256 * i + j) for j in range(256)]
            for m, g in groups.items():
                done, high = threading.Event(), [0.0]

                def watch(pid=pids[m]) -> None:
                    while not done.wait(0.02):
                        high[0] = max(high[0], memory_mb(pid)["RssAnon"])

                watcher = threading.Thread(target=watch)
                watcher.start()
                started = time.perf_counter()
                steps[m] += sum(ep.num_steps for ep in g.collect(seeds, "train", sample_seed=i))
                seconds[m] += time.perf_counter() - started
                done.set()
                watcher.join()
                during[m].append(high[0])
                memory[m].append(memory_mb(pids[m])["RssAnon"])
        for g in groups.values():
            g.close()
    finally:
        ray.shutdown()
    growth = {m: r[-1] - r[4] for m, r in memory.items()}
    speed = {m: steps[m] / seconds[m] for m in MODES}
    write_result("actor_memory", speed["trimmed"] / speed["untrimmed"], None, None,
                 what=f"env steps/s of a Ray rollout actor over {collections} collections of 256 episodes, its heap "
                      f"trimmed after each / never trimmed; the actors' memory while collecting and after, beside it",
                 steps_per_s=speed, growth_mb=growth,
                 per_collection_mb={m: g / (collections - 5) for m, g in growth.items()},
                 peak_mb={m: max(r) for m, r in memory.items()}, private_mb=memory,
                 peak_during_mb={m: max(r) for m, r in during.items()}, during_mb=during)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 30)
