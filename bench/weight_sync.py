"""Weight sync: from the learner's new snapshot until every actor has applied it (issue 7, item 4).

    PYTHONPATH=. .venv/bin/python bench/weight_sync.py [actors]      # default 4 actors

A VLA of the built-in architecture widened to ~100M parameters (dim 768, 10 trunk layers: 99.6M, 398 MB of
float32 in 227 arrays) is held by ``actors`` Ray rollout actors. Each version changes every array (a full update).
The figure is ``RolloutGroup.publish``'s wall time (one ``ray.put``, then every actor applies it and answers),
the median of 8 versions (their spread is wide: see RESULTS.md), against copying the same bytes once in this
process (``np.copyto`` per array, best of 3).
Target <= 3x. The number of Ray calls per sync is counted for this model and for the shipped 0.57M-parameter base:
it must not grow with the model.
"""

from __future__ import annotations

import functools
import sys
import time

import numpy as np

from actors.ray_actors import RolloutGroup
from bench.common import best_of, write_result
from flywheel.contracts import PolicySnapshot
from flywheel.vla.model import SmallVLA, VLAConfig, VLAPolicy

BIG = VLAConfig(dim=768, heads=16, trunk_layers=10, ground_layers=2, head_hidden=1024)


def versions(weights: dict[str, np.ndarray], n: int) -> list[PolicySnapshot]:
    """``n`` snapshots after v0, each changing every array."""
    return [PolicySnapshot(v, {k: a + np.asarray(1e-6 * v, a.dtype) if a.dtype.kind == "f" else a
                               for k, a in weights.items()}) for v in range(1, n + 1)]


def count_calls(group: RolloutGroup, snapshot: PolicySnapshot) -> dict[str, int]:
    """Ray calls made by one publish: puts, and actor method calls."""
    import ray

    counts = {"put": 0, "actor_calls": 0}
    put, submit = ray.put, group._submit

    def counted_put(*a, **k):
        counts["put"] += 1
        return put(*a, **k)

    def counted_submit(method, calls):
        counts["actor_calls"] += len(calls)
        return submit(method, calls)

    ray.put, group._submit = counted_put, counted_submit
    try:
        group.publish(snapshot)
    finally:
        ray.put, group._submit = put, submit
    return counts


def main(actors: int) -> None:
    import ray

    model = SmallVLA(BIG)
    weights = model.get_weights()
    del model
    nbytes = sum(a.nbytes for a in weights.values())
    params = sum(a.size for a in weights.values())

    dst = {k: np.empty_like(a) for k, a in weights.items()}
    memcpy = best_of(lambda: [np.copyto(dst[k], a) for k, a in weights.items()])
    del dst

    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        small_cfg = VLAConfig()
        small = RolloutGroup(functools.partial(VLAPolicy, small_cfg), {}, num_workers=actors, cpus_per_worker=1)
        small_weights = SmallVLA(small_cfg).get_weights()
        small.publish(PolicySnapshot(0, small_weights))
        calls_small = count_calls(small, versions(small_weights, 1)[0])
        small.close()

        group = RolloutGroup(functools.partial(VLAPolicy, BIG), {}, num_workers=actors, cpus_per_worker=1)
        started = time.perf_counter()
        group.publish(PolicySnapshot(0, weights))  # the first: actors start, and get it whole
        first = time.perf_counter() - started
        snaps = versions(weights, 9)
        calls_big = count_calls(group, snaps[0])
        times = []
        for snap in snaps[1:]:
            group.publish(snap)
            times.append(group.last_sync["seconds"])
        assert all(v == [s.version for s in snaps][-1] for v in [max(a) for a in group.applied_versions()])
        group.close()
    finally:
        ray.shutdown()
    sync = float(np.median(times))
    write_result("weight_sync", sync / memcpy, 3.0, sync / memcpy <= 3.0,
                 what=f"seconds from a new snapshot of a {params / 1e6:.1f}M-parameter VLA ({nbytes / 1e6:.0f} MB, "
                      f"{len(weights)} arrays, every one changed) until all {actors} actors have applied it / "
                      f"copying the same bytes once in one process",
                 seconds={"sync_median": sync, "sync_best": min(times), "sync_each": times, "memcpy": memcpy,
                          "first_publish": first}, best_ratio=min(times) / memcpy,
                 params=params, bytes=nbytes, actors=actors,
                 ray_calls_per_sync={"0.57M base": calls_small, f"{params / 1e6:.1f}M": calls_big},
                 calls_constant=calls_small == calls_big)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
