"""The learners compared side by side (issue 5): every algorithm through the same loop, from the same base, with the
detector's reward and with the simulator's (the upper bound), beside two imitation baselines.

    PYTHONPATH=. .venv/bin/python bench/rl_comparison.py [--iterations N] [--out DIR] [--only NAME,...]
        [--detector FILE] [--eval-every K] [--eval-noise X] [--name NAME] [overrides...]

Each entry is one `flywheel run` of the default job (`make run`'s), the same in all but what the entry names, for a
budget of ``--iterations`` updates (not minutes: the detector's training and a cheaper update must not buy an entry
more practice). Every run evaluates on the same 500 held-out seeds at the start, every ``--eval-every`` iterations
(2, or a fifteenth of a longer budget) and at the end, so each entry has a curve of held-out success against practice
env steps, each point with its Wilson 95% interval. Every entry is evaluated acting alike: the flow from its mean
(``eval.noise``, ``--eval-noise`` 0), which is how PPO's snapshots ask to act and, for the flow VLA here, 0.04-0.05
better than a sample for the imitation-trained base too (0.538 against 0.490). Each entry records how it was
evaluated (``evaluated``), since a completed run is read as it was made.

- ``ALGORITHM-detector``: practice judged by the success detector. The first such run trains it; the others judge
  with that very detector (``detector.checkpoint``), so they differ in their learner alone. ``--detector FILE``
  gives every one of them a detector trained before (another comparison's, say).
- ``ALGORITHM-ground_truth``: judged by the simulator (``detector.name=ground_truth``): what a perfect detector
  would buy.
- ``imitation-demos``: the same number of updates on the base's 100 demonstrations alone (``learner.algorithm=
  imitation``, learner/imitation.py); its practice is one episode an iteration, kept from nothing.
- ``imitation-more_demos``: the same, with ``--more-demos`` demonstrations (default 200: as many again, from the
  same operators on new layouts), "more demonstrations, no RL".

The RL entries are ``--algorithms`` (filtered_bc, recap and ppo by default; ppo_sil, PPO with self-imitation, and
residual_ppo can be added), each with the settings in SETTINGS beside the default job's.

The result, ``bench/results/NAME.json`` (``--name``, rl_comparison by default): one entry per algorithm and reward
source (``algorithm``, ``reward``, ``initial_success``, ``final_success``, ``ci95``, ``env_steps``, ``evaluated``, the
curve), and the issue's three tests for the best of RECAP and PPO with the detector's reward: its failure rate against
the base's (``ratio``; target <= 0.5), the share of the ground-truth gain the detector's reward reaches (>= 0.8), and
its margin over filtered BC and both imitation baselines. A plot, ``bench/results/NAME.png``, goes to wandb too
(offline unless WANDB_API_KEY is set), and the table and plot to their section of bench/RESULTS.md.

A run already completed in ``--out`` is read, not run again: the comparison can be built up over several sittings.
One stopped, or completed at a smaller budget, is resumed to this one with its own config: a copy of a shorter
comparison's runs (``cp -r``) is extended to a longer one rather than started again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import RESULTS, write_result
from bench.common import write_section as section

ROOT = Path(__file__).resolve().parent.parent
RL = ("recap", "ppo", "ppo_sil", "residual_ppo")  # the candidates: RECAP, and PPO (flow-noise; with
#                                                   self-imitation, learner=ppo's default since issue 36; or residual)
# Each entry's own settings, beside the default job's: PPO compares 4 attempts at each layout (GRPO); at this
# learning rate and these epochs its clip fraction stayed at 0.04-0.09 on the shipped base (3e-4 and 8 epochs:
# 0.16-0.34, and a worse policy after 8 updates; bench/RESULTS.md, "PPO's settings and exploration").
# Every entry practises 512 episodes an update (PPO's own choice is now 128: bench/learning_speed.py compares on the
# wall clock), so that the entries compare at equal practice per update.
PPO = ["rollout.group_size=4", "learner.ppo_lr=1e-4", "learner.ppo_epochs=4", "rollout.episodes_per_iteration=512"]
SETTINGS = {"ppo": [*PPO, "learner.self_imitation=0"], "ppo_sil": [*PPO, "learner.self_imitation=0.5"]}
ALGORITHM = {"ppo_sil": "ppo"}  # an entry that is a setting of another algorithm


def entries(algorithms: list[str], more_demos: int) -> dict[str, list[str]]:
    """Entry name -> the overrides that make it, on top of the default job."""
    out = {}
    for algorithm in algorithms:
        for reward in ("detector", "ground_truth"):
            out[f"{algorithm}-{reward}"] = [f"learner.algorithm={ALGORITHM.get(algorithm, algorithm)}",
                                            f"detector.name={'learned' if reward == 'detector' else reward}",
                                            *SETTINGS.get(algorithm, [])]
    imitation = ["learner.algorithm=imitation", "detector.name=ground_truth", "rollout.episodes_per_iteration=1"]
    out["imitation-demos"] = imitation
    out["imitation-more_demos"] = [*imitation, f"learner.demos={more_demos}"]
    return out


def run_entry(name: str, overrides: list[str], out: Path, detector: Path | None, iterations: int) -> dict:
    """One `flywheel run`, in a process of its own (its own Ray); its summary. One completed at this budget is only
    read; one stopped, or completed at a smaller budget, is resumed to this one with its own recorded config (the
    overrides a resumed run may take anew: budgets, eval.every), so a longer comparison extends a shorter one's runs."""
    from flywheel.resume import holds_a_run, resumable

    run_dir = out / name
    summary_path = run_dir / "summary.json"
    summary = completed(run_dir, iterations)
    if summary is not None:
        print(f"{name}: completed before, read from {run_dir}")
        return summary
    if holds_a_run(run_dir):
        overrides = [o for o in overrides if resumable(o.split("=", 1)[0])]
    elif detector is not None and name.endswith("-detector"):
        overrides = [*overrides, f"detector.checkpoint={detector}"]
    command = [sys.executable, "-m", "flywheel.cli", "run", f"run_dir={run_dir}", *overrides]
    print(f"{name}: {' '.join(command[2:])}", flush=True)
    with open(out / f"{name}.log", "a") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"{name}: `flywheel run` exited {done.returncode}; see {out / f'{name}.log'}")
    return json.loads(summary_path.read_text())


