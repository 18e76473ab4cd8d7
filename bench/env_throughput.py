"""Built-in tabletop throughput on one core: stepping with the 64x64 camera against the same physics without
rendering, measured in the same run (the ratio is what to compare across machines).

    .venv/bin/python bench/env_throughput.py [--steps 20000]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from actors.tabletop import TabletopEnv


def steps_per_second(render: bool, steps: int, seed: int = 0) -> float:
    env = TabletopEnv()
    if not render:  # same physics, observation without the image
        env.render_image = lambda: None  # type: ignore[method-assign]
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, 3)).astype(np.float32)
    env.reset(seed=seed)
    start = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    physics = max(steps_per_second(False, args.steps, r) for r in range(args.repeats))
    rendered = max(steps_per_second(True, args.steps, r) for r in range(args.repeats))
    print(json.dumps({"physics_steps_per_s": round(physics), "rendered_steps_per_s": round(rendered),
                      "render_cost_ratio": round(physics / rendered, 2)}))


if __name__ == "__main__":
    main()
