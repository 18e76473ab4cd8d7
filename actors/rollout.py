"""Rollout: step many environments together, one batched policy call per action chunk, and record Episodes.

``RolloutWorker`` is a plain class (used as-is in one process for tests and debugging); ``actors.ray_actors`` wraps
the very same class as a Ray actor for real runs.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from actors.coach import ScriptedCoach
from actors.expert import expert_action
from actors.remote_policy import PolicyServerError
from actors.robot import robot_of_worker
from actors.tabletop import Frames, TabletopEnv
from flywheel import plugins
from flywheel.contracts import INTERVENTION, Episode, Extras, Policy, PolicySnapshot, observation_keys, sensor_inputs

ENV_ID = "flywheel/Tabletop-v0"


def make_env(name: str = "tabletop", options: dict | None = None, **kwargs) -> gym.Env:
    """The environment plug-in ``name`` (``env.name``: tabletop, metaworld, fetch, robot, or an import path
    ``module:factory``), made with the keyword arguments its factory declares (flywheel/plugins.py) and every one of
    ``options`` (``env.options``: the plug-in's own)."""
    factory = plugins.resolve("env", name)
    return factory(**plugins.accepted(factory, kwargs), **(options or {}))


def parallel_limit(name: str) -> int | None:
    """How many environments of ``name`` one rollout steps at once (its factory's ``max_parallel``; None: all):
    simulators that each hold a MuJoCo model and a GL context are stepped in waves."""
    return getattr(plugins.resolve("env", name), "max_parallel", None)


def scripted_action(env: gym.Env, rng: np.random.Generator, noise: float, plan: dict | None = None) -> np.ndarray:
    """The scripted expert's action: the environment's own ``expert_action`` if it has one, else the tabletop's
    (``plan``: how to make a hard example, actors/expert.py hard_example_plan)."""
    own = getattr(env, "expert_action", None)
    return own(rng, noise) if own is not None else expert_action(env, rng, noise, **(plan or {}))


@dataclasses.dataclass(frozen=True)
class EnvSettings:
    """The environments' settings (the run's ``env.*`` but ``execute``), as ``make_env`` is given them."""

    name: str = "tabletop"
    family: str = "any"
    phrasing: str = "canonical"
    combos: str = "all"
    randomize: dict[str, float] | None = None
    sensors: tuple[str, ...] | list[str] | str = ("overhead",)
    image_size: int = 64
    max_steps: int = 40
    options: dict | None = None


def run_episodes(
    seeds: list[int],
    split: str,
    policy: Policy | None,
    *,
    policy_version: int,
    execute: int = 4,
    expert: dict | None = None,
    sample_seed: int = 0,
    make_env: Callable[..., gym.Env] = make_env,
    faults: list[dict] | None = None,
    people: dict | None = None,
    **env: Any,
) -> list[Episode]:
    """Run one episode per seed, all environments in lock-step, and return them as Episodes.

    ``env``: the environments' settings (``EnvSettings``; a key it does not have is a TypeError). With
    ``policy=None`` the scripted expert acts (demonstrations, ``policy_version`` should be -1). Otherwise the
    policy is called once per ``execute`` steps on the batch of still-running environments and the first
    ``execute`` actions of each chunk are applied (receding horizon). ``sample_seed`` seeds the policy's sampling
    noise, so a rollout is reproducible given its seeds.

    ``expert``: how the scripted expert acts, {"noise": std (0.1), "hard": kind, "operators": [...]}. ``hard``
    (demonstrations only): make that kind of hard example for the detector (actors/expert.py HARD_EXAMPLES);
    ``info["hard"]`` names it where it applied. ``operators`` (demonstrations only, the tabletop's): whose way of
    demonstrating (actors/expert.py OPERATORS), taken in turn by seed, so a seed's demonstration is the same in any
    call; ``info["operator"]`` names it.

    ``faults``: given a
    list, an environment that raises while stepping has its episode discarded (the others go on) and what happened
    appended to it; without one, the error propagates.

    ``people`` (a policy acting): who stands by in practice, {"corrections": r, "after": s, "operators": [...],
    "coaching": c}. Corrections: a person played by the scripted expert (as one of ``operators``, in turn by seed); in
    a share ``r`` of the episodes (drawn from ``sample_seed``), one still running after ``s`` steps is taken over at
    the next chunk boundary and finished by the expert; ``extras["intervention"]`` marks the steps it acted and
    ``info["interventions"]`` counts them. Coaching (a policy naming subtasks, a simulator that has them): in a share
    ``c`` of the episodes a coach stands by and corrects the policy's words (actors/coach.py); ``info["coaching"]``
    holds what it said, who and when, and ``extras["coaching"]`` the steps each utterance was in force.
    """
    settings = EnvSettings(**env)
    if not seeds:
        return []
    n = parallel_limit(settings.name)
    if n is not None and len(seeds) > n:  # heavy environments: step them in waves
        given = dict(policy_version=policy_version, execute=execute, expert=expert, make_env=make_env, faults=faults,
                     people=people, **env)
        return [ep for w in range(0, len(seeds), n)
                for ep in run_episodes(seeds[w:w + n], split, policy, sample_seed=sample_seed + 7919 * w, **given)]
    made_with = {k: v for k, v in dataclasses.asdict(settings).items() if k != "options" or v}
    envs = [make_env(**made_with) for _ in seeds]
    batch = Lockstep(envs, seeds, policy, sample_seed, settings.image_size)
    expert = expert or {}
    hard, noise = expert.get("hard"), float(expert.get("noise", 0.1))
    batch.plan(hard, expert.get("operators") or ("standard",))
    batch.plan_people(people or {})
    while batch.running:
        batch.turn(execute, noise, faults)
    batch.close()
    return batch.episodes(split, policy_version, hard, {"max_steps": settings.max_steps, "execute": execute,
                                                        "phrasing": settings.phrasing, "combos": settings.combos})


class Lockstep:
    """Environments stepped together, one per seed, and what each records: ``run_episodes``' state. At each chunk
    boundary (``turn``) the policy is called once for every environment it acts in; the scripted expert acts in the
    others (demonstrations, or a person's correction played by it)."""

    def __init__(self, envs: list[gym.Env], seeds: list[int], policy: Policy | None, sample_seed: int,
                 image_size: int):
        self.envs, self.seeds, self.policy, self.sample_seed = envs, seeds, policy, sample_seed
        # The tabletop's camera pictures are drawn together, a chunk of every environment at once, before the
        # policy looks (actors/tabletop.py Frames: the same pixels, a sixth to a quarter less drawing time)
        self.frames = Frames(image_size)
        for env in envs:
            getattr(env, "draw_later", lambda frames: None)(self.frames)
        self.first = [env.reset(seed=int(s)) for env, s in zip(envs, seeds)]
        self.observed = [{k: [v] for k, v in o.items()} for o, _ in self.first]  # every sensor on, a frame a state
        self.actions: list[list[np.ndarray]] = [[] for _ in seeds]
        self.infos = [info for _, info in self.first]
        # The simulator also records where the named block and target are (privileged state) for the auxiliary
        # grounding losses of pretraining and detector training. Policies never see it; the loop strips it before
        # the learner. Third-party simulators have no such record.
        self.privileged = hasattr(envs[0], "state")
        self.aux = [[_aux_positions(env)] if self.privileged else [] for env in envs]
        # Long-horizon tasks (actors/tabletop.py subtasks): the subtask the simulator saw under way at each
        # observation, and the one the scripted expert said it was doing at each step it acted (-1: it did not)
        self.subtasks = "subtasks" in self.first[0][1]
        self.subtask = [[info["subtask"]] if self.subtasks else [] for _, info in self.first]
        self.narration: list[list[int]] = [[] for _ in seeds]
        self.running = list(range(len(envs)))
        # The policy's own extras: every chunk it sampled and the step it was sampled at (the learner clones these
        # decisions exactly, rather than executed actions that splice two chunks together), and its other draws.
        self.chunks: list[list[np.ndarray]] = [[] for _ in seeds]
        self.chunk_steps: list[list[int]] = [[] for _ in seeds]
        self.drawn: list[dict[str, list[np.ndarray]]] = [{} for _ in seeds]
        self.rng = np.random.default_rng(sample_seed)
        self.taken: list[list[bool]] = [[] for _ in seeds]  # per step: did the expert act
        self.broken: set[int] = set()  # environments that raised: their episodes are discarded
        self.calls = 0
        self.sensors = getattr(policy, "sensors", ("overhead",))
        self.reads = observation_keys(self.sensors) & set(self.observed[0])  # stack only what the policy reads

    def plan(self, hard: str | None, operators: tuple[str, ...] | list[str]) -> None:
        """How the expert acts in each environment: a hard example (it aims just off, or just inside, success, each
        episode in its own direction, or never lets go: actors/expert.py) and which demonstrator it is."""
        seeds, policy = self.seeds, self.policy
        plans: list[dict | None] = [None] * len(seeds)
        if hard is not None and policy is None:
            from actors.expert import hard_example_plan

            angles = self.rng.uniform(0, 2 * np.pi, len(seeds))
            plans = [hard_example_plan(hard, info["family"], a) for a, (_, info) in zip(angles, self.first)]
        self.made_hard = [p is not None for p in plans]
        self.operator = [operators[int(s) % len(operators)] if policy is None and self.privileged else None
                         for s in seeds]
        self.plans = [{**(p or {}), "operator": op} if op is not None else p for p, op in zip(plans, self.operator)]

    def plan_people(self, people: dict) -> None:
        """With a policy acting, who stands by (``run_episodes``' ``people``): which episodes a person will take over,
        and in which a coach will correct the policy's words."""
        seeds, policy, coaching = self.seeds, self.policy, float(people.get("coaching", 0.0))
        rate = float(people.get("corrections", 0.0))
        self.correct_after = max(1, int(people.get("after", 16))) if rate > 0 and policy is not None else 0
        self.will_correct = (np.random.default_rng([self.sample_seed, 7]).random(len(seeds)) < rate
                             if self.correct_after else np.zeros(len(seeds), bool))
        self.correcting = [False] * len(seeds)
        if self.correct_after and self.privileged:  # the person is one of the demonstrators, in turn by seed
            operators = people.get("operators") or ["standard"]
            self.plans = [{"operator": operators[int(s) % len(operators)]} for s in seeds]
        self.coach = None
        if coaching > 0 and policy is not None:
            if not (getattr(policy, "names_subtasks", False) and self.subtasks and self.privileged):
                raise ValueError("coaching needs a policy that names its subtasks (a subtask head) and a simulator "
                                 "that knows them (the tabletop's sort, clear or stow): set rollout.coaching=0")
            self.coach = ScriptedCoach()
        self.will_coach = np.random.default_rng([self.sample_seed, 11]).random(len(seeds)) < coaching
        self.heard: list[list[dict]] = [[] for _ in seeds]  # what a coach or person said in each episode, who, when
        self.in_force: list[tuple[int, int] | None] = [None] * len(seeds)  # (utterance, the subtask it was said in)
        self.coached: list[list[int]] = [[] for _ in seeds]  # per step: the utterance in force, -1 none

    def turn(self, execute: int, expert_noise: float, faults: list[dict] | None) -> None:
        """One chunk boundary: a person standing by takes over where due, the policy acts once for every environment
        it acts in, and each running environment steps ``execute`` actions (the expert: one)."""
        for i in self.running:
            self.correcting[i] = self.correcting[i] or bool(
                self.will_correct[i] and len(self.actions[i]) >= self.correct_after)
        acting = [i for i in self.running if self.policy is not None and not self.correcting[i]]
        for i in acting:  # the scripted coach's words hold until the subtask they named is no longer under way
            said = self.in_force[i]
            if said is not None and said[1] is not None and not ScriptedCoach.holds(self.envs[i], said[1]):
                self.in_force[i] = None
        try:
            chunk, drawn = self._act(acting) if acting else (None, {})
            if self.coach is not None and acting:
                chunk, drawn = self._hear(acting, chunk, drawn)
        except PolicyServerError as e:  # a served policy that failed: its episodes waiting for the chunk are lost
            if faults is None:
                raise
            self._lose(acting, e, faults)
            acting, chunk, drawn = [], None, {}
        row_of = {i: row for row, i in enumerate(acting)}
        still = []
        for i in self.running:
            row = row_of.get(i)
            if row is not None:
                self._record_decision(i, chunk[row], {k: v[row] for k, v in drawn.items()})
            steps = execute if self.policy is not None else 1
            if not self._step(i, chunk[row] if row is not None else None, steps, expert_noise, faults):
                still.append(i)
        self.running = still

    def _act(self, acting: list[int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The policy's chunks for the environments ``acting``, and what else it drew, by row."""
        self.frames.draw()
        latest = {k: np.stack([self.observed[i][k][-1] for i in acting]) for k in self.reads}
        told = {"told": [self.heard[i][self.in_force[i][0]]["words"] if self.in_force[i] else None
                         for i in acting]} if getattr(self.policy, "names_subtasks", False) else {}
        chunk = self.policy.act(*sensor_inputs(latest, self.sensors), [self.infos[i]["instruction"] for i in acting],
                                seed=self.sample_seed * 100_003 + self.calls, **told)
        self.calls += 1
        return chunk, dict(getattr(self.policy, "last_extras", {}))  # a policy that draws nothing has none

    def _lose(self, acting: list[int], error: Exception, faults: list[dict]) -> None:
        """The episodes of ``acting`` end here, discarded, each with a fault saying why."""
        for i in acting:
            faults.append({"seed": int(self.seeds[i]), "step": len(self.actions[i]),
                           "error": f"{type(error).__name__}: {error}"})
            self.broken.add(i)
        self.running = [i for i in self.running if i not in self.broken]

    def _record_decision(self, i: int, chunk: np.ndarray, drawn: dict[str, np.ndarray]) -> None:
        self.chunks[i].append(chunk)
        self.chunk_steps[i].append(len(self.actions[i]))
        for k, v in drawn.items():
            self.drawn[i].setdefault(k, []).append(v)

    def _hear(self, acting: list[int], chunk: np.ndarray, drawn: dict[str, np.ndarray]
              ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A coach standing by hears the words the policy is about to act on (its subtask head's) and, where they
        name nothing left to do, says what is before it acts: those rows draw their chunk again, for the coach's
        words, which hold from then on (``turn``) -> the chunks to act on."""
        told = []
        for row, i in enumerate(acting):
            if not self.will_coach[i] or self.in_force[i] is not None:
                continue
            env = self.envs[i]
            words = self.coach.correct(env, self.policy.words(drawn["prompt"][row]))
            if words is not None:
                self.heard[i].append({"step": len(self.actions[i]), "words": words, "who": self.coach.who,
                                      "time": time.time()})
                self.in_force[i] = (len(self.heard[i]) - 1, env.subtask_index())
                told.append(row)
        if not told:
            return chunk, drawn
        again, drawn_again = self._act([acting[row] for row in told])
        chunk, drawn = chunk.copy(), {k: v.copy() for k, v in drawn.items()}
        chunk[told] = again
        for k, v in drawn_again.items():
            drawn[k][told] = v
        return chunk, drawn

    def _listen(self, i: int, said: dict) -> None:
        """A person's words to the policy, recorded with who and when: in force from the next step until they say
        something else (empty words: nothing). A policy with a subtask head acts on them; any other only records
        them."""
        self.in_force[i] = None
        if said.get("words"):
            self.heard[i].append({"step": len(self.actions[i]), "words": str(said["words"]),
                                  "who": str(said.get("who") or "person"),
                                  "time": float(said.get("time", time.time()))})
            self.in_force[i] = (len(self.heard[i]) - 1, None)

    def _step(self, i: int, chunk: np.ndarray | None, steps: int, expert_noise: float,
              faults: list[dict] | None) -> bool:
        """Up to ``steps`` actions in environment ``i``: the chunk's, or the expert's -> whether its episode ended.
        With ``faults``, an environment that raises ends its episode, which is discarded, and says what happened."""
        env = self.envs[i]
        for k in range(steps):
            a = chunk[k] if chunk is not None else scripted_action(env, self.rng, expert_noise, self.plans[i])
            if self.subtasks:
                self.narration[i].append(-1 if chunk is not None else env.subtask_index())
            try:
                obs, _, term, trunc, info = env.step(a)
            except Exception as e:
                if faults is None:
                    raise
                faults.append({"seed": int(self.seeds[i]), "step": len(self.actions[i]),
                               "error": f"{type(e).__name__}: {e}"})
                self.broken.add(i)
                return True
            for key, v in obs.items():
                self.observed[i][key].append(v)
            person = info.get("intervention", False)  # a person at the robot took over (actors/robot_host.py)
            self.actions[i].append(np.asarray(info["applied_action"] if person else a, np.float32))
            self.taken[i].append(self.correcting[i] or person)
            self.coached[i].append(self.in_force[i][0] if self.in_force[i] else -1)
            if info.get("said") is not None:  # a person's words at a robot (its page: actors/robot.py Operator.say)
                self._listen(i, info["said"])
            if self.privileged:
                self.aux[i].append(_aux_positions(env))
            if self.subtasks:
                self.subtask[i].append(info["subtask"])
            self.infos[i] = info
            if term or trunc:
                return True
        return False

    def close(self) -> None:
        self.frames.draw()
        for i, env in enumerate(self.envs):  # a third-party adapter goes back to its pool; the others are closed
            try:
                getattr(env, "release", env.close)()
            except Exception:
                if i not in self.broken:
                    raise

    def episodes(self, split: str, policy_version: int, hard: str | None, settings: dict) -> list[Episode]:
        """Every episode that ran to its end (none of a broken environment), in seed order."""
        now = time.time()
        return [self._episode(i, split, policy_version, hard, {"created": now, **settings})
                for i in range(len(self.seeds)) if i not in self.broken]

    def _episode(self, i: int, split: str, policy_version: int, hard: str | None, info: dict) -> Episode:
        last = self.infos[i]
        extras = {Extras.AUX_POSITIONS: np.stack(self.aux[i])} if self.privileged else {}
        if self.subtasks:
            extras.update({Extras.SUBTASK: np.asarray(self.subtask[i], np.int64),
                           Extras.NARRATION: np.asarray(self.narration[i], np.int64)})
        if self.policy is not None:
            extras.update({Extras.CHUNKS: np.stack(self.chunks[i]).astype(np.float32),
                           Extras.CHUNK_STEPS: np.asarray(self.chunk_steps[i], np.int64),
                           **{k: np.stack(v).astype(np.float32) for k, v in self.drawn[i].items()}})
        helped = self.correcting[i] or any(self.taken[i])
        if helped:
            extras[INTERVENTION] = np.asarray(self.taken[i], bool)
        if self.heard[i]:
            extras[Extras.COACHING] = np.asarray(self.coached[i], np.int64)
        return Episode(
            id=uuid.uuid4().hex, task=last["family"], instruction=last["instruction"],
            env_id=ENV_ID if self.privileged else last["family"], seed=int(self.seeds[i]), split=split,
            policy_version=int(policy_version),
            observations={k: np.stack(v) for k, v in self.observed[i].items()}, actions=np.stack(self.actions[i]),
            extras=extras,
            # what the environment knows of success: a simulator always; a robot where a person judged the episode
            ground_truth=None if last.get("success") is None else {"success": bool(last["success"])},
            info={**info, "sample_seed": int(self.sample_seed), "position": i,  # flywheel/contracts.py
                  **({"hard": hard} if self.made_hard[i] else {}),                 # collection_order
                  **({"operator": self.operator[i]} if self.operator[i] is not None else {}),
                  **({"interventions": int(sum(self.taken[i]))} if helped else {}),
                  **({"coach": self.coach.who} if self.coach and self.will_coach[i] else {}),  # who stood by
                  **({"coaching": self.heard[i]} if self.heard[i] or self.coach and self.will_coach[i] else {}),
                  "combo_heldout": bool(last.get("combo_heldout", False)),
                  # a robot's safety layer: what it saw, and the event that cut the episode short, if one did
                  **{k: last[k] for k in ("safety", "cut_short") if k in last},
                  "kind": last.get("kind", last["family"]), "named": list(last.get("named", [])),
                  **({"subtasks": self.first[i][1]["subtasks"]} if self.subtasks else {}),
                  "randomization": self.first[i][1].get("randomization", {})},
        )


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
        self.env_kwargs = robot_of_worker(env_kwargs, worker_index)
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
        The people standing by (``env_kwargs["people"]``: corrections, coaching) do so in practice (split "train")
        unless ``corrected`` is False. The practice scenes' randomisation (``env_kwargs["randomize"]``) applies in
        practice only: an evaluation is in the nominal scene, and split "robust" is one under
        ``env_kwargs["held_out_randomize"]`` (the robustness split)."""
        if self.version < 0:
            raise RuntimeError("rollout worker has no weights yet: publish a PolicySnapshot before collecting")
        self.policy.explore = split == "train"  # a policy that explores does so in practice, never in evaluation
        faults: list[dict] = []
        started = time.perf_counter()
        if self._trim_timer is not None:
            self._trim_timer.cancel()  # busy again: keep the heap it is about to use
        kwargs = dict(self.env_kwargs)
        held_out = kwargs.pop("held_out_randomize", None)
        if split == "robust":
            if held_out is None:
                raise ValueError("split 'robust' needs the workers' env_kwargs to hold held_out_randomize")
            kwargs["randomize"] = held_out
            split = "eval"  # its episodes are evaluation episodes; each one's info["randomization"] says how it drew
        elif split != "train":
            kwargs.pop("randomize", None)  # practice may be randomised (env.randomize); evaluation is nominal
        if split != "train" or not corrected:
            kwargs.pop("people", None)  # a person may step in or coach during practice, never in an evaluation
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
