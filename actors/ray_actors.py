"""The rollout workers as a group: in this process, or as Ray actors, from the same code and the same config.

Weights travel as one ``ray.put`` per version: every actor receives the same object reference, Ray resolves it to
the numpy arrays in shared memory (no per-actor copy through the driver), and an actor applies a snapshot only if it
is newer than the one it has.

Faults. With Ray, every call to the actors has a deadline (``call_timeout_s``). An actor that dies (killed, out of
memory), raises, or misses the deadline (an environment that hangs) is killed and replaced by a new one, which gets
the newest snapshot and runs that share of seeds again; the episodes it had in flight are lost, never half-stored.
If the share fails a second time, a training collection goes on without it and an evaluation raises a
``RolloutError`` (an evaluation missing seeds would not be comparable). An environment that raises while stepping
costs only its own episode (``actors.rollout.run_episodes``). Every fault is in ``faults``.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import numpy as np

from actors.rollout import RolloutWorker
from flywheel.contracts import Episode, Policy, PolicySnapshot


class RolloutError(RuntimeError):
    """A rollout share that failed twice where it cannot be left out (an evaluation)."""


class RolloutGroup:
    def __init__(
        self,
        policy_factory: Callable[[], Policy],
        env_kwargs: dict,
        num_workers: int = 2,
        use_ray: bool = True,
        cpus_per_worker: float = 1.0,
        call_timeout_s: float = 600.0,
        resources: dict[str, float] | None = None,
        trim: bool = True,
    ):
        """``resources``: Ray custom resources each actor needs (``{"robot": 1}``): they decide its node. ``trim``:
        each Ray actor hands its freed heap back after a collection (``trim_heap``: flat memory overnight, for ~11% of
        an actor's collection speed, mostly paging the memory back in next time: bench/rollout.py, rollout_overhead's
        heap_not_trimmed)."""
        self.use_ray = use_ray
        self.num_workers = int(num_workers)
        self.call_timeout_s = call_timeout_s
        self._make = functools.partial(RolloutWorker, policy_factory, env_kwargs)
        if use_ray:
            import ray

            self._remote = ray.remote(num_cpus=cpus_per_worker, max_restarts=0,
                                      **({"resources": dict(resources)} if resources else {}))(RolloutWorker)
            self._make = functools.partial(self._remote.remote, policy_factory, env_kwargs, trim=trim)
        self.workers = [self._make(i) for i in range(self.num_workers)]
        self.published_version = -1
        self._whole: PolicySnapshot | None = None  # the newest snapshot, every array: for a replaced worker
        self.faults: list[dict] = []  # every fault, in order: what failed, where, and what was done about it
        self.last_sync: dict = {}
        self.restarts = 0

    def _submit(self, method: str, calls: list[tuple[int, tuple]]) -> list:
        """Start ``(worker index, args)`` calls on the actors; -> their object references."""
        return [getattr(self.workers[i], method).remote(*a) for i, a in calls]

    def _call(self, method: str, calls: list[tuple[int, tuple]], refs: list | None = None) -> list:
        """``(worker index, args)`` calls, in parallel (or the ``refs`` of calls already started); -> each one's
        result, or the exception that stopped it."""
        if not self.use_ray:
            return [getattr(self.workers[i], method)(*a) for i, a in calls]
        import ray

        refs = refs or self._submit(method, calls)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.call_timeout_s)
        ready = set(ready)
        out: list = []
        for ref in refs:
            if ref not in ready:
                out.append(TimeoutError(f"no answer within {self.call_timeout_s:g} s (rollout.call_timeout_s)"))
                continue
            try:
                out.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                out.append(e)
        return out

    def _replace(self, i: int, why: str) -> None:
        """Kill worker ``i`` (whatever its state) and start a new one with the newest snapshot, whole."""
        import ray

        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._make(i)
        self.restarts += 1
        if self._whole is not None:  # a new actor must start first (a process, torch, the policy): allow for it
            try:
                ray.get(self.workers[i].set_weights.remote(self._whole), timeout=max(self.call_timeout_s, 120.0))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                raise RolloutError(f"rollout worker {i} was replaced ({why}), and its replacement did not start: "
                                   f"{type(e).__name__}. The episodes stored so far are kept.") from e
        self.faults.append({"time": time.time(), "worker": i, "error": why, "action": "replaced"})

    def _checked(self, method: str, args_per_worker: list[tuple], leave_out: bool, refs: list | None = None) -> list:
        """One call per worker (``refs``: already started); a worker that fails is replaced and its call run again,
        once. A call that fails again is left out (None) if ``leave_out``, else raises RolloutError."""
        results = self._call(method, list(enumerate(args_per_worker)), refs)
        for attempt in (1, 2):
            failed = {i: r for i, r in enumerate(results) if isinstance(r, BaseException)}
            for i, error in failed.items():
                self._replace(i, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}")
            if not failed or attempt == 2:
                break
            for i, r in zip(failed, self._call(method, [(i, args_per_worker[i]) for i in failed])):
                results[i] = r
        for i, error in failed.items():
            if not leave_out:
                raise RolloutError(f"rollout worker {i} failed twice in {method} ({type(error).__name__}: "
                                   f"{(str(error).splitlines() or [''])[0][:300]}); it was replaced each time. The "
                                   f"episodes stored so far are kept.") from error
            self.faults.append({"time": time.time(), "worker": i, "error": type(error).__name__,
                                "action": f"left out {len(args_per_worker[i][0])} seeds"})
            results[i] = None
        return results

    def publish(self, snapshot: PolicySnapshot) -> list[int]:
        """Send one snapshot to every worker (one put); returns each worker's version afterwards. Only the arrays
        that changed since the last snapshot travel (a frozen backbone, a residual head: a fraction of the model);
        ``last_sync`` says how many bytes and how long until every worker had applied it."""
        if snapshot.version <= self.published_version:
            raise ValueError(
                f"snapshot version {snapshot.version} is not newer than the published {self.published_version}"
            )
        started = time.perf_counter()
        sent = snapshot
        if self._whole is not None:
            old = self._whole.weights
            changed = {k: v for k, v in snapshot.weights.items() if k not in old or _changed(old[k], v)}
            sent = PolicySnapshot(snapshot.version, changed, {**snapshot.meta, "delta_on": self.published_version})
        payload = sent
        if self.use_ray:
            import ray

            payload = ray.put(sent)
        self._whole = snapshot
        versions = self._checked("set_weights", [(payload,)] * self.num_workers, leave_out=False)
        self.published_version = snapshot.version
        self.last_sync = {"seconds": time.perf_counter() - started, "arrays": len(sent.weights),
                          "bytes": int(sum(v.nbytes for v in sent.weights.values())),
                          "model_bytes": int(sum(v.nbytes for v in snapshot.weights.values()))}
        return versions

    def collect(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True) -> list[Episode]:
        """One episode per seed, the seeds shared out among the workers; episodes come back in seed order, less
        those lost to faults (recorded in ``faults``). ``corrected=False``: no person steps in, even in practice
        (the detector's data of the policy as it acts alone)."""
        return self.collect_async(seeds, split, sample_seed, corrected)()

    def collect_async(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True
                      ) -> Callable[[], list[Episode]]:
        """Start ``collect`` on the actors and return at once; calling the result waits for the episodes. Calls
        made meanwhile (a new snapshot, an evaluation) queue behind it on each actor, so it runs with the weights
        the actors had when it started. In-process workers collect when waited for."""
        shares = [list(s) for s in np.array_split(np.asarray(seeds, dtype=np.int64), self.num_workers)]
        args = [(share, split, sample_seed * 1000 + i, corrected) for i, share in enumerate(shares)]
        refs = self._submit("collect_with_faults", list(enumerate(args))) if self.use_ray else None

        def wait() -> list[Episode]:
            episodes = []
            results = self._checked("collect_with_faults", args, leave_out=split == "train", refs=refs)
            if all(r is None for r in results):
                raise RolloutError(f"every rollout worker failed twice on the same seeds ({self.faults[-1]['error']}):"
                                   f" something beyond one actor is wrong (the environment, the machine). The "
                                   f"episodes stored so far are kept; the run resumes from its last iteration.")
            for result in results:
                if result is not None:
                    episodes += result[0]
                    self.faults += [{"time": time.time(), **f, "action": "episode discarded"} for f in result[1]]
            return episodes

        return wait

    def placement(self) -> list[dict]:
        """Where each worker runs: its node, host and process."""
        return self._checked("where", [()] * self.num_workers, leave_out=False)

    def usage(self) -> list[dict[str, float]]:
        """Each worker's ``RolloutWorker.usage``. A call queues behind the actor's work in flight: ask when the
        actors are known to be idle (just after a collection came back), or it waits for them."""
        return self._checked("usage", [()] * self.num_workers, leave_out=False)

    def applied_versions(self) -> list[list[int]]:
        return self._checked("applied_versions", [()] * self.num_workers, leave_out=False)

    def close(self) -> None:
        if self.use_ray:
            import ray

            for w in self.workers:
                ray.kill(w)
        self.workers = []


def _changed(old: np.ndarray, new: np.ndarray) -> bool:
    """Whether an array differs from its last published value. A trained array almost always differs in its first
    elements, so those are compared first, and only an array that starts the same is compared whole (a frozen one).
    Measured on a 100M-parameter snapshot: 25 ms for np.array_equal on every array, ~0 this way."""
    if old.shape != new.shape or old.dtype != new.dtype:
        return True
    a, b = old.reshape(-1), new.reshape(-1)
    return not (np.array_equal(a[:256], b[:256]) and np.array_equal(a, b))


def vla_policy_factory(vla_cfg, eval_noise: float | None = None) -> Callable[[], Policy]:
    """A picklable factory for the built-in VLA policy (each worker builds its own copy). ``eval_noise``: how it acts
    in evaluation (VLAPolicy's, from ``eval.noise``)."""
    from flywheel.vla.model import VLAPolicy

    return functools.partial(VLAPolicy, vla_cfg, eval_noise=eval_noise)
