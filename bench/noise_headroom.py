"""How much a flow policy's starting noise alone can buy (issue 36): can steering it (DSRL) halve the base's failures?

    PYTHONPATH=. .venv/bin/python bench/noise_headroom.py [--seeds 500] [--draws 8] [--checkpoint base]

DSRL (flywheel/dsrl.py, flywheel/vla/noise.py) leaves the policy's weights alone and learns which starting noise to
give its flow. It can reach at most what some noise reaches. On the held-out seeds, the base acts ``--draws`` times
from fresh standard-normal noises (and once from its mean, noise 0, as it is evaluated); a seed counts as reachable
when any of the first k draws succeeds. The best of k is the success of an oracle that picks among k whole-episode
noise draws. A learned noise policy picks per chunk, so it could do better than this, but only by steering each chunk
to a noise that random draws rarely find. The figure compares the best of ``--draws`` with the halving target.
"""

from __future__ import annotations

import argparse

import numpy as np

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import write_result, write_section
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import VLAPolicy

ENV = {"name": "tabletop", "family": "any", "sensors": ("overhead", "wrist"), "image_size": 64, "max_steps": 40}


def outcomes(model, seeds: list[int], noise: float, sample_seed: int) -> np.ndarray:
    policy = VLAPolicy(model=model, eval_noise=noise)
    return np.array([bool(ep.ground_truth["success"]) for ep in
                     run_episodes(seeds, "eval", policy, policy_version=0, sample_seed=sample_seed, **ENV)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--checkpoint", default="base")
    args = ap.parse_args()
    model, _ = load_policy_checkpoint(args.checkpoint, as_model=True)
    seeds = [split_seed("eval", i) for i in range(args.seeds)]  # the run's held-out seeds
    mean = outcomes(model, seeds, 0.0, 12345)
    draws = np.stack([outcomes(model, seeds, 1.0, 1000 + k) for k in range(args.draws)])
    best = {k: float(draws[:k].max(0).mean()) for k in range(1, args.draws + 1)}
    halved = float(1 - (1 - mean.mean()) / 2)
    stuck = float(1 - np.maximum(draws.max(0), mean).mean())
    write_result("noise_headroom", best[args.draws] / halved, 1.0, bool(best[args.draws] >= halved),
                 from_mean=float(mean.mean()), one_draw=best[1], best_of=best, halving_target=halved,
                 failed_every_time=stuck, seeds=args.seeds, draws=args.draws, checkpoint=args.checkpoint,
                 what=f"held-out success of the best of {args.draws} starting-noise draws over the base's failures "
                      "halved: whether steering the flow's noise alone (DSRL) could halve them; met needs >= 1")
    write_section("noise_headroom", "bench/noise_headroom.py", [
        f"`PYTHONPATH=. .venv/bin/python bench/noise_headroom.py --seeds {args.seeds} --draws {args.draws}` "
        f"(policy `{args.checkpoint}`, {args.seeds} held-out seeds)", "",
        "| acting from | held-out success |", "|---|---|",
        f"| its mean (noise 0, as evaluated) | {mean.mean():.3f} |",
        *[f"| the best of {k} standard-normal noise draws | {best[k]:.3f} |" for k in (1, 2, 4, args.draws)
          if k <= args.draws],
        f"| (halving the failures from its mean) | {halved:.3f} |", "",
        f"{stuck:.3f} of the seeds failed from the mean and from every draw."])


if __name__ == "__main__":
    main()
