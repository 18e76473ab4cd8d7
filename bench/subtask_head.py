"""The subtask head (issue 37): does naming the next subtask in words, π0.5-style, let a VLA do long-horizon tasks?

    PYTHONPATH=. .venv/bin/python bench/subtask_head.py [--out runs/subtask] [--episodes 100] [--steps 3000]

Two fine-tunings of the shipped six-family base (``base:suite``) on the same 400 scripted demonstrations of the
suite and the two long-horizon families (``env.family=suite,clear,stow``), each ``flywheel pretrain`` for ``--steps``
steps (made in ``--out`` unless already there): one flat, acting on the task instruction, and one with a subtask
head (``subtask_head=true``), whose low level learns to act on the narrated subtask and whose head learns to name it.
Besides them, the base unchanged with a subtask head trained alone (``fit_subtask_head``, ``--head-steps``) on the
narration of ``--head-demos`` other demonstrations of the long-horizon families: skills it has, chained by words;
and the fine-tuned one with a subtask head, its head then trained alone on the same narration.

Each is evaluated on ``--episodes`` held-out seeds of each long-horizon family (sort, clear, stow), acting from the
flow's mean: on the task instruction, on the subtask its head names, and on the subtask the simulator sees under way
(an oracle: what a perfect head would give). The head's accuracy is measured on held-out demonstrations: the
fraction of their steps where it names what the expert said it was doing, and where it names one of the episode's
own subtasks at all.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from actors.rollout import make_env, run_episodes
from actors.tabletop import split_seed
from bench.common import write_result, write_section
from flywheel.contracts import Extras, sensor_inputs
from flywheel.metrics import wilson_interval
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import SmallVLA, VLAPolicy
from learner.bc import fit_subtask_head

LONG = ("sort", "clear", "stow")
PRETRAIN = ["init=base:suite", "env.family='suite,clear,stow'", "demos=400", "lr=3e-4", "warmup=200",
            "eval_every=1000", "eval_episodes=480"]


class UnderWay(gym.Wrapper):
    """The oracle: the instruction the policy reads is the subtask the simulator sees under way."""

    def __getattr__(self, name: str):  # the rollout's look at the tabletop itself (its state, its deferred drawing)
        return getattr(self.env, name)

    def _told(self, info: dict) -> dict:
        names = self.env.unwrapped.subtasks()
        return {**info, "instruction": names[min(self.env.unwrapped.subtask_index(), len(names) - 1)]}

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        return obs, self._told(info)

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        return obs, reward, term, trunc, self._told(info)


def pretrained(out: Path, name: str, steps: int, head: bool) -> Path:
    path = out / name / "base_vla.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "flywheel.cli", "pretrain", f"out_dir={out / name}", f"steps={steps}",
                        *PRETRAIN, *(["subtask_head=true"] if head else [])], check=True)
    return path


def success(model: SmallVLA, family: str, n: int, acting_on: str) -> dict:
    policy = VLAPolicy(model=model, eval_noise=0.0)
    policy.subtasks = acting_on == "its subtask"
    wrap = (lambda **kw: UnderWay(make_env(**kw))) if acting_on == "the simulator's subtask" else make_env
    eps = run_episodes([split_seed("eval", i) for i in range(n)], "eval", policy, policy_version=0, family=family,
                       make_env=wrap)
    ok = int(sum(ep.ground_truth["success"] for ep in eps))
    return {"success": ok / len(eps), "ci95": [round(x, 3) for x in wilson_interval(ok, len(eps))]}


def head_accuracy(model: SmallVLA, demos: list) -> dict:
    """Over every step of the held-out demonstrations: the head names the narrated subtask / one of the episode's."""
    right, valid = [], []
    for ep in demos:
        steps = np.arange(ep.num_steps)
        named = model.subtask_texts(*sensor_inputs(ep.observations, model.sensors, steps), ep.instruction)
        said = [ep.info["subtasks"][k] for k in ep.extras[Extras.NARRATION]]
        right += [a == b for a, b in zip(named, said)]
        valid += [a in ep.info["subtasks"] for a in named]
    return {"narrated": round(float(np.mean(right)), 3), "one_of_its_own": round(float(np.mean(valid)), 3),
            "steps": len(right)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/subtask")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--head-steps", type=int, default=3000)
    ap.add_argument("--head-demos", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    flat, _ = load_policy_checkpoint(str(pretrained(out, "flat", args.steps, False)), as_model=True)
    tuned, _ = load_policy_checkpoint(str(pretrained(out, "head", args.steps, True)), as_model=True)
    alone, _ = load_policy_checkpoint("base:suite", as_model=True, subtask_head=True)
    demos = run_episodes([split_seed("train", 400 + i) for i in range(args.head_demos)], "train", None,
                         policy_version=-1, family=",".join(LONG))  # seeds the pretraining's 400 did not use
    fit_subtask_head(alone, demos, args.head_steps, generator=torch.Generator().manual_seed(0))
    # the fine-tuned low level, its head trained on as much narration as the alone one's
    both, _ = load_policy_checkpoint(str(out / "head" / "base_vla.safetensors"), as_model=True)
    fit_subtask_head(both, demos, args.head_steps, generator=torch.Generator().manual_seed(0))
    del demos
    base, _ = load_policy_checkpoint("base:suite", as_model=True)
    held_out = {f: run_episodes([split_seed("holdout", i) for i in range(20)], "holdout", None, policy_version=-1,
                                family=f) for f in LONG}
    models = {  # name: (model, what it acts on)
        "the base, flat": (base, ["the task", "the simulator's subtask"]),
        "the base with a subtask head trained alone": (alone, ["its subtask"]),
        "fine-tuned flat": (flat, ["the task", "the simulator's subtask"]),
        "fine-tuned with a subtask head": (tuned, ["its subtask", "the task", "the simulator's subtask"]),
        "fine-tuned with a subtask head, which then trained alone": (both, ["its subtask"]),
    }
    rows = {}
    for name, (model, modes) in models.items():
        rows[name] = {mode: {f: success(model, f, args.episodes, mode) for f in LONG} for mode in modes}
        if "subtask" in model.capabilities:
            rows[name]["head accuracy"] = {f: head_accuracy(model, held_out[f]) for f in LONG}
        print(name, rows[name], flush=True)
    mean = lambda name, mode: float(np.mean([rows[name][mode][f]["success"] for f in LONG]))  # noqa: E731
    best = "fine-tuned with a subtask head, which then trained alone"
    with_head, flat_tuned = mean(best, "its subtask"), mean("fine-tuned flat", "the task")
    write_result("subtask_head", with_head - flat_tuned, None, None, rows=rows, episodes=args.episodes,
                 steps=args.steps, head_steps=args.head_steps, head_demos=args.head_demos,
                 what="mean held-out success over sort, clear and stow: fine-tuned with a subtask head (then trained "
                      "alone on more narration), acting on the subtask it names, minus fine-tuned flat on the task")
    table = ["| model | acting on | " + " | ".join(LONG) + " |", "|---|---|" + "---|" * len(LONG)]
    for name, modes in rows.items():
        for mode, by in modes.items():
            if mode == "head accuracy":
                continue
            table.append(f"| {name} | {mode} | " + " | ".join(
                f"{by[f]['success']:.2f} [{by[f]['ci95'][0]:.2f}, {by[f]['ci95'][1]:.2f}]" for f in LONG) + " |")
    accuracy = ["| head | " + " | ".join(LONG) + " |", "|---|" + "---|" * len(LONG)]
    for name, modes in rows.items():
        if "head accuracy" in modes:
            accuracy.append(f"| {name} | " + " | ".join(
                f"{modes['head accuracy'][f]['narrated']:.2f} ({modes['head accuracy'][f]['one_of_its_own']:.2f})"
                for f in LONG) + " |")
    write_section("subtask_head", "bench/subtask_head.py", [
        f"`PYTHONPATH=. .venv/bin/python bench/subtask_head.py --episodes {args.episodes} --steps {args.steps}",
        f"--head-steps {args.head_steps} --head-demos {args.head_demos}`: {args.episodes} held-out seeds a family, "
        "acting from the flow's mean; success [95% interval].", "",
        *table, "",
        "The subtask head's accuracy on 20 held-out demonstrations a family: the fraction of their steps where it",
        "names what the expert narrated (and, in brackets, one of the episode's own subtasks):", "", *accuracy])


if __name__ == "__main__":
    main()
