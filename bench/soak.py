"""Soak: does a long run's memory stay flat? A whole `flywheel run` (the default experiment) for 30 minutes, with the
memory of the driver (detector, learner, replay buffer) and of every rollout actor sampled every 10 s.

    PYTHONPATH=. .venv/bin/python bench/soak.py [key=value ...]     # flywheel run overrides; default 30 minutes

Memory grows by design until the learner's replay buffer reaches its bound (``learner.max_episodes``): warm-up ends
at the first iteration whose buffer is full, or at a third of the run if it never fills. The figure is the ratio of
the private resident memory (RssAnon: what a leak grows) of the driver and the actors at the end (median of the
last 3 samples) to that just after warm-up (median of the 3 first samples after it), both measured in this run;
the target is <= 1.05. The pages of Ray's shared object store that the actors touch (RssShmem, a cache bounded by
the store's size) are reported beside it. Results: bench/results/soak.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from bench.common import memory_mb, our_processes, write_result
from flywheel.config import load_config
from flywheel.run import run

def main(overrides: list[str]) -> None:
    run_dir = f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}"
    given = ["budget.minutes=30", f"run_dir={run_dir}", *overrides]
    cfg = load_config("run", given)
    samples: list[dict] = []
    done = threading.Event()
    started = time.time()

    def sample() -> None:
        while not done.wait(10.0):
            actors = our_processes(b"ray::RolloutWorker")
            mem = {pid: memory_mb(pid) for pid in actors}
            driver = memory_mb(os.getpid())
            samples.append({"t": time.time() - started, "driver": driver, "actors": len(actors),
                            "titles": sorted(set(actors.values())),
                            **{f"actors_{k}": sum(m.get(k, 0.0) for m in mem.values())
                               for k in ("VmRSS", "RssAnon", "RssShmem")}})

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    summary = run(cfg, say=print)
    done.set()
    thread.join()

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    iterations = [r for r in rows if "iteration" in r]
    bound = cfg.learner.max_episodes
    full = next((r for r in iterations if r.get("learner/buffer_episodes", 0) >= bound), None)
    warm_t = (full["time"] - started) if full else (samples[-1]["t"] / 3)
    after = [s for s in samples if s["t"] >= warm_t]
    if len(after) < 6:
        raise SystemExit(f"too few samples after warm-up ({len(after)}): run longer (budget.minutes)")

    def growth(value) -> dict[str, float]:
        start, end = statistics.median(map(value, after[:3])), statistics.median(map(value, after[-3:]))
        return {"after_warm_up": start, "end": end, "ratio": end / start, "peak": max(map(value, samples))}

    private = growth(lambda s: s["driver"].get("RssAnon", 0.0) + s["actors_RssAnon"])
    write_result(
        "soak", private["ratio"], 1.05, private["ratio"] <= 1.05,
        what="private resident memory (RssAnon) of the driver and the rollout actors, end / just after warm-up; "
             "resident memory in all (VmRSS, which counts the pages of Ray's object store each process touched) "
             "beside it",
        warm_up={"ends_s": warm_t, "why": f"replay buffer full ({bound} episodes) at iteration {full['iteration']}"
                 if full else "a third of the run (buffer never full)"},
        memory_mb={"private": private,
                   "driver_private": growth(lambda s: s["driver"].get("RssAnon", 0.0)),
                   "actors_private": growth(lambda s: s["actors_RssAnon"]),
                   "actors_object_store_pages": growth(lambda s: s["actors_RssShmem"]),
                   "resident_all": growth(lambda s: s["driver"].get("VmRSS", 0.0) + s["actors_VmRSS"])},
        run={"run_dir": run_dir, "minutes": summary["wall_seconds"] / 60, "iterations": summary["iterations"],
             "episodes": summary["episodes"], "status": summary["status"],
             "config": OmegaConf.to_container(cfg.budget)},
        samples=samples)

if __name__ == "__main__":
    main(sys.argv[1:])