def completed(run_dir: Path, iterations: int) -> dict | None:
    """The run's summary if it completed at least ``iterations`` updates, else None."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    return summary if summary.get("status") == "completed" and summary.get("iterations", 0) >= iterations else None


def recorded_eval_noise(run_dir: Path) -> float | None:
    """The run's ``eval.noise`` as its config.yaml records it (None: it was not set)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(run_dir / "config.yaml").eval.get("noise")


def evaluated(noise: float | None, algorithm: str) -> str:
    """How the run's evaluations acted, from its recorded ``eval.noise``: "mean" (the flow from its mean) or
    "noise X" (the flow's starting noise X). Without it each learner's snapshot chose: PPO's acts from its mean,
    the others sample."""
    if noise is None:
        noise = 0.0 if algorithm == "ppo" else 1.0
    return "mean" if noise == 0 else f"noise {noise:g}"


def curve(run_dir: Path) -> list[dict]:
    """Held-out success at each evaluation, against the practice env steps before it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_at = {0: 0}
    for r in rows:
        if "env_steps" in r:
            steps_at[r["step"]] = r["env_steps"]
    return [{"iteration": r["step"], "env_steps": steps_at.get(r["step"], max(steps_at.values())),
             "version": r["eval/version"], "success": r["eval/success"],
             "ci95": [r["eval/ci95_low"], r["eval/ci95_high"]]} for r in rows if "eval/success" in r]


def plot(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_steps, by_updates) = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colours = {a: f"C{i}" for i, a in enumerate(["filtered_bc", *RL, "imitation"])}
    for r in results:
        points = r["curve"]
        y = np.array([p["success"] for p in points])
        err = np.abs(np.array([p["ci95"] for p in points]).T - y)
        style = dict(color=colours[r["algorithm"]], linestyle="--" if r["reward"] == "ground_truth" else "-",
                     marker="o", markersize=3, capsize=2, label=r["name"])
        if r["algorithm"] != "imitation":
            by_steps.errorbar([p["env_steps"] for p in points], y, yerr=err, **style)
        else:
            style.update(linestyle=":" if "more" in r["name"] else "-.")
        by_updates.errorbar([p["iteration"] for p in points], y, yerr=err, **style)
    base = results[0]["initial_success"]
    for ax in (by_steps, by_updates):
        ax.axhline(1 - (1 - base) / 2, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(alpha=0.3)
    by_steps.set(xlabel="practice env steps", ylabel="held-out success (500 seeds, 95% CI)",
                 title="RL: detector reward (solid), ground truth (dashed)")
    by_updates.set(xlabel="updates (iterations)", title="with the imitation baselines (grey: failures halved)")
    by_updates.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=12, help="updates per run (the budget every entry gets)")
    parser.add_argument("--out", default="runs/rl-comparison", help="where the runs are kept (re-used if complete)")
    parser.add_argument("--only", default="", help="comma-separated entry names to run now (others only read)")
    parser.add_argument("--more-demos", type=int, default=200, help="demonstrations of 'more demonstrations, no RL'")
    parser.add_argument("--algorithms", default="filtered_bc,recap,ppo", help="the RL entries (each with both rewards)")
    parser.add_argument("--detector", default="", help="a trained detector every detector entry judges with")
    parser.add_argument("--eval-every", type=int, default=0, help="iterations between evaluations (0: 2, or a "
                                                                  "fifteenth of a longer budget)")
    parser.add_argument("--eval-noise", type=float, default=0.0, help="the flow's starting noise in every entry's "
                                                                      "evaluation (eval.noise; 0: from its mean)")
    parser.add_argument("--name", default="rl_comparison", help="the result's name: bench/results/NAME.json, .png "
                                                                "and its section of bench/RESULTS.md")
    args, overrides = parser.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every = args.eval_every or max(2, args.iterations // 15)
    common = [f"budget.iterations={args.iterations}", "budget.minutes=600", f"eval.every={every}",
              f"eval.noise={args.eval_noise}", *overrides]
    wanted = set(filter(None, args.only.split(",")))
    detector_path = Path(args.detector) if args.detector else out / "filtered_bc-detector" / "detector" / \
        "detector-1.safetensors"
    if args.detector and not detector_path.exists():
        raise SystemExit(f"--detector {detector_path}: no such file (a run's detector is RUN/detector/detector-N"
                         ".safetensors)")
    results = []
    for name, own in entries(args.algorithms.split(","), args.more_demos).items():
        if wanted and name not in wanted and completed(out / name, args.iterations) is None:
            continue  # not asked for now, and not complete at this budget: neither run nor resumed
        summary = run_entry(name, [*common, *own], out, detector_path if detector_path.exists() else None,
                            args.iterations)
        algorithm, reward = name.split("-", 1)
        noise = recorded_eval_noise(out / name)
        results.append({
            "name": name, "algorithm": algorithm, "reward": "none" if algorithm == "imitation" else reward,
            "overrides": [o for o in [*common, *own]  # as it was made: a run read from before may lack eval.noise
                          if not o.startswith("eval.noise=") or noise is not None],
            "initial_success": summary["initial_success"],
            "final_success": summary["final_success"], "ci95": summary["final_ci95"],
            "env_steps": summary["env_steps"], "episodes": summary["episodes"], "iterations": summary["iterations"],
            "eval_episodes": summary["eval_episodes"], "final_outcomes": summary.get("final_outcomes", ""),
            "policy_version_final": summary["policy_version_final"], "rollbacks": len(summary.get("rollbacks", [])),
            "wall_seconds": summary["wall_seconds"], "detector_auroc": summary.get("detector", {}).get("auroc"),
            "evaluated": evaluated(noise, ALGORITHM.get(algorithm, algorithm)), "curve": curve(out / name)})
    if not results:
        raise SystemExit("no entry run or found")
    verdict = judge(results)
    fig = plot(results, RESULTS / f"{args.name}.png")
    write_result(args.name, verdict["ratio"], 0.5, verdict["met"], as_run(), entries=results,
                 **{k: v for k, v in verdict.items() if k not in ("ratio", "met")},
                 what="the best of RECAP and PPO with the detector's reward: final failure rate / the base's, over "
                      f"{args.iterations} updates of the default job (500 held-out seeds); met also needs >= 0.8 of "
                      "the ground-truth gain, and beating filtered BC and both imitation baselines",
                 plot=f"bench/results/{args.name}.png", iterations=args.iterations)
    write_section(results, verdict, args.iterations, args.name)
    log_to_wandb(results, fig, args.name)


def write_section(results: list[dict], verdict: dict, iterations: int, name: str) -> None:
    """The comparison's table and plot in bench/RESULTS.md, between markers of its name (replaced on every run)."""
    rows = ["| entry | reward | evaluated | held-out success: start → end [95% CI] | gain | practice env steps | "
            "updates | rollbacks | wall (machine shared or not) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['name']} | {r['reward']} | {r.get('evaluated', 'sample')} | "
                    f"{r['initial_success']:.3f} → **{r['final_success']:.3f}** "
                    f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['final_success'] - r['initial_success']:+.3f} | "
                    f"{r['env_steps']:,} | {r['iterations']} | {r['rollbacks']} | {r['wall_seconds'] / 60:.1f} min |")
    share = verdict.get("detector_share_of_ground_truth_gain")
    lines = [f"### RL fine-tuning compared (issue 5): {iterations} updates each, the default job", "",
             f"`PYTHONPATH=. .venv/bin/python bench/rl_comparison.py {' '.join(as_run())}` (bench/results/"
             f"{name}.json has every entry's curve and overrides)", "", *rows, "",
             f"- best of RECAP and PPO with the detector's reward: **{verdict.get('best')}**; failure rate / the "
             f"base's: {_fmt(verdict.get('ratio'))} (target <= 0.5)",
             f"- its gain / the same algorithm's with ground-truth reward: {_fmt(share)} (target >= 0.8)",
             "- its margin over " + ", ".join(
                 f"{k} {v:+.3f} [{verdict['margin_ci95'][k][0]:+.3f}, {verdict['margin_ci95'][k][1]:+.3f}]"
                 + (" paired" if verdict.get("margin_paired", {}).get(k) else "")
                 for k, v in verdict.get("margin_over", {}).items()),
             f"- all met: **{verdict.get('met')}**", "", "![held-out success against env steps and updates]"
             f"(results/{name}.png)"]
    section(name, "bench/rl_comparison.py", lines)


