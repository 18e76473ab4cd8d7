"""Built-in tabletop throughput on one core: stepping with the 64x64 camera against the same physics without
rendering, and both against a bare Python loop over the same actions, all measured in the same run (the ratios are
what to compare across machines).

    .venv/bin/python bench/env_throughput.py [--steps 20000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from actors.tabletop import SUITE, TabletopEnv, reference_image


def steps_per_second(render: str, steps: int, seed: int = 0, family: str = "any") -> float:
    """render: "fast" (the env's renderer), "reference" (every shape over the whole grid) or "none" (physics only)."""
    env = TabletopEnv(family=family)
    if render == "none":  # same physics, observation without the image
        env.render_image = lambda: None  # type: ignore[method-assign]
    elif render == "reference":
        env.render_image = lambda: reference_image(env)  # type: ignore[method-assign]
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, 3)).astype(np.float32)
    env.reset(seed=seed)
    start = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - start)


def bare_loop_per_second(steps: int, seed: int = 0) -> float:
    """The machine's pace for a Python loop that calls a function per action and does nothing else."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, 3)).astype(np.float32)

    def noop(a):
        return a

    start = time.perf_counter()
    for a in actions:
        noop(a)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bare = max(bare_loop_per_second(args.steps, r) for r in range(args.repeats))
    physics = max(steps_per_second("none", args.steps, r) for r in range(args.repeats))
    rendered = max(steps_per_second("fast", args.steps, r) for r in range(args.repeats))
    reference = max(steps_per_second("reference", args.steps, r) for r in range(args.repeats))
    print(json.dumps({
        "bare_loop_per_s": round(bare),
        "physics_steps_per_s": round(physics),
        "rendered_steps_per_s": round(rendered),
        "reference_rendered_steps_per_s": round(reference),
        # time of a rendered step over a physics-only step; rendering costs no more than the physics while <= 2
        "rendered_over_physics": round(physics / rendered, 2),
        "render_over_physics": round(physics / rendered - 1, 2),  # the render's own time over the physics' time
        "reference_render_over_physics": round(physics / reference - 1, 2),
        "rendered_step_over_bare_loop": round(bare / rendered, 1),
    }))
    # Per family of the suite: microseconds per step, physics only and rendered, and the render's share.
    for family in SUITE:
        phys = max(steps_per_second("none", args.steps // 5, r, family) for r in range(args.repeats))
        rend = max(steps_per_second("fast", args.steps // 5, r, family) for r in range(args.repeats))
        print(json.dumps({"family": family, "physics_us": round(1e6 / phys, 1), "rendered_us": round(1e6 / rend, 1),
                          "render_over_physics": round(phys / rend - 1, 2)}))


if __name__ == "__main__":
    main()
