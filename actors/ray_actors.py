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

import dataclasses
import functools
import threading
import time
from typing import Callable, Iterator

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
        trim_idle_s: float | None = 5.0,
    ):
        """``resources``: Ray custom resources each actor needs (``{"robot": 1}``): they decide its node.
        ``trim_idle_s``: a Ray actor that sits this long after a collection without another hands its freed heap back
        (``RolloutWorker``): ~420 MB against ~1 GB while it waits for the learner. Trimming after every collection
        instead cost 12-15% of its speed, paging the memory back in (bench/actor_memory.py). None never trims."""
        self.use_ray = use_ray
        self.num_workers = int(num_workers)
        self.call_timeout_s = call_timeout_s
        self._make = functools.partial(RolloutWorker, policy_factory, env_kwargs)
        if use_ray:
            import ray

            self._remote = ray.remote(num_cpus=cpus_per_worker, max_restarts=0,
                                      **({"resources": dict(resources)} if resources else {}))(RolloutWorker)
            self._make = functools.partial(self._remote.remote, policy_factory, env_kwargs, trim_idle_s=trim_idle_s,
                                           threads=max(1, int(cpus_per_worker)))
        self.workers = [self._make(i) for i in range(self.num_workers)]
        self.published_version = -1
        self._whole: PolicySnapshot | None = None  # the newest snapshot, every array: for a replaced worker
        self.faults: list[dict] = []  # every fault, in order: what failed, where, and what was done about it
        self.last_sync: dict = {}
        self.restarts = 0
        self._going: Collection | None = None  # a collection whose actors go on with rounds of ``more``
        # a Ray actor puts its episodes in the object store itself, on its own clock (RolloutWorker.hand_over)
        self._collect = "hand_over" if use_ray else "collect_with_faults"

    def _submit(self, method: str, calls: list[tuple[int, tuple]]) -> list:
        """Start ``(worker index, args)`` calls on the actors; -> their object references."""
        return [getattr(self.workers[i], method).remote(*a) for i, a in calls]

    def _call(self, method: str, calls: list[tuple[int, tuple]], refs: list | None = None,
              fetched: dict | None = None) -> list:
        """``(worker index, args)`` calls, in parallel (or the ``refs`` of calls already started, ``fetched``: the
        results of those already in, by reference); -> each one's result, or the exception that stopped it. Each
        result is fetched as it comes in (``_fetch``)."""
        if not self.use_ray:
            return [getattr(self.workers[i], method)(*a) for i, a in calls]
        import ray

        refs = refs or self._submit(method, calls)
        got = dict(fetched or {})
        waiting, deadline = [r for r in refs if r not in got], time.perf_counter() + self.call_timeout_s
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                break
            got.update((ref, _fetch(ref)) for ref in ready)
        return [got[ref] if ref in got else TimeoutError(f"no answer within {self.call_timeout_s:g} s "
                                                         f"(rollout.call_timeout_s)") for ref in refs]

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

    def _checked(self, method: str, args_per_worker: list[tuple], leave_out: bool, refs: list | None = None,
                 fetched: dict | None = None) -> list:
        """One call per worker (``refs``: already started, ``fetched``: see ``_call``); a worker that fails is
        replaced and its call run again, once. A call that fails again is left out (None) if ``leave_out``, else
        raises RolloutError."""
        results = self._call(method, list(enumerate(args_per_worker)), refs, fetched)
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
                                   f"episodes stored so far are kept.{_advice(type(error).__name__)}") from error
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
        self._stop_rounds()  # rounds of practice run with the weights their collection started with
        started = time.perf_counter()
        sent = snapshot
        if self._whole is not None:
            old = self._whole.weights
            changed = {k: v for k, v in snapshot.weights.items() if k not in old or _changed(old[k], v)}
            sent = dataclasses.replace(snapshot, weights=changed, meta={**snapshot.meta, "delta_on": self.published_version})
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

    def collect_async(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True,
                      more: Iterator[tuple[list[int], int]] | None = None) -> "Collection":
        """Start ``collect`` on the actors and return at once; calling the result waits for the episodes. Calls
        made meanwhile (a new snapshot, an evaluation) queue behind it on each actor, so it runs with the weights
        the actors had when it started. In-process workers collect when waited for.

        ``more``: rounds of practice beyond ``seeds``, each ``(seeds, sample seed)`` and run whole by one actor.
        With Ray, an actor done with its share goes on with the next round, and the next, until the group's next
        ``publish`` (or ``more`` runs out): it practises with the weights it holds rather than wait for new ones.
        Every round started comes back in the result (after ``seeds``' episodes); none is dropped."""
        shares = [list(s) for s in np.array_split(np.asarray(seeds, dtype=np.int64), self.num_workers)]
        args = [(share, split, sample_seed * 1000 + i, corrected) for i, share in enumerate(shares)]
        refs = self._submit(self._collect, list(enumerate(args))) if self.use_ray else None
        collection = Collection(self, args, refs, more if self.use_ray else None)
        if more is not None:
            self._stop_rounds()
            self._going = collection
        return collection

    def _stop_rounds(self) -> None:
        """No round of a collection's ``more`` starts after this (before new weights, or the actors' end)."""
        if self._going is not None:
            self._going.stop()
            self._going = None

    def _gather(self, results: list) -> list[Episode]:
        """The episodes of ``collect_with_faults`` (or fetched ``hand_over``) results (None: one left out), their
        environments' faults recorded."""
        episodes = []
        for result in results:
            if result is not None:
                episodes += result[0]
                self.faults += [{"time": time.time(), **f, "action": "episode discarded"} for f in result[1]]
        return episodes

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
        self._stop_rounds()
        if self.use_ray:
            import ray

            for w in self.workers:
                ray.kill(w)
        self.workers = []