def as_run() -> list[str]:
    """This command's arguments without ``--only``: the command that makes (or re-reads) every entry."""
    args, out = sys.argv[1:], []
    while args:
        a = args.pop(0)
        if a == "--only":
            args.pop(0)
        elif not a.startswith("--only="):
            out.append(a)
    return out


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def judge(results: list[dict]) -> dict:
    """The issue's three tests, for the best of RECAP and PPO with the detector's reward (as far as entries exist)."""
    by = {r["name"]: r for r in results}
    candidates = [by[f"{a}-detector"] for a in RL if f"{a}-detector" in by]
    if not candidates:
        return {"ratio": None, "met": None, "best": None}
    best = max(candidates, key=lambda r: r["final_success"])
    base = best["initial_success"]
    ratio = (1 - best["final_success"]) / (1 - base)
    truth = by.get(f"{best['algorithm']}-ground_truth")
    share = ((best["final_success"] - base) / (truth["final_success"] - truth["initial_success"])
             if truth and truth["final_success"] > truth["initial_success"] else None)
    others = [o for o in ("filtered_bc-detector", "imitation-demos", "imitation-more_demos") if o in by]
    margins = {o: best["final_success"] - by[o]["final_success"] for o in others}
    judged = {o: difference_interval(best, by[o]) for o in others}
    intervals, paired = {o: i for o, (i, _) in judged.items()}, {o: p for o, (_, p) in judged.items()}
    # "beats" with 95% confidence: a margin whose interval lies above zero, not one that chance alone could give
    met = bool(ratio <= 0.5 and share is not None and share >= 0.8 and len(margins) == 3
               and all(low > 0 for low, _ in intervals.values()))
    return {"ratio": ratio, "met": met, "best": best["name"], "detector_share_of_ground_truth_gain": share,
            "margin_over": margins, "margin_ci95": intervals, "margin_paired": paired}


