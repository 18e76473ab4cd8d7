"""Soak: does a long run's memory stay flat? A whole `flywheel run` (the default experiment) for 30 minutes, with the
resident memory of the driver (detector, learner, replay buffer) and of every rollout actor sampled every 10 s.

    PYTHONPATH=. .venv/bin/python bench/soak.py [key=value ...]     # flywheel run overrides; default 30 minutes

Memory grows by design until the learner's replay buffer reaches its bound (``learner.max_episodes``): warm-up ends
at the first iteration whose buffer is full, or at a third of the run if it never fills. The figure is the ratio of
the total resident memory at the end (median of the last 3 samples) to that just after warm-up (median of the 3
first samples after it), both measured in this run; the target is <= 1.05. Results: bench/results/soak.json.
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

from flywheel.config import load_config
from flywheel.run import run

PAGE_KB = 1  # /proc/PID/status reports VmRSS in kB


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * PAGE_KB / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def actor_pids() -> list[int]:
    """Ray's rollout actors: processes titled ray::RolloutWorker..."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"RolloutWorker" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except (FileNotFoundError, PermissionError, ProcessLookupError):
                continue
    return pids


def main(overrides: list[str]) -> None:
    run_dir = f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}"
    given = ["budget.minutes=30", f"run_dir={run_dir}", *overrides]
    cfg = load_config("run", given)
    samples: list[dict] = []
    done = threading.Event()
    started = time.time()

    def sample() -> None:
        while not done.wait(10.0):
            actors = {pid: rss_mb(pid) for pid in actor_pids()}
            samples.append({"t": time.time() - started, "driver_mb": rss_mb(os.getpid()),
                            "actors_mb": sum(v for v in actors.values() if v), "actors": len(actors)})

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
    total = [s["driver_mb"] + s["actors_mb"] for s in samples]
    after = [x for s, x in zip(samples, total) if s["t"] >= warm_t]
    if len(after) < 6:
        raise SystemExit(f"too few samples after warm-up ({len(after)}): run longer (budget.minutes)")
    start_mb, end_mb = statistics.median(after[:3]), statistics.median(after[-3:])
    driver_after = [s["driver_mb"] for s in samples if s["t"] >= warm_t]
    result = {
        "name": "soak",
        "ratio": end_mb / start_mb,
        "target": 1.05,
        "met": end_mb / start_mb <= 1.05,
        "command": "PYTHONPATH=. .venv/bin/python bench/soak.py " + " ".join(overrides),
        "what": "total resident memory (driver + rollout actors) at the end / just after warm-up",
        "warm_up": {"ends_s": warm_t, "why": f"replay buffer full ({bound} episodes) at iteration "
                                             f"{full['iteration']}" if full else "a third of the run (buffer never full)"},
        "memory_mb": {"after_warm_up": start_mb, "end": end_mb, "peak": max(total),
                      "driver_after_warm_up": statistics.median(driver_after[:3]),
                      "driver_end": statistics.median(driver_after[-3:])},
        "run": {"run_dir": run_dir, "minutes": summary["wall_seconds"] / 60, "iterations": summary["iterations"],
                "episodes": summary["episodes"], "status": summary["status"],
                "config": OmegaConf.to_container(cfg.budget)},
        "samples": samples,
    }
    out = Path("bench/results/soak.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
