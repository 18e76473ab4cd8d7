"""The rollout workers as a group: in this process, or as Ray actors, from the same code and the same config.

Weights travel as one ``ray.put`` per version: every actor receives the same object reference, Ray resolves it to
the numpy arrays in shared memory (no per-actor copy through the driver), and an actor applies a snapshot only if it
is newer than the one it has.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from actors.rollout import RolloutWorker
from flywheel.contracts import Episode, Policy, PolicySnapshot


class RolloutGroup:
    def __init__(
        self,
        policy_factory: Callable[[], Policy],
        env_kwargs: dict,
        num_workers: int = 2,
        use_ray: bool = True,
        cpus_per_worker: float = 1.0,
    ):
        self.use_ray = use_ray
        self.num_workers = int(num_workers)
        if use_ray:
            import ray

            remote = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(RolloutWorker)
            self.workers = [remote.remote(policy_factory, env_kwargs, i) for i in range(self.num_workers)]
        else:
            self.workers = [RolloutWorker(policy_factory, env_kwargs, i) for i in range(self.num_workers)]
        self.published_version = -1

    def _call(self, method: str, args_per_worker: list[tuple]) -> list:
        if self.use_ray:
            import ray

            refs = [getattr(w, method).remote(*a) for w, a in zip(self.workers, args_per_worker)]
            return ray.get(refs)
        return [getattr(w, method)(*a) for w, a in zip(self.workers, args_per_worker)]

    def publish(self, snapshot: PolicySnapshot) -> list[int]:
        """Send one snapshot to every worker (one put); returns each worker's version afterwards."""
        if snapshot.version <= self.published_version:
            raise ValueError(
                f"snapshot version {snapshot.version} is not newer than the published {self.published_version}"
            )
        payload = snapshot
        if self.use_ray:
            import ray

            payload = ray.put(snapshot)
        versions = self._call("set_weights", [(payload,)] * self.num_workers)
        self.published_version = snapshot.version
        return versions

    def collect(self, seeds: list[int], split: str, sample_seed: int = 0) -> list[Episode]:
        """One episode per seed, the seeds shared out among the workers; episodes come back in seed order."""
        shares = [list(s) for s in np.array_split(np.asarray(seeds, dtype=np.int64), self.num_workers)]
        args = [(share, split, sample_seed * 1000 + i) for i, share in enumerate(shares)]
        results = self._call("collect", args)
        return [ep for batch in results for ep in batch]

    def applied_versions(self) -> list[list[int]]:
        return self._call("applied_versions", [()] * self.num_workers)

    def close(self) -> None:
        if self.use_ray:
            import ray

            for w in self.workers:
                ray.kill(w)
        self.workers = []


def vla_policy_factory(vla_cfg) -> Callable[[], Policy]:
    """A picklable factory for the built-in VLA policy (each worker builds its own copy)."""
    from flywheel.vla.model import VLAPolicy

    return functools.partial(VLAPolicy, vla_cfg)
