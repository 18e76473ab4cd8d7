"""Rollout throughput: what Ray costs, how actors scale, and what batching the policy buys (issue 7, items 1-3).

    PYTHONPATH=. .venv/bin/python bench/rollout.py [episodes]      # default 256 episodes per measurement

Every figure is environment steps per second of the shipped base VLA acting on the built-in tabletop with the
default run's cameras (overhead and wrist), one torch thread per worker. The two sides of each ratio are measured
in turns (A, B, A, B, ...; 5 each, the best of each kept), so that whatever else the machine does falls on both.

- ``rollout_overhead``: one Ray rollout actor (1 CPU) against the same episodes in a bare loop in this process
  (``run_episodes``, what the actor itself calls). The actor's figure includes sending the episodes back to the
  driver. An actor hands its freed heap back only after sitting idle for ``trim_idle_s`` (5 s), which collections back
  to back never do; the result says how many times it did (bench/actor_memory.py measures what a trim costs).
  Target >= 0.95.
- ``rollout_scaling``: N actors on N cores (N from the machine) against one actor, each actor given the same share
  of seeds. Target >= 0.85 x N.
- ``batched_inference``: one worker stepping 16 environments in lock-step with one batched policy call per chunk,
  against one environment at a time. Target >= 4x. Beside it: the share of each collection spent inside the policy,
  and the policy alone (one call for 16 observations against 16 calls of one), which is what batching can buy where
  the policy dominates.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np
import torch

from actors.ray_actors import RolloutGroup
from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import best_of, write_result
from bench.rollout_profile import PolicyClock
from flywheel.contracts import PolicySnapshot
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import VLAPolicy

ENV = {"sensors": ["overhead", "wrist"]}  # the default run's cameras


def seeds(n: int, offset: int = 0) -> list[int]:
    return [split_seed("train", 9_000_000 + offset + i) for i in range(n)]


def steps_per_s(*jobs, repeats: int = 5) -> list[float]:
    """Env steps per second of each job (each returns episodes), measured in turns, best of ``repeats`` each."""
    best = [0.0] * len(jobs)
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            started = time.perf_counter()
            steps = sum(ep.num_steps for ep in job())
            best[i] = max(best[i], steps / (time.perf_counter() - started))
    return best


def main(episodes: int) -> None:
    import ray

    torch.set_num_threads(1)
    cfg, weights, _ = load_policy_checkpoint("base")
    policy = VLAPolicy(cfg)
    policy.load_weights(weights)
    snapshot = PolicySnapshot(0, weights)

    # ---- 3. batched inference: 16 environments per policy call, against one ------------------------------------
    batch = seeds(16)
    clock = PolicyClock(policy)  # seconds inside the policy, to say how much of each collection it is

    def collection(one_at_a_time: bool):
        def job():
            clock.seconds, started = 0.0, time.perf_counter()
            eps = [ep for s in batch for ep in run_episodes([s], "train", policy, policy_version=0, **ENV)] \
                if one_at_a_time else run_episodes(batch, "train", policy, policy_version=0, **ENV)
            shares[one_at_a_time].append(clock.seconds / (time.perf_counter() - started))
            return eps
        return job

    shares: dict[bool, list[float]] = {False: [], True: []}
    batched, single = steps_per_s(collection(False), collection(True))
    clock.stop()
    # The policy alone, on the first observations of the same 16 episodes: one call for all 16 against 16 calls of one.
    first = run_episodes(batch, "train", policy, policy_version=0, max_steps=1, **ENV)
    obs = [np.stack([ep.observations[k][0] for ep in first]) for k in ("image", "proprio")]
    texts = [ep.instruction for ep in first]
    one_call = best_of(lambda: policy.act(*obs, texts, seed=0), repeats=20)
    sixteen_calls = best_of(lambda: [policy.act(obs[0][i:i + 1], obs[1][i:i + 1], texts[i:i + 1], seed=0)
                                     for i in range(16)], repeats=20)
    write_result("batched_inference", batched / single, 4.0, batched / single >= 4.0,
                 what="env steps/s of one worker stepping 16 environments with one batched policy call per chunk / "
                      "one environment at a time (same 16 layouts)",
                 steps_per_s={"batched_16": batched, "one_at_a_time": single},
                 policy_share={"batched_16": float(np.median(shares[False])),
                               "one_at_a_time": float(np.median(shares[True]))},
                 policy_alone={"ratio": sixteen_calls / one_call, "ms": {"one_call_of_16": one_call * 1e3,
                                                                          "16_calls_of_1": sixteen_calls * 1e3},
                               "what": "observations/s of one policy call for 16 observations / 16 calls of one"})

    # ---- 1. one Ray actor against the bare loop -------------------------------------------------------------------
    work = seeds(episodes)
    n = os.cpu_count() or 1
    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        one = RolloutGroup(functools.partial(VLAPolicy, cfg), ENV, num_workers=1, cpus_per_worker=1)
        one.publish(snapshot)
        actor, bare = steps_per_s(lambda: one.collect(work, "train"),
                                  lambda: run_episodes(work, "train", policy, policy_version=0, **ENV))
        trims = one.usage()[0]["trims"]
        write_result("rollout_overhead", actor / bare, 0.95, actor / bare >= 0.95,
                     what=f"env steps/s of {episodes} episodes through one Ray rollout actor (episodes returned to "
                          f"the driver) / the same episodes in a bare loop in one process",
                     steps_per_s={"ray_actor": actor, "bare_loop": bare}, episodes=episodes,
                     heap_trims=trims, note=None if not trims else
                     f"the actor sat idle past trim_idle_s while the bare loop ran and handed its heap back {trims} "
                     f"times: those collections paged it in again (bench/actor_memory.py measures what that costs)")
        one.close()

        # ---- 2. N actors on N cores against one -------------------------------------------------------------------
        many = RolloutGroup(functools.partial(VLAPolicy, cfg), ENV, num_workers=n, cpus_per_worker=1)
        many.publish(snapshot)
        solo = RolloutGroup(functools.partial(VLAPolicy, cfg), ENV, num_workers=1, cpus_per_worker=0)
        solo.publish(snapshot)
        alone, together = steps_per_s(lambda: solo.collect(work, "train"),
                                      lambda: many.collect(seeds(episodes * n), "train"))
        write_result("rollout_scaling", together / alone, round(0.85 * n, 3), together / alone >= 0.85 * n,
                     what=f"env steps/s of {n} Ray rollout actors on {n} cores, {episodes} episodes each / one actor "
                          f"with {episodes} episodes", actors=n,
                     steps_per_s={f"{n}_actors": together, "1_actor": alone},
                     note="the driver receives every episode on one of the same cores" if n <= 2 else None)
        many.close()
        solo.close()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
