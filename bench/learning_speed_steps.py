"""Held-out success after 100k practice env steps (issue 36's robot-hours target: about 3 hours at 10 Hz), for the
candidates that spend those steps differently, each on two seeds.

    PYTHONPATH=. .venv/bin/python bench/learning_speed_steps.py [--out DIR] [--seeds 0,1] [--only NAME,...]

Each entry is `flywheel run` of the default job with ``budget.env_steps=100000``, evaluated from the flow's mean on
the 500 held-out seeds at its start and its end only. bench/learning_speed.py measures the curves against minutes;
here only steps count, and the figure is the success at the end. The target is that of learning_speed: the base's
held-out failure rate halved. ``met`` is true when an entry's mean over the seeds reaches it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import write_result, write_section
from bench.learning_speed import STEPS, run_entry

CANDIDATES = {
    "default": [],  # PPO with self-imitation, 128 episodes an update, 4 epochs
    # more updates per collected step: a quarter of the episodes an update, twice the passes over them
    "ppo_32x8": ["rollout.episodes_per_iteration=32", "learner.ppo_epochs=8"],
    # a learned value at chunk boundaries: GAE from a critic, one attempt a layout
    "gae": ["learner.advantage=gae", "rollout.group_size=1"],
    # a person standing by (the scripted expert plays them): half the practice episodes still unfinished after 16
    # steps taken over and finished, the person's steps cloned beside PPO's loss at full weight (HIL-SERL's
    # interventions); their steps count among the 100k
    "person_0.5": ["rollout.corrections=0.5", "learner.anchor=1.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/learning-speed-steps")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in CANDIDATES if not args.only or n in args.only.split(",")]
    entries = {}
    for name in names:
        runs = []
        for seed in seeds:
            overrides = [*CANDIDATES[name], f"seed={seed}", f"budget.env_steps={STEPS}", "eval.every=100000"]
            summary, _ = run_entry(f"{name}-seed{seed}", overrides, out, minutes=120.0)
            runs.append({"seed": seed, "initial_success": summary["initial_success"],
                         "success": summary["final_success"], "ci95": summary["final_ci95"],
                         "env_steps": summary["env_steps"], "iterations": summary["iterations"],
                         "wall_minutes": summary["wall_seconds"] / 60})
        entries[name] = {"overrides": CANDIDATES[name], "runs": runs,
                         "mean_success": float(np.mean([r["success"] for r in runs]))}
    base = entries[names[0]]["runs"][0]["initial_success"]
    halved = 1 - (1 - base) / 2
    best = max(entries, key=lambda n: entries[n]["mean_success"])
    write_result("learning_speed_steps", entries[best]["mean_success"] / halved, 1.0,
                 entries[best]["mean_success"] >= halved, initial_success=base, halved_at=halved, best=best,
                 steps=STEPS, entries=entries,
                 what=f"the best entry's mean held-out success after {STEPS:,} practice env steps over the base's "
                      "failures halved; met needs >= 1")
    rows = [f"| {n} | {' '.join(e['overrides']) or '(the default job)'} | "
            + " / ".join(f"{r['success']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for r in e["runs"])
            + f" | {e['mean_success']:.3f} | {' / '.join(str(r['iterations']) for r in e['runs'])} |"
            for n, e in entries.items()]
    write_section("learning_speed_steps", "bench/learning_speed_steps.py", [
        f"`PYTHONPATH=. .venv/bin/python bench/learning_speed_steps.py --seeds {args.seeds}` (bench/results/"
        f"learning_speed_steps.json). From {base:.3f}; halving the failures needs {halved:.3f} after {STEPS:,} "
        f"practice env steps.", "",
        f"| entry | overrides | held-out success at {STEPS // 1000}k steps, seeds {args.seeds} [95% CI] | mean | "
        "updates |", "|---|---|---|---|---|", *rows])
    print(json.dumps({n: e["mean_success"] for n, e in entries.items()}))


if __name__ == "__main__":
    main()
