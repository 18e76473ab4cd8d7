"""The rollout step's hot path, before and after (issue 7, item 7): the same measurements of this tree and of an
earlier git revision, in separate processes taken in turns (A, B, A, B, ...), best of each.

    PYTHONPATH=. .venv/bin/python bench/rollout_profile.py [--against 53f74d1] [--rounds 3] [--name rollout_profile]

``--against`` checks the revision out into a temporary git worktree (removed after) and runs this file's
``--measure`` there, importing that tree's code; the revision must have the shipped base checkpoint. Measured on one
core (one torch thread), the default run's cameras (overhead and wrist), the shipped base VLA:

- ``env_step_us``: one step of the tabletop with both cameras rendered (random actions, resets included);
- ``reset_us``: making an environment and resetting it, once per episode;
- ``act_1_ms`` / ``act_16_ms``: one policy call for 1 and for 16 observations (a chunk, 10 flow steps);
- ``batched_steps_per_s`` / ``single_steps_per_s``: env steps/s of 16 episodes stepped together with one batched
  policy call per chunk, and of the same episodes one at a time (bench/rollout.py's batched_inference), and the
  share of each spent inside the policy.

Writes ``rollout_profile`` (batched collection, after / before) with every figure of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _best(job, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - started)
    return best


class PolicyClock:
    """Adds up the seconds spent inside ``policy.act`` (``seconds``) while it stands in for it; ``stop()`` puts the
    policy back as it was."""

    def __init__(self, policy):
        self.policy, self.act, self.seconds = policy, policy.act, 0.0
        policy.act = self

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.act(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def stop(self) -> None:
        del self.policy.act  # the instance attribute goes; the class's method shows again


def measure() -> dict:
    """Every figure, for the code this process imports."""
    import numpy as np
    import torch

    from actors.rollout import make_env, run_episodes
    from actors.tabletop import split_seed
    from flywheel.vla.checkpoint import load_policy_checkpoint
    from flywheel.vla.model import VLAPolicy

    torch.set_num_threads(1)
    sensors = ["overhead", "wrist"]
    env = make_env(sensors=sensors)
    actions = np.random.default_rng(0).uniform(-1, 1, (3000, 3)).astype(np.float32)

    def steps():
        env.reset(seed=1)
        for a in actions:
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()

    def resets():
        for i in range(200):
            make_env(sensors=sensors).reset(seed=i)

    cfg, weights, _ = load_policy_checkpoint("base")
    policy = VLAPolicy(cfg)
    policy.load_weights(weights)
    seeds = [split_seed("train", 9_000_000 + i) for i in range(16)]
    first = run_episodes(seeds, "train", policy, policy_version=0, sensors=sensors)
    images = np.stack([ep.observations["image"][0] for ep in first])
    proprio = np.stack([ep.observations["proprio"][0] for ep in first])
    texts = [ep.instruction for ep in first]

    def calls(n):
        return lambda: [policy.act(images[:n], proprio[:n], texts[:n], seed=0) for _ in range(20)]

    clock = PolicyClock(policy)

    def collection(batched: bool):
        clock.seconds, started = 0.0, time.perf_counter()
        eps = run_episodes(seeds, "train", policy, policy_version=0, sensors=sensors) if batched else \
            [ep for s in seeds for ep in run_episodes([s], "train", policy, policy_version=0, sensors=sensors)]
        return sum(ep.num_steps for ep in eps), time.perf_counter() - started, clock.seconds

    out = {"env_step_us": _best(steps) / len(actions) * 1e6, "reset_us": _best(resets) / 200 * 1e6,
           "act_1_ms": _best(calls(1)) / 20 * 1e3, "act_16_ms": _best(calls(16)) / 20 * 1e3}
    for name, batched in (("batched", True), ("single", False)):
        runs = [collection(batched) for _ in range(5)]
        n, wall, policy_s = min(runs, key=lambda r: r[1] / r[0])
        out[f"{name}_steps_per_s"] = n / wall
        out[f"{name}_policy_share"] = policy_s / wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", default="53f74d1", help="the git revision to compare with (before)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each side; the best of each figure is kept")
    parser.add_argument("--name", default="rollout_profile", help="the result's name (bench/results/NAME.json)")
    parser.add_argument("--measure", action="store_true", help="measure the code on PYTHONPATH and print JSON")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure()))
        return
    from bench.common import write_result

    with tempfile.TemporaryDirectory() as tmp:
        before_tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(before_tree), args.against],
                       check=True)
        try:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(args.rounds):
                for side, tree in (("before", before_tree), ("after", ROOT)):
                    env = {**os.environ, "PYTHONPATH": str(tree)}
                    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure"], cwd=tree,
                                          env=env, check=True, capture_output=True, text=True)
                    runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(side, {k: round(v, 3) for k, v in runs[side][-1].items()}, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], check=False)

    def best(side: str, key: str) -> float:
        """Steps/s: the largest; times: the smallest; the policy's share of a collection: the median."""
        values = sorted(r[key] for r in runs[side])
        return values[len(values) // 2] if key.endswith("share") else \
            values[-1] if key.endswith("steps_per_s") else values[0]

    figures = {side: {k: round(best(side, k), 4) for k in runs[side][0]} for side in runs}
    faster = {k: round(figures["after"][k] / figures["before"][k] if k.endswith("steps_per_s")
                       else figures["before"][k] / figures["after"][k], 3)
              for k in figures["after"] if not k.endswith("share")}
    ratio = figures["after"]["batched_steps_per_s"] / figures["before"]["batched_steps_per_s"]
    write_result(args.name, ratio, None, None, against=args.against, rounds=args.rounds,
                 what=f"env steps/s of 16 episodes stepped together with one batched policy call per chunk: this tree "
                      f"/ {args.against}, separate processes in turns, best of {args.rounds}",
                 before=figures["before"], after=figures["after"], times_faster=faster)


if __name__ == "__main__":
    main()