class Collection:
    """A collection started on the actors (``RolloutGroup.collect_async``); calling it waits for the episodes.

    With ``more``, a thread in this process hands a round to each actor that is done (with its share, or its last
    round) until ``stop()``. The group's next ``publish`` calls it before the new weights are sent, so every round
    runs with the weights the collection started with. A round that fails or misses the deadline loses its episodes
    (recorded in ``faults``); its actor gets no more rounds and is replaced. The share's faults are ``collect``'s."""

    POLL_S = 0.05  # how often the thread looks for an actor that is done, and for ``stop``

    def __init__(self, group: RolloutGroup, args: list[tuple], refs: list | None,
                 more: Iterator[tuple[list[int], int]] | None):
        self._group, self._args, self._refs = group, args, refs
        self.rounds: list[dict] = []  # {"worker", "actor", "ref", "seeds"}, and its "result" or "error" once known
        self._fetched: dict = {}  # the shares' results, fetched by the thread as they came in (ref -> result)
        self._stopping = threading.Event()
        self._thread = None
        if more is not None and refs is not None:
            self._thread = threading.Thread(target=self._go_on, args=(more,), name="rollout-rounds", daemon=True)
            self._thread.start()

    def _go_on(self, more: Iterator[tuple[list[int], int]]) -> None:
        import ray

        split, corrected = self._args[0][1], self._args[0][3]
        working: dict = {ref: (i, None) for i, ref in enumerate(self._refs)}  # ref -> (worker, its round or None)
        while working and not self._stopping.is_set():
            done, _ = ray.wait(list(working), num_returns=1, timeout=self.POLL_S)
            for ref in done:
                i, finished = working.pop(ref)
                if finished is None:  # its share: fetched now, while the actor that holds its episodes is alive
                    self._fetched[ref] = _fetch(ref)
                    if isinstance(self._fetched[ref], BaseException):
                        continue  # that actor failed: no rounds for it
                elif not _settle(finished):
                    continue  # that actor failed: no more rounds for it
                nxt = None if self._stopping.is_set() else next(more, None)
                if nxt is None:
                    continue
                seeds, sample_seed = nxt
                actor = self._group.workers[i]
                out = getattr(actor, self._group._collect).remote(list(seeds), split, sample_seed * 1000, corrected)
                self.rounds.append({"worker": i, "actor": actor, "ref": out, "seeds": len(seeds)})
                working[out] = (i, self.rounds[-1])

    def stop(self) -> None:
        """No round starts after this returns."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()

    def __call__(self) -> list[Episode]:
        self.stop()
        group = self._group
        results = group._checked(group._collect, self._args, self._args[0][1] == "train", refs=self._refs,
                                 fetched=self._fetched)
        if all(r is None for r in results):
            raise RolloutError(f"every rollout worker failed twice on the same seeds ({group.faults[-1]['error']}):"
                               f" something beyond one actor is wrong (the environment, the machine). The "
                               f"episodes stored so far are kept; the run resumes from its last iteration."
                               f"{_advice(group.faults[-1]['error'])}")
        episodes = group._gather(results)
        if self.rounds:
            import ray

            ray.wait([r["ref"] for r in self.rounds], num_returns=len(self.rounds), timeout=group.call_timeout_s)
            for r in self.rounds:
                if _settle(r, wait=False):
                    episodes += group._gather([r["result"]])
                    continue
                if group.workers[r["worker"]] is r["actor"]:  # not replaced since (the share's retry, a round)
                    group._replace(r["worker"], r["error"])
                group.faults.append({"time": time.time(), "worker": r["worker"], "error": r["error"].split(":")[0],
                                     "action": f"left out a round of {r['seeds']} seeds beyond the iteration's"})
        return episodes


def _settle(round_: dict, wait: bool = True) -> bool:
    """Fetch a finished round's result into it (or the reason it has none: "error"); -> whether it succeeded.
    ``wait=False``: a round not finished by now missed the deadline."""
    import ray

    if "result" in round_ or "error" in round_:
        return "result" in round_
    if not wait and not ray.wait([round_["ref"]], timeout=0)[0]:
        round_["error"] = "TimeoutError: no answer within the deadline (rollout.call_timeout_s)"
        return False
    result = _fetch(round_["ref"])
    if isinstance(result, BaseException):
        round_["error"] = f"{type(result).__name__}: {(str(result).splitlines() or [''])[0][:300]}"
        return False
    round_["result"] = result
    return True


def _fetch(ref):
    """A finished call's result, or the exception that stopped it. The episodes of a ``hand_over`` result are
    fetched too: they are owned by the actor (a method's return value would be owned by the caller), so they are
    fetched as the call comes back, before anything may kill it."""
    import ray

    try:
        result = ray.get(ref)
        if isinstance(result, tuple) and result and isinstance(result[0], ray.ObjectRef):
            result = (ray.get(result[0]), *result[1:])
        return result
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError,
            ray.exceptions.OutOfMemoryError) as e:  # (Ray's memory monitor killed the actor: a fault like any)
        return e


def _advice(error: str) -> str:
    """What to change when a worker fails the same way twice, where the error (its type's name) says."""
    if error == "OutOfMemoryError":
        return (" Ray killed it for memory: a worker holds all the environments of its share at once (a Meta-World "
                "one ~15 MB), so give more rollout.num_workers, fewer eval.episodes or "
                "rollout.episodes_per_iteration, or run fewer jobs beside it.")
    return ""


def _changed(old: np.ndarray, new: np.ndarray) -> bool:
    """Whether an array differs from its last published value. A trained array almost always differs in its first
    elements, so those are compared first, and only an array that starts the same is compared whole (a frozen one).
    Measured on a 100M-parameter snapshot: 25 ms for np.array_equal on every array, ~0 this way."""
    if old.shape != new.shape or old.dtype != new.dtype:
        return True
    a, b = old.reshape(-1), new.reshape(-1)
    return not (np.array_equal(a[:256], b[:256]) and np.array_equal(a, b))
