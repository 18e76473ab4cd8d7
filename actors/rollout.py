"""Rollout: step many environments together, one batched policy call per action chunk, and record Episodes.

``RolloutWorker`` is a plain class (used as-is in one process for tests and debugging); ``actors.ray_actors`` wraps
the very same class as a Ray actor for real runs.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

import gymnasium as gym
import numpy as np

from actors.expert import expert_action
from actors.tabletop import Frames, TabletopEnv
from flywheel import plugins
from flywheel.contracts import INTERVENTION, Episode, Policy, PolicySnapshot, observation_keys, sensor_inputs

ENV_ID = "flywheel/Tabletop-v0"


def make_env(name: str = "tabletop", **kwargs) -> gym.Env:
    """The environment plug-in ``name`` (``env.name``: tabletop, metaworld, fetch, or an import path
    ``module:factory``), made with the keyword arguments its factory declares (flywheel/plugins.py)."""
    return plugins.call_with_accepted(plugins.resolve("env", name), kwargs)


def parallel_limit(name: str) -> int | None:
    """How many environments of ``name`` one rollout steps at once (its factory's ``max_parallel``; None: all):
    simulators that each hold a MuJoCo model and a GL context are stepped in waves."""
    return getattr(plugins.resolve("env", name), "max_parallel", None)


def scripted_action(env: gym.Env, rng: np.random.Generator, noise: float, plan: dict | None = None) -> np.ndarray:
    """The scripted expert's action: the environment's own ``expert_action`` if it has one, else the tabletop's
    (``plan``: how to make a hard example, actors/expert.py hard_example_plan)."""
    own = getattr(env, "expert_action", None)
    return own(rng, noise) if own is not None else expert_action(env, rng, noise, **(plan or {}))


def run_episodes(
    seeds: list[int],
    split: str,
    policy: Policy | None,
    *,
    policy_version: int,
    name: str = "tabletop",
    family: str = "any",
    phrasing: str = "canonical",
    combos: str = "all",
    randomize: dict[str, float] | None = None,
    sensors: tuple[str, ...] | list[str] | str = ("overhead",),
    image_size: int = 64,
    max_steps: int = 40,
    execute: int = 4,
    expert_noise: float = 0.1,
    hard: str | None = None,
    operators: tuple[str, ...] | list[str] = ("standard",),
    sample_seed: int = 0,
    make_env: Callable[..., gym.Env] = make_env,
    faults: list[dict] | None = None,
    corrections: dict | None = None,
) -> list[Episode]:
    """Run one episode per seed, all environments in lock-step, and return them as Episodes.

    With ``policy=None`` the scripted expert acts (demonstrations, ``policy_version`` should be -1). Otherwise the
    policy is called once per ``execute`` steps on the batch of still-running environments and the first
    ``execute`` actions of each chunk are applied (receding horizon). ``sample_seed`` seeds the policy's sampling
    noise, so a rollout is reproducible given its seeds. ``hard`` (expert only): make that kind of hard example for
    the detector (actors/expert.py HARD_EXAMPLES); ``info["hard"]`` names it where it applied. ``operators`` (expert
    only, the tabletop's): whose way of demonstrating (actors/expert.py OPERATORS), taken in turn by seed, so a seed's
    demonstration is the same in any call; ``info["operator"]`` names it. ``faults``: given a
    list, an environment that raises while stepping has its episode discarded (the others go on) and what happened
    appended to it; without one, the error propagates. ``corrections`` ({"rate": r, "after": s, "operators": [...]},
    a policy acting): a person stands by, played by the scripted expert (as one of ``operators``, in turn by seed). In
    a share ``r`` of the episodes (drawn from ``sample_seed``), one still running after ``s`` steps is taken over at
    the next chunk boundary and finished by the expert;
    ``extras["intervention"]`` marks the steps it acted and ``info["interventions"]`` counts them.
    """
    given = dict(locals())  # every argument, as given (the waves below pass them on)
    if not seeds:
        return []
    n = parallel_limit(name)
    if n is not None and len(seeds) > n:  # heavy environments: step them in waves
        return [ep for w in range(0, len(seeds), n)
                for ep in run_episodes(**{**given, "seeds": seeds[w:w + n], "sample_seed": sample_seed + 7919 * w})]
    envs = [make_env(name=name, family=family, image_size=image_size, max_steps=max_steps, phrasing=phrasing,
                     combos=combos, randomize=randomize, sensors=sensors) for _ in seeds]
    # The tabletop's camera pictures are drawn together, a chunk of every environment at once, before the policy
    # looks (actors/tabletop.py Frames: the same pixels; for 16 environments a sixth to a quarter less drawing time)
    frames = Frames(image_size)
    for env in envs:
        getattr(env, "draw_later", lambda frames: None)(frames)
    first = [env.reset(seed=int(s)) for env, s in zip(envs, seeds)]
    observed = [{k: [v] for k, v in o.items()} for o, _ in first]  # every sensor that is on, one frame per state
    actions: list[list[np.ndarray]] = [[] for _ in seeds]
    infos = [info for _, info in first]
    # The simulator also records where the named block and target are (privileged state) for the auxiliary
    # grounding losses of pretraining and detector training. Policies never see it; the loop strips it before the
    # learner.
    privileged = hasattr(envs[0], "state")  # third-party simulators (actors/thirdparty.py) have no such record
    aux = [[_aux_positions(env)] if privileged else [] for env in envs]
    running = list(range(len(envs)))
    # The policy's own extras: every chunk it sampled and the step it was sampled at (the learner clones these
    # decisions exactly, rather than executed actions that splice two chunks together).
    chunks: list[list[np.ndarray]] = [[] for _ in seeds]
    chunk_steps: list[list[int]] = [[] for _ in seeds]
    drawn: list[dict[str, list[np.ndarray]]] = [{} for _ in seeds]  # the policy's other draws per chunk, if any
    rng = np.random.default_rng(sample_seed)
    # Hard examples: the expert aims just off (or just inside) success, each episode in its own direction, or never
    # lets go (actors/expert.py).
    plans: list[dict | None] = [None] * len(seeds)
    if hard is not None and policy is None:
        from actors.expert import hard_example_plan

        angles = rng.uniform(0, 2 * np.pi, len(seeds))
        plans = [hard_example_plan(hard, info["family"], a) for a, (_, info) in zip(angles, first)]
    made_hard = [p is not None for p in plans]
    operator = [operators[int(s) % len(operators)] if policy is None and privileged else None for s in seeds]
    plans = [{**(p or {}), "operator": op} if op is not None else p for p, op in zip(plans, operator)]
    chunk: np.ndarray | None = None
    # Human corrections, the scripted expert standing in: who will be taken over, and who is being
    will_correct = (np.random.default_rng([sample_seed, 7]).random(len(seeds)) < corrections["rate"]
                    if corrections and policy is not None else np.zeros(len(seeds), bool))
    correcting = [False] * len(seeds)
    if corrections and policy is not None and privileged:  # the person is one of the demonstrators, in turn by seed
        people = corrections.get("operators") or ["standard"]
        plans = [{"operator": people[int(s) % len(people)]} for s in seeds]
    taken: list[list[bool]] = [[] for _ in seeds]  # per step: did the expert act
    broken: set[int] = set()  # environments that raised: their episodes are discarded
    call = 0
    sensors = getattr(policy, "sensors", ("overhead",))
    reads = observation_keys(sensors) & set(observed[0])  # stack only what the policy reads
    while running:
        for i in running:  # a chunk boundary: where a person standing by takes over
            correcting[i] = correcting[i] or bool(will_correct[i] and len(actions[i]) >= max(1, corrections["after"]))
        acting = [i for i in running if policy is not None and not correcting[i]]
        if acting:
            frames.draw()
            latest = {k: np.stack([observed[i][k][-1] for i in acting]) for k in reads}
            chunk = policy.act(
                *sensor_inputs(latest, sensors),
                [infos[i]["instruction"] for i in acting],
                seed=sample_seed * 100_003 + call,
            )
            call += 1
        row_of = {i: row for row, i in enumerate(acting)}
        still = []
        for i in running:
            env, done, row = envs[i], False, row_of.get(i)
            if row is not None:
                chunks[i].append(chunk[row])
                chunk_steps[i].append(len(actions[i]))
                for k, v in getattr(policy, "last_extras", {}).items():
                    drawn[i].setdefault(k, []).append(v[row])
            for k in range(execute if policy is not None else 1):
                a = chunk[row, k] if row is not None else scripted_action(env, rng, expert_noise, plans[i])
                try:
                    obs, _, term, trunc, info = env.step(a)
                except Exception as e:
                    if faults is None:
                        raise
                    faults.append({"seed": int(seeds[i]), "step": len(actions[i]), "error": f"{type(e).__name__}: {e}"})
                    broken.add(i)
                    done = True
                    break
                for k, v in obs.items():
                    observed[i][k].append(v)
                actions[i].append(np.asarray(a, np.float32))
                taken[i].append(correcting[i])
                if privileged:
                    aux[i].append(_aux_positions(env))
                infos[i] = info
                if term or trunc:
                    done = True
                    break
            if not done:
                still.append(i)
        running = still
    frames.draw()
    for i, env in enumerate(envs):  # a third-party adapter goes back to its pool; the others are closed
        try:
            getattr(env, "release", env.close)()
        except Exception:
            if i not in broken:
                raise
    now = time.time()
    return [
        Episode(
            id=uuid.uuid4().hex,
            task=infos[i]["family"],
            instruction=infos[i]["instruction"],
            env_id=ENV_ID if privileged else infos[i]["family"],
            seed=int(seeds[i]),
            split=split,
            policy_version=int(policy_version),
            observations={k: np.stack(v) for k, v in observed[i].items()},
            actions=np.stack(actions[i]),
            extras={**({"aux_positions": np.stack(aux[i])} if privileged else {}), **(
                {"chunks": np.stack(chunks[i]).astype(np.float32), "chunk_steps": np.asarray(chunk_steps[i], np.int64),
                 **{k: np.stack(v).astype(np.float32) for k, v in drawn[i].items()}}
                if policy is not None else {}
            ), **({INTERVENTION: np.asarray(taken[i], bool)} if correcting[i] else {})},
            # what the environment knows of success: a simulator always; a robot where a person judged the episode
            ground_truth=None if infos[i].get("success") is None else {"success": bool(infos[i]["success"])},
            info={"created": now, "max_steps": max_steps, "execute": execute, "phrasing": phrasing, "combos": combos,
                  "sample_seed": int(sample_seed), "position": i,  # where it stood: flywheel/contracts.py collection_order
                  **({"hard": hard} if made_hard[i] else {}),
                  **({"operator": operator[i]} if operator[i] is not None else {}),
                  **({"interventions": int(sum(taken[i]))} if correcting[i] else {}),
                  "combo_heldout": bool(infos[i].get("combo_heldout", False)),
                  "kind": infos[i].get("kind", infos[i]["family"]), "named": list(infos[i].get("named", [])),
                  "randomization": first[i][1].get("randomization", {})},
        )
        for i in range(len(seeds)) if i not in broken
    ]


def _aux_positions(env: TabletopEnv) -> np.ndarray:
    s = env.state()
    return np.concatenate([s["block"], s["target"]]).astype(np.float32)


_LIBC = None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing). A collection
    makes and frees tens of thousands of small frame arrays, and glibc keeps the freed pages: a worker between
    collections holds ~420 MB trimmed against ~1 GB untrimmed. The next collection pages that memory back in (12-15%
    of its time), and its peak is much the same either way (bench/RESULTS.md, the heap trim): so a worker trims only
    once it sits idle (``RolloutWorker``)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class RolloutWorker:
    """Holds its own copy of the policy; applies only snapshots newer than the one it has; stamps every episode."""

    def __init__(self, policy_factory: Callable[[], Policy], env_kwargs: dict, worker_index: int = 0,
                 trim_idle_s: float | None = None, threads: int | None = None):
        """``threads``: torch's threads in this process, for a worker in a process of its own (a Ray actor: one per
        CPU it was given, so that the workers on a node do not fight over its cores). None leaves them: a worker in
        the driver acts on the driver's threads, and the learner and the detector, which train there too, keep theirs.
        ``trim_idle_s``: hand freed heap pages back (``trim_heap``) once this many seconds pass after a collection
        without another starting; None never. For a worker in a process of its own (a Ray actor): one waiting for
        the learner gives its memory back while it waits, and one kept busy (``rollout.overlap``, or collections
        back to back) does not pay for paging it in again at every collection. Off in a process that holds more (the
        driver), where it would walk a large heap."""
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.policy = policy_factory()
        self.env_kwargs = dict(env_kwargs)
        self.worker_index = worker_index
        self.trim_idle_s = trim_idle_s
        self.trims = 0  # how many times it handed its heap back
        self._trim_timer: threading.Timer | None = None
        self.version = -1
        self.applied: list[int] = []  # every version applied, in order (for lag/ordering checks)
        self.created = time.perf_counter()
        self.busy_s = 0.0  # seconds spent collecting or applying weights: the rest of its life it waited

    def set_weights(self, snapshot: PolicySnapshot) -> int:
        """Apply a snapshot newer than the one held. A snapshot of the changed arrays only (``meta["delta_on"]``:
        the version it changes) needs that version here; anything else is refused, and the group sends it whole.
        The policy may keep the snapshot's arrays (Policy.load_weights): nothing here writes to them."""
        if snapshot.version > self.version:
            started = time.perf_counter()
            if "delta_on" in snapshot.meta and snapshot.meta["delta_on"] != self.version:
                raise ValueError(f"worker {self.worker_index} holds v{self.version}; the snapshot v"
                                 f"{snapshot.version} changes v{snapshot.meta['delta_on']}")
            self.policy.load_weights(snapshot.weights, snapshot.sampling)
            self.version = snapshot.version
            self.applied.append(snapshot.version)
            self.busy_s += time.perf_counter() - started
        return self.version

    def _trim(self) -> None:
        trim_heap()
        self.trims += 1

    def usage(self) -> dict[str, float]:
        """{"busy_s": seconds it has spent collecting (handing the episodes over too, ``hand_over``) or applying
        weights, "alive_s": seconds since it started, "trims": times it has handed its heap back}."""
        return {"busy_s": self.busy_s, "alive_s": time.perf_counter() - self.created, "trims": self.trims}

    def applied_versions(self) -> list[int]:
        return list(self.applied)

    def collect(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True) -> list[Episode]:
        return self.collect_with_faults(seeds, split, sample_seed, corrected)[0]

    def collect_with_faults(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True
                            ) -> tuple[list[Episode], list[dict]]:
        """(episodes, faults): an environment that raises loses its episode, not the others (``run_episodes``).
        Corrections (``env_kwargs["corrections"]``) apply in practice (split "train") unless ``corrected`` is
        False."""
        if self.version < 0:
            raise RuntimeError("rollout worker has no weights yet: publish a PolicySnapshot before collecting")
        self.policy.explore = split == "train"  # a policy that explores does so in practice, never in evaluation
        faults: list[dict] = []
        started = time.perf_counter()
        if self._trim_timer is not None:
            self._trim_timer.cancel()  # busy again: keep the heap it is about to use
        kwargs = dict(self.env_kwargs)
        if split != "train" or not corrected:
            kwargs.pop("corrections", None)  # a person may step in during practice, never in an evaluation
        episodes = run_episodes(list(seeds), split, self.policy, policy_version=self.version,
                                sample_seed=sample_seed, faults=faults, **kwargs)
        if self.trim_idle_s is not None:
            self._trim_timer = threading.Timer(self.trim_idle_s, self._trim)
            self._trim_timer.daemon = True
            self._trim_timer.start()
        self.busy_s += time.perf_counter() - started
        return episodes, [{**f, "worker": self.worker_index} for f in faults]

    def hand_over(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True) -> tuple:
        """``collect_with_faults`` for a Ray actor: (a reference to the episodes, faults). The episodes go into the
        object store here, on the worker's clock (``busy_s``). Returned as they are, Ray would store them after the
        method returns, where the worker's clock does not run: 0.1-0.7 s a collection (~200 MB of frames) that
        ``usage`` would count as waiting (bench/RESULTS.md, the actors' hand-over). The reference is owned by this
        actor: the caller fetches it before the actor may be killed (``RolloutGroup`` does, as each call comes back)."""
        import ray

        episodes, faults = self.collect_with_faults(seeds, split, sample_seed, corrected)
        started = time.perf_counter()
        ref = ray.put(episodes)
        self.busy_s += time.perf_counter() - started
        return ref, faults

    def pid(self) -> int:
        import os

        return os.getpid()

    def where(self) -> dict:
        """{"node": the Ray node id ("local" outside Ray), "host", "pid"}."""
        import os
        import socket

        try:
            import ray

            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        except ImportError:
            node = "local"
        return {"worker": self.worker_index, "node": node, "host": socket.gethostname(), "pid": os.getpid()}
