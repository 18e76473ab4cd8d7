"""The pipeline: how long the actors wait, and how long the learner waits for practice (issue 7, item 5).

    PYTHONPATH=. .venv/bin/python bench/pipeline.py [--name NAME] [overrides...]   # results: NAME_actors_wait, ...

Three `flywheel run`s of the smoke preset on this machine, the same in all but ``rollout.overlap`` (the actors
collect the next iteration while the learner trains) and ``rollout.keep_collecting`` (actors done with that
before the learner go on practising with the weights they hold; 0: they wait): synchronous, overlapped, and
overlapped with the actors waiting. Each runs 6 iterations with a small detector (its quality
does not change the timeline). Every iteration records ``rollout/busy_fraction`` (the actors' time spent
collecting or applying weights, over their time alive) and ``time/learner_wait_fraction`` (the share of the
iteration the driver spent waiting for the collection). Figures are means over iterations 2-6 (the first has
nothing to overlap with). Two results, each a fraction of time measured in the overlapped run, the others' beside
it: ``pipeline_actors_wait`` (1 - busy; target < 5%) and ``pipeline_learner_wait`` (target < 10%).
Beside them, each run's practice learned from per second of its iterations, and how much of it the actors
collected beyond ``episodes_per_iteration`` while the learner trained (``rollout.keep_collecting``), and the
profile of the actors' waiting: Ray's own record of each actor's calls (``ray.timeline``: a call runs until its
result is stored) laid beside the loop's phases (``PhaseTimer.spans``), over the same iterations. It gives the share
of the actors' time with no call running (``ray_timeline.actors_wait``) and, for each phase of the loop, the share
spent waiting while the driver was in it (``idle_by_phase``): what the actors wait for.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import write_result
from flywheel.config import load_config
from flywheel.metrics import PhaseTimer
from flywheel.cluster import start_ray
from flywheel.run import run

# filtered BC's smoke settings, 512 episodes an update and its own small detector, pinned so that the figures compare
SETTINGS = ["experiment=smoke", "learner=smoke", "rollout.episodes_per_iteration=512", "detector.checkpoint=",
            "budget.iterations=6", "budget.minutes=30", "detector.steps=200", "detector.policy_episodes=200",
            "detector.demo_episodes=100", "eval.episodes=100", "wandb.mode=disabled"]


def measure(overlap: bool, extra: list[str]) -> dict:
    import ray

    PhaseTimer.spans = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config("run", [*SETTINGS, f"rollout.overlap={str(overlap).lower()}", *extra,
                                      f"run_dir={tmp}/run"])
            # Ray started here as the run starts it, so that its record of the actors' calls outlives the run
            start_ray(cfg, say=lambda m: None)
            summary = run(cfg, say=lambda m: None)
            rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        timeline = actors_idle(ray.timeline(), PhaseTimer.spans)
    finally:
        PhaseTimer.spans = None
        ray.shutdown()
    first, *its = [r for r in rows if "iteration" in r]
    busy = float(np.mean([r["rollout/busy_fraction"] for r in its]))
    wait = float(np.mean([r["time/learner_wait_fraction"] for r in its]))
    timed = sorted({k for r in its for k in r if k.startswith("time/") and not k.endswith("_fraction")})
    phases = {k[5:]: float(np.mean([r.get(k, 0.0) for r in its])) for k in timed}
    seconds = sum(r.get(k, 0.0) for r in its for k in timed)
    return {"actors_wait": 1 - busy, "learner_wait": wait, "seconds_per_iteration": phases,
            # practice learned from per second of the loop (iterations 2-6), and how much of it was beyond
            # episodes_per_iteration (rollout.keep_collecting): what the actors' time bought
            "practice_per_s": (its[-1]["episodes"] - first["episodes"]) / seconds,
            "kept_collecting": float(np.mean([r.get("rollout/kept_collecting", 0) for r in its])),
            "episodes_per_s": summary["episodes"] / summary["wall_seconds"], "iterations": summary["iterations"],
            "ray_timeline": timeline}


def actors_idle(events: list[dict], spans: list[tuple[str, float, float]]) -> dict:
    """The rollout actors' time with no call running, from Ray's timeline (``events``: chrome-trace spans in us, one
    thread per actor), between the end of the loop's first collection and the end of its last (iterations 2-6, as
    the loop's own figure), and where the loop was (``spans``: its phases) while they waited."""
    ends = [end for phase, _, end in spans if phase == "collect"]
    start, stop = ends[0], ends[-1]
    busy: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("cat", "").startswith("task::RolloutWorker.") and not e["name"].endswith("__init__"):
            busy.setdefault(e["tid"], []).append((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6))
    idle: dict[str, float] = {}
    for calls in busy.values():
        t = start
        for a, b in sorted(calls) + [(stop, stop)]:
            a, b = min(max(a, start), stop), min(max(b, start), stop)
            if a > t:  # waited from t to a: share it out among the phases it overlaps
                placed = 0.0
                for phase, p0, p1 in spans:
                    o = min(a, p1) - max(t, p0)
                    if o > 0:
                        idle[phase] = idle.get(phase, 0.0) + o
                        placed += o
                idle["between phases"] = idle.get("between phases", 0.0) + (a - t) - placed
            t = max(t, b)
    alive = len(busy) * (stop - start)
    return {"actors_wait": sum(idle.values()) / alive, "actors": len(busy), "seconds": stop - start,
            "idle_by_phase": {k: v / alive for k, v in sorted(idle.items(), key=lambda kv: -kv[1]) if v > 0}}


def main(extra: list[str], name: str = "pipeline") -> None:
    sync, overlapped = measure(False, extra), measure(True, extra)
    waiting = measure(True, ["rollout.keep_collecting=0", *extra])  # overlapped, the actors waiting for weights
    for key, target, what in (("actors_wait", 0.05, "the rollout actors' time spent waiting (not collecting or "
                                                     "applying weights) / their time alive"),
                              ("learner_wait", 0.10, "the time the learner's side waited for practice / the "
                                                     "iteration's time")):
        write_result(f"{name}_{key}", overlapped[key], target, overlapped[key] < target,
                     what=f"{what}, with rollout.overlap=true (smoke preset, iterations 2-6; without overlap: "
                          f"{sync[key]:.3f}; overlapped with rollout.keep_collecting=0: {waiting[key]:.3f})",
                     overlap=overlapped, synchronous=sync, overlap_keep_collecting_0=waiting,
                     settings=SETTINGS + extra)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--name"]:
        if len(args) < 2 or "=" in args[1]:
            sys.exit("--name needs a name for the results (--name NAME: bench/results/NAME_actors_wait.json, ...)")
        main(args[2:], name=args[1])
    else:
        main(args)
