"""Verbal coaching against success verdicts alone (issue 37): what do N minutes of a coach's words buy?

    PYTHONPATH=. .venv/bin/python bench/coaching.py [--out runs/coaching] [--minutes 12] [--seeds 0]

The base: the shipped six-family base (``base:suite``), which can put a block in a bowl when told which, with a
subtask head trained alone on the narration of ``--head-demos`` scripted sort demonstrations (``fit_subtask_head``).
It has the skills; on "sort the blocks into the bowls of their colour" its own words rarely chain them.

Two runs of the default job on sort from that base, each for ``--minutes`` of wall clock, with one detector trained
before them (a run of one small iteration) and the base's demonstrations replayed:
- **verdicts**: practice judged by the detector alone. The head learns from the words of the policy's own approved
  successes (self-imitation) and from the demonstrations' narration;
- **coaching**: the same, with a scripted coach standing by in every practice episode (``rollout.coaching=1``): where
  the head names nothing left to do it says what is, the policy acts on that, and the learner takes the words as
  the head's targets there. A coached episode is not credited as the policy's success.
Each run's final evaluation is on the same ``--eval`` held-out seeds, from the policy's own words, so the two are
compared seed by seed. Written to bench/results/coaching.json and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import write_result, write_section
from bench.subtask_head import head_accuracy
from flywheel.gate import paired_difference
from flywheel.vla.checkpoint import load_policy_checkpoint, save_policy
from learner.bc import fit_subtask_head

ARMS = {"verdicts": [], "coaching": ["rollout.coaching=1.0"]}


def base(out: Path, demos: int, steps: int) -> Path:
    """base:suite with a subtask head trained alone on ``demos`` narrated sort demonstrations (made once)."""
    path = out / "base" / "base_vla.safetensors"
    if path.exists():
        return path
    model, meta = load_policy_checkpoint("base:suite", as_model=True, subtask_head=True)
    made = run_episodes([split_seed("train", i) for i in range(demos)], "train", None, policy_version=-1,
                        family="sort")
    fit_subtask_head(model, made, steps, generator=torch.Generator().manual_seed(0))
    config = {**meta["config"], "demos": demos, "env": {**meta["config"]["env"], "family": "sort"}}
    save_policy(path, model, {**meta, "config": config, "description": f"base:suite with a subtask head trained "
                              f"alone for {steps} steps on the narration of {demos} sort demonstrations"})
    return path


def flywheel_run(run_dir: Path, overrides: list[str]) -> dict:
    """One ``flywheel run`` (made once: a run already in ``run_dir`` is read)."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        with open(f"{run_dir}.log", "w") as log:
            subprocess.run([sys.executable, "-m", "flywheel.cli", "run", f"run_dir={run_dir}", *overrides],
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(summary.read_text())


def practice(run_dir: Path) -> dict:
    """What the run practised: updates, episodes, the coach's share and its words, from its metrics."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/coached" in r]
    episodes = np.diff([0] + [r["episodes"] for r in rows])
    return {"updates": len(rows), "episodes": int(episodes.sum()), "env_steps": int(rows[-1]["env_steps"]),
            "coached_share": round(float(np.average([r["rollout/coached"] for r in rows], weights=episodes)), 3),
            "coach_words": int(round(sum(r["rollout/coach_words"] * e for r, e in zip(rows, episodes))))}


def final_policy(run_dir: Path, summary: dict):
    path = run_dir / "checkpoints" / f"policy-{summary['policy_version_final']:06d}.safetensors"
    return load_policy_checkpoint(str(path), as_model=True)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/coaching")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--head-demos", type=int, default=30)
    ap.add_argument("--head-steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    started = time.time()
    path = base(out, args.head_demos, args.head_steps)
    job = [f"policy.checkpoint={path}", "env.family=sort", f"learner.demos={args.head_demos}", "eval.noise=0",
           f"eval.episodes={args.eval}", "eval.robust_episodes=0", "wandb.mode=disabled"]
    first = flywheel_run(out / "detector", [*job, "detector.checkpoint=", "budget.iterations=1",
                                            "rollout.episodes_per_iteration=8", "gate.episodes=0"])
    detector = sorted((out / "detector" / "detector").glob("detector-*.safetensors"))[-1]
    held_out = run_episodes([split_seed("holdout", i) for i in range(20)], "holdout", None, policy_version=-1,
                            family="sort")
    base_model = load_policy_checkpoint(str(path), as_model=True)[0]
    rows: dict[str, dict] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm, extra in ARMS.items():
            run_dir = out / f"{arm}_seed{seed}"
            summary = flywheel_run(run_dir, [*job, f"detector.checkpoint={detector}", f"budget.minutes={args.minutes}",
                                             f"seed={seed}", *extra])
            rows[f"{arm}_seed{seed}"] = {
                "arm": arm, "seed": seed, "initial": round(summary["initial_success"], 3),
                "final": round(summary["final_success"], 3), "ci95": [round(x, 3) for x in summary["final_ci95"]],
                "outcomes": summary["final_outcomes"], **practice(run_dir),
                "head_accuracy": head_accuracy(final_policy(run_dir, summary), held_out),
            }
    paired = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        a, b = (np.array([c == "1" for c in rows[f"{arm}_seed{seed}"]["outcomes"]], float) for arm in ARMS)
        diff, se = paired_difference(b, a)
        paired[seed] = {"coaching_minus_verdicts": round(diff, 3), "ci95": [round(diff - 1.96 * se, 3),
                                                                            round(diff + 1.96 * se, 3)]}
    result = {"base_head_accuracy": head_accuracy(base_model, held_out), "detector": first["detector"],
              "minutes": args.minutes, "rows": rows, "paired": paired, "seconds": round(time.time() - started)}
    gain = float(np.mean([p["coaching_minus_verdicts"] for p in paired.values()]))
    written = write_result("coaching", round(gain, 3), None, None, **result,
                           what="held-out sort success from the policy's own words after --minutes of practice with "
                                "a scripted coach, minus after as many minutes judged by the detector alone (paired "
                                "over the held-out seeds; mean over --seeds)")
    write_section("coaching", "bench/coaching.py", section(result, written["command"]))


def section(result: dict, command: str) -> list[str]:
    lines = [f"`{command}` (bench/results/coaching.json).",
             f"The base's head, on 20 held-out sort demonstrations: {result['base_head_accuracy']['narrated']} of "
             f"steps named as narrated, {result['base_head_accuracy']['one_of_its_own']} one of the episode's own",
             f"subtasks. The detector: held-out AUROC {result['detector']['auroc']:.3f}.", "",
             "| run | held-out success from its own words: start -> end [95% CI] | updates | practice episodes "
             "| coached | the coach's words | head accuracy (narrated / its own) |", "|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        h = r["head_accuracy"]
        lines.append(f"| {name} | {r['initial']:.3f} -> **{r['final']:.3f}** [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                     f" | {r['updates']} | {r['episodes']} | {r['coached_share']:.2f} | {r['coach_words']} "
                     f"| {h['narrated']} / {h['one_of_its_own']} |")
    lines.append("")
    for seed, p in result["paired"].items():
        lines.append(f"- seed {seed}: coaching minus verdicts alone, paired over the held-out seeds: "
                     f"**{p['coaching_minus_verdicts']:+.3f}** [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]")
    return lines


if __name__ == "__main__":
    main()