def difference_interval(a: dict, b: dict) -> tuple[list[float], bool]:
    """A 95% interval of the difference of two entries' final success rates. Paired where both runs kept their
    per-seed outcomes (the same held-out seeds, in the same order): the normal interval of the mean per-seed
    difference, which the shared layouts make narrower. Otherwise the two evaluations are taken as independent
    samples, which for shared seeds is if anything too wide. Returns the interval and whether it was paired."""
    p, q = a["final_success"], b["final_success"]
    x, y = a.get("final_outcomes") or "", b.get("final_outcomes") or ""
    paired = bool(x) and len(x) == len(y)
    if paired:
        from flywheel.gate import paired_difference  # the promotion gate's own paired test

        half = 1.96 * paired_difference(np.array(list(map(int, x))), np.array(list(map(int, y))))[1]
    else:
        half = 1.96 * np.sqrt(p * (1 - p) / a["eval_episodes"] + q * (1 - q) / b["eval_episodes"])
    return [float(p - q - half), float(p - q + half)], paired


def log_to_wandb(results: list[dict], fig, name: str) -> None:
    try:
        import wandb
    except ImportError:
        return
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    run = wandb.init(project="flywheel", name=name.replace("_", "-"), job_type="bench", mode=mode,
                     dir=str(ROOT / "runs"), reinit="finish_previous")
    table = wandb.Table(columns=["name", "algorithm", "reward", "initial_success", "final_success", "ci95_low",
                                 "ci95_high", "env_steps"])
    for r in results:
        table.add_data(r["name"], r["algorithm"], r["reward"], r["initial_success"], r["final_success"], *r["ci95"],
                       r["env_steps"])
    run.log({f"{name}/table": table, f"{name}/plot": wandb.Image(fig)})
    run.finish()


if __name__ == "__main__":
    main()
