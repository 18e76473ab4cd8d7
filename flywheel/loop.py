"""The flywheel loop: collect -> store -> label -> update -> publish -> evaluate -> log, each phase timed.

Every part arrives through its contract (``flywheel.contracts``); the same function runs with in-process workers
(tests, debugging) or Ray actors (real runs). Episodes are stored the moment they come back, before anything else
touches them, so a crash later in the iteration loses no completed episode.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Collection, Protocol

import numpy as np

from flywheel.audit import AuditResult, audit
from flywheel.checkpoint import CheckpointDir
from flywheel.config import ConfigError
from flywheel.contracts import Episode, Label, Learner, LearnerLost, PolicySnapshot, SuccessDetector
from flywheel.gate import GateDecision, judge
from flywheel.metrics import MetricsSink, PhaseTimer, wilson_interval
from flywheel.store import EpisodeStore


class Rollouts(Protocol):
    def collect(self, seeds: list[int], split: str, sample_seed: int = 0) -> list[Episode]: ...

    def publish(self, snapshot: PolicySnapshot) -> list[int]: ...


@dataclasses.dataclass
class Evaluation:
    """Success of one policy version on held-out seeds, as ``judged_by`` saw it: ``ground_truth`` (the simulator's
    verdict) or a detector's version (an environment that cannot judge itself, such as a robot)."""

    version: int
    episodes: int
    successes: int
    ci95: tuple[float, float]
    per_task: dict[str, float]
    outcomes: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # 1/0 per seed, in seed order
    judged_by: str = "ground_truth"

    @property
    def success(self) -> float:
        return self.successes / max(1, self.episodes)

    @property
    def outcomes_text(self) -> str:
        """The per-seed outcomes as one string of 0s and 1s, in seed order: how run_state.json and summary.json keep
        them, so that two runs evaluated on the same seeds can be compared seed by seed (a paired test)."""
        return "".join(map(str, self.outcomes))

    def as_metrics(self, prefix: str = "eval") -> dict[str, Any]:
        out = {
            f"{prefix}/success": self.success,
            f"{prefix}/ci95_low": self.ci95[0],
            f"{prefix}/ci95_high": self.ci95[1],
            f"{prefix}/episodes": self.episodes,
            f"{prefix}/version": self.version,
        }
        out.update({f"{prefix}/success_{task}": rate for task, rate in self.per_task.items()})
        return out


def evaluate(rollouts: Rollouts, seeds: list[int], version: int, sample_seed: int = 12345,
             detector: SuccessDetector | None = None) -> Evaluation:
    """Run the current policy on the held-out seeds and score it with the simulator's ground truth, or, given a
    ``detector``, with its verdicts (``eval.judge=detector``: a robot, whose episodes carry no ground truth).

    The same seeds and the same sampling seed every time, so two versions are compared on identical layouts.
    Evaluation episodes are not stored and never reach the learner.
    """
    return score_held_out(rollouts.collect(seeds, "eval", sample_seed=sample_seed), seeds, version, detector)


def score_held_out(episodes: list[Episode], seeds: list[int], version: int,
                   detector: SuccessDetector | None = None) -> Evaluation:
    """``evaluate``'s verdicts on episodes already run (the detector's are appended to their labels)."""
    if detector is not None:
        verdicts = [lab.success for lab in label_episodes(detector, episodes)]
    else:
        unjudged = [ep.seed for ep in episodes if not ep.ground_truth or "success" not in ep.ground_truth]
        if unjudged:
            raise ConfigError(
                f"{len(unjudged)} of {len(episodes)} held-out episodes came back without a ground-truth success "
                f"(the environment's info['success']; seed {unjudged[0]} first): an environment that cannot judge "
                f"itself, such as a robot, is evaluated by the detector. Give eval.judge=detector (and, for the "
                f"promotion gate's audit, have a person judge some episodes: info['success'] where they did).")
        verdicts = [bool(ep.ground_truth["success"]) for ep in episodes]
    succeeded = {ep.seed: ok for ep, ok in zip(episodes, verdicts)}
    ok = np.array([succeeded.get(s, False) for s in seeds])  # an episode lost to a crashing environment failed
    tasks = sorted({ep.task for ep in episodes})
    per_task = {t: float(np.mean([succeeded[ep.seed] for ep in episodes if ep.task == t])) for t in tasks}
    return Evaluation(version, len(ok), int(ok.sum()), wilson_interval(int(ok.sum()), len(ok)), per_task,
                      tuple(int(o) for o in ok), "ground_truth" if detector is None else detector.version)


def label_episodes(detector: SuccessDetector, episodes: list[Episode]) -> list[Label]:
    """One frozen detector version judges every episode; the labels are appended, never replacing older ones."""
    scores = detector.score(episodes)
    labels = [
        Label(source="detector", success=bool(s >= detector.threshold), version=detector.version,
              score=float(s), threshold=detector.threshold)
        for s in scores
    ]
    for ep, lab in zip(episodes, labels):
        ep.labels.append(lab)
    return labels


PRIVILEGED_EXTRAS = ("aux_positions",)


def learner_view(ep: Episode, reads: Collection[str] | None = None) -> Episode:
    """The episode as the learner may see it: no ground-truth success (nor an audit's ground-truth label), no
    privileged simulator state; with ``reads`` (the observation keys the policy reads), no other observations
    either: a camera recorded for the detector alone would otherwise double what the learner's replay holds."""
    extras = {k: v for k, v in ep.extras.items() if k not in PRIVILEGED_EXTRAS}
    labels = [lab for lab in ep.labels if lab.source != "ground_truth"]
    observations = ep.observations if reads is None else {k: v for k, v in ep.observations.items() if k in reads}
    return dataclasses.replace(ep, ground_truth=None, extras=extras, labels=labels, observations=observations)


@dataclasses.dataclass
class Budget:
    """Stop when wall clock, iterations or env steps run out. ``reserve_s`` keeps time for the final evaluation."""

    deadline: float  # time.time() by which the run must be done
    max_iterations: int = 0
    max_env_steps: int = 0
    max_episodes: int = 0
    stop_requested: str | None = None  # why the run was asked to stop early (a signal's name); set from outside

    def allows(self, iteration: int, env_steps: int, next_iteration_s: float, reserve_s: float,
               episodes: int = 0) -> bool:
        if self.stop_requested:
            return False
        if self.max_iterations and iteration >= self.max_iterations:
            return False
        if self.max_env_steps and env_steps >= self.max_env_steps:
            return False
        if self.max_episodes and episodes >= self.max_episodes:
            return False
        return time.time() + next_iteration_s + reserve_s <= self.deadline


@dataclasses.dataclass
class LoopState:
    """Where the loop stands. ``to_json``/``from_json`` carry it across processes (a resumed run); weights are not
    in it: they are checkpoints, named by version."""

    iteration: int = 0
    episodes: int = 0
    env_steps: int = 0
    next_train_index: int = 0  # the next training seed index: seeds are never reused
    evaluations: list[Evaluation] = dataclasses.field(default_factory=list)
    audits: list[AuditResult] = dataclasses.field(default_factory=list)  # one per iteration (before any retrain)
    alarms: int = 0
    paused_updates: int = 0
    detector_versions: list[str] = dataclasses.field(default_factory=list)  # every detector that labelled
    rollbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    promotions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # periodic retraining's decisions
    best: tuple[int, float, dict] | None = None  # (version, held-out success, weights) of the best evaluated policy
    gates: list[GateDecision] = dataclasses.field(default_factory=list)  # the promotion gate's decisions
    deployed: tuple[int, tuple[int, ...], dict] | None = None  # (version, gate outcomes, weights) the actors run
    deployed_judged_by: str | None = None  # who judged the deployed version's gate outcomes (ground_truth, a detector)
    recoveries: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the learner diverged (NaN/inf)
    diverged_in_a_row: int = 0

    def to_json(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        plain["evaluations"] = [{**dataclasses.asdict(e), "outcomes": e.outcomes_text} for e in self.evaluations]
        plain["audits"] = [dataclasses.asdict(a) for a in self.audits]
        plain["gates"] = [dataclasses.asdict(g) for g in self.gates]
        plain["best"] = None if self.best is None else list(self.best[:2])
        plain["deployed"] = None if self.deployed is None else [self.deployed[0], list(self.deployed[1])]
        return plain

    @classmethod
    def from_json(cls, plain: dict[str, Any], weights_of: Callable[[int], dict]) -> "LoopState":
        """``weights_of(version)``: the policy weights of a version (its checkpoint)."""
        state = cls(**{k: v for k, v in plain.items() if k not in ("evaluations", "audits", "gates", "best",
                                                                  "deployed")})
        state.evaluations = [Evaluation(**{**e, "ci95": tuple(e["ci95"]),  # (a state kept before outcomes were: none)
                                           "outcomes": tuple(map(int, e.get("outcomes", "")))})
                             for e in plain["evaluations"]]
        state.audits = [AuditResult(**a) for a in plain["audits"]]
        state.gates = [GateDecision(**g) for g in plain["gates"]]
        if plain["best"] is not None:
            state.best = (plain["best"][0], plain["best"][1], weights_of(plain["best"][0]))
        if plain["deployed"] is not None:
            version, outcomes = plain["deployed"]
            state.deployed = (version, tuple(outcomes), weights_of(version))
        return state

    def protected_versions(self) -> tuple[int, ...]:
        """Versions whose checkpoints must outlive the newest K: the deployed one and the best evaluated."""
        return tuple(v for v in (self.deployed and self.deployed[0], self.best and self.best[0]) if v is not None)


@dataclasses.dataclass
class GateSettings:
    """The promotion gate (flywheel/gate.py): ``seeds`` held out from training and from the reported evaluation.

    Judged by the detector (``run_loop(eval_judge="detector")``: a robot), the candidate's gate episodes are also
    audited: up to ``audit`` of those with a trusted verdict (a person's on a robot, the simulator's here) are
    checked against the detector's, and a gap beyond ``bound`` (95%, as flywheel/audit.py) holds the candidate back,
    however the detector rates it: its approval of this policy cannot be trusted."""

    seeds: list[int]
    confidence: float = 0.95
    margin: float = 0.0
    sample_seed: int = 54321
    audit: int = 64
    bound: float = 0.15


@dataclasses.dataclass
class AuditSettings:
    """The audit in the loop (flywheel/audit.py). ``retrain``: the run layer's way to train a new detector on the
    store's trusted labels (the audited episodes' included); None: an alarm only pauses updates."""

    sample: int = 64
    bound: float = 0.15
    retrain: Callable[..., SuccessDetector] | None = None  # retrain(exclude=ids) -> a new detector
    seed: int = 0
    retrain_every: int = 0  # > 0: every so many iterations a candidate detector is trained on every trusted label
    #                         but this iteration's audit, and promoted if it judges that audit no worse (AUROC)

    def as_summary(self, state: "LoopState") -> dict[str, Any]:
        return {
            "sample": self.sample, "bound": self.bound, "alarms": state.alarms, "promotions": state.promotions,
            "paused_updates": state.paused_updates, "detector_versions": state.detector_versions,
            "rollbacks": state.rollbacks,
            "per_iteration": [dataclasses.asdict(a) | {"gap": a.gap} for a in state.audits],
        }


@dataclasses.dataclass
class MorePractice:
    """Rounds of practice beyond an iteration's episodes (``RolloutGroup.collect_async(more=)``): the actors go on
    with them while the learner trains, rather than wait for its weights. Their seed indices follow the
    iteration's, a round of whole layouts at a time; ``drawn`` counts the layouts handed out, all of which come
    back (or are recorded lost), so the seed index moves on by them and no seed is used twice."""

    seed_of: Callable[[int], int]
    first: int  # the seed index of the first layout beyond the iteration's
    group_size: int
    limit: int  # layouts at most
    round_layouts: int = 1
    drawn: int = 0

    def __iter__(self) -> "MorePractice":
        return self

    def __next__(self) -> tuple[list[int], int]:
        if self.drawn + self.round_layouts > self.limit:
            raise StopIteration
        start = self.first + self.drawn
        self.drawn += self.round_layouts
        return [self.seed_of(start + i // self.group_size) for i in range(self.round_layouts * self.group_size)], start


ROUND_EPISODES = 16  # a round beyond the iteration's: one actor's batch, where a batched policy call has most of
#                      its gain over one environment at a time (bench batched_inference), and short enough (~0.3 s
#                      on a core) that the learner seldom waits for the last one


def run_loop(
    *,
    rollouts: Rollouts,
    store: EpisodeStore,
    detector: SuccessDetector,
    learner: Learner,
    metrics: MetricsSink,
    checkpoints: CheckpointDir,
    budget: Budget,
    train_seed: Callable[[int], int],
    eval_seeds: list[int],
    episodes_per_iteration: int,
    eval_every: int,
    group_size: int = 1,
    state: LoopState,
    on_iteration: Callable[[LoopState, dict[str, Any]], None] = lambda state, row: None,
    audit_settings: AuditSettings | None = None,
    learner_reads: Collection[str] | None = None,
    gate: GateSettings | None = None,
    save_state: Callable[[LoopState], None] = lambda state: None,
    in_flight: Collection[Episode] = (),
    in_flight_layouts: int = 0,
    overlap: bool = False,
    keep_collecting: float = 0.0,
    eval_judge: str = "ground_truth",
) -> LoopState:
    """Turn the flywheel until the budget runs out; returns the final state (evaluations first to last).

    ``learner_reads``: the observation keys the policy reads (learner_view drops the others). ``gate``: every new
    version must pass the promotion gate before practice, or the run rolls back. ``save_state(state)`` is called
    after each iteration, once its checkpoint is on disk (a resumable point). ``in_flight``: episodes of the next
    iteration stored before a crash (a resumed run), spanning ``in_flight_layouts`` seed indices (more than an
    iteration's when it had practice beyond it); only the attempts they lack are collected. ``overlap``: the
    actors collect the next iteration's episodes while this one's are labelled and learned from (with the weights
    they had: practice one version behind); a new snapshot and the gate's evaluation queue behind that collection.
    ``keep_collecting`` (with ``overlap``): actors done with the next iteration's share before the learner's
    update ends go on practising with the same weights, up to this many times ``episodes_per_iteration`` more
    (``MorePractice``), and the next iteration learns from all of it.
    ``eval_judge``: who scores the evaluations and the gate, ``ground_truth`` (a simulator) or ``detector`` (the
    detector labelling practice at the time: a robot), the gate then audited against trusted verdicts."""
    if eval_judge not in ("ground_truth", "detector"):
        raise ConfigError(f"eval.judge={eval_judge}: choose ground_truth (the simulator's verdict) or detector")

    def judge_by() -> SuccessDetector | None:
        return detector if eval_judge == "detector" else None  # the one labelling now (an alarm may replace it)

    audit_rng = np.random.default_rng(audit_settings.seed if audit_settings else 0)
    keep_best = audit_settings is not None  # the best weights are kept only for the audit's rollback
    if not state.detector_versions:
        state.detector_versions.append(detector.version)
    if not state.evaluations:
        state.evaluations.append(evaluate(rollouts, eval_seeds, learner.version, detector=judge_by()))
        if keep_best:
            _remember_best(state, state.evaluations[-1], learner)
        metrics.log(state.evaluations[-1].as_metrics(), step=0)
        on_iteration(state, state.evaluations[-1].as_metrics())
    if gate is not None and state.deployed is None:
        ran = evaluate(rollouts, gate.seeds, learner.version, sample_seed=gate.sample_seed, detector=judge_by())
        state.deployed = (learner.version, ran.outcomes, learner.snapshot().weights)
        state.deployed_judged_by = ran.judged_by
    in_flight = list(in_flight)
    pending: Callable[[], list[Episode]] | None = None  # the next iteration's collection, started (overlap)
    more: MorePractice | None = None  # the practice beyond it, handed out a round at a time
    overlap = overlap and hasattr(rollouts, "collect_async")
    last_iteration_s, eval_s = 0.0, 0.0
    usage = _usage(rollouts)  # the actors' busy time so far: each iteration reports its share of the interval
    while budget.allows(state.iteration, state.env_steps, last_iteration_s, reserve_s=eval_s * 1.2 + 2.0,
                        episodes=state.episodes):
        started = time.perf_counter()
        timer = PhaseTimer()
        with timer("collect"):
            # ``group_size`` attempts at each layout, so that the learner can compare attempts (group advantages).
            layouts = max(1, episodes_per_iteration // group_size)
            if pending is not None:  # started last iteration, on these very seeds, and the rounds beyond them
                adopted, new, pending = [], pending(), None
                taken = layouts + (more.drawn if more else 0)
            else:
                taken = max(layouts, in_flight_layouts if in_flight else 0)
                seeds = [train_seed(state.next_train_index + i // group_size) for i in range(taken * group_size)]
                adopted, seeds = _adopt(in_flight, seeds)
                in_flight = []
                new = rollouts.collect(seeds, "train", sample_seed=state.next_train_index) if seeds else []
            state.next_train_index += taken
        busy, usage = _busy_fraction(usage, _usage(rollouts))  # the actors are idle now: the answer is at once
        episodes = adopted + new
        if overlap and budget.allows(state.iteration + 1, state.env_steps, 2 * last_iteration_s,
                                     reserve_s=eval_s * 1.2 + 2.0, episodes=state.episodes + len(episodes)):
            # the next collection starts before this one is stored: the actors do not wait for the disk
            ahead = [train_seed(state.next_train_index + i // group_size) for i in range(layouts * group_size)]
            more = _more_practice(keep_collecting, budget, state, len(episodes), layouts, group_size, train_seed)
            pending = rollouts.collect_async(ahead, "train", sample_seed=state.next_train_index,
                                             **({"more": more} if more else {}))
        with timer("store"):
            for ep in new:
                store.add(ep)
        lag = learner.version - min((ep.policy_version for ep in episodes), default=learner.version)
        with timer("label"):
            labels = label_episodes(detector, episodes)
            store.add_labels([(ep.id, lab) for ep, lab in zip(episodes, labels)])
        trusted = True
        audit_row: dict[str, Any] = {}
        if audit_settings is not None and audit_settings.sample > 0:
            with timer("audit"):
                detector, labels, trusted, audit_row = _audit_and_recover(
                    audit_settings, audit_rng, state, store, detector, episodes, labels, learner, rollouts,
                    eval_seeds, metrics)
        if gate is not None and judge_by() is not None and state.deployed_judged_by != detector.version:
            with timer("gate"):  # a new detector: the deployed version's gate outcomes judged again, by it
                _rejudge_deployed(gate, state, rollouts, detector)
        stats: dict[str, float] = {}
        if trusted:
            with timer("update"):
                # The learner sees labels, never the simulator's ground truth or privileged state.
                # in the order the seeds were listed, as a resumed run refills its buffer (flywheel/resume.py)
                view = [learner_view(ep, learner_reads) for ep in sorted(episodes, key=Episode.collection_order)]
                try:
                    try:
                        stats = learner.update(view)
                    except LearnerLost as e:  # restarted from the deployed checkpoint: the same update, once more
                        state.recoveries.append({"iteration": state.iteration + 1, "error": str(e)[:300],
                                                 "restored": learner.version, "action": "update made again"})
                        stats = learner.update(view)
                    _check_finite(learner)
                    state.diverged_in_a_row = 0
                except FloatingPointError as e:
                    stats = _recover(learner, checkpoints, rollouts, state, e)
        else:
            state.paused_updates += 1  # labels not to be trusted: no update from them
        with timer("publish"):
            snapshot = learner.snapshot()
            published = snapshot.version > getattr(rollouts, "published_version", -1)
            if published:
                rollouts.publish(snapshot)
        gate_row: dict[str, Any] = {}
        if gate is not None and published:
            with timer("gate"):
                snapshot, gate_row = _gate(gate, state, rollouts, learner, snapshot, judge_by())
        if published:
            with timer("checkpoint"):
                checkpoints.save(snapshot.version, snapshot.weights, {"version": snapshot.version, **snapshot.meta},
                                 state=learner.training_state(), keep_also=state.protected_versions())
        state.iteration += 1
        state.episodes += len(episodes)
        state.env_steps += sum(ep.num_steps for ep in episodes)
        row: dict[str, Any] = {
            "iteration": state.iteration,
            "policy_version": snapshot.version,
            "episodes": state.episodes,
            "env_steps": state.env_steps,
            # Claimed (detector) against true (simulator) success of the collected episodes: the gap is what an
            # audit watches. The learner never saw the second number.
            "train/claimed_success": float(np.mean([lab.success for lab in labels])),
            **_true_success(episodes),
            **{f"learner/{k}": v for k, v in stats.items()},
            **audit_row,
            **gate_row,
            "rollout/faults": len(getattr(rollouts, "faults", ())),  # so far: actors replaced, episodes lost
            # the share of practice a person (rollout.corrections: the scripted expert) took over and finished; the
            # claimed and true success rates above count those episodes' ends (true_success_unaided does not), and
            # the learner does not credit the policy with them
            "rollout/corrected": float(np.mean([ep.intervened().any() for ep in episodes])) if episodes else 0.0,
            # how many versions behind the learner the practice it learned from was (0: synchronous)
            "rollout/lag_versions": lag,
            # practice beyond episodes_per_iteration: what the actors collected while the learner trained
            "rollout/kept_collecting": (taken - layouts) * group_size,
            **({f"sync/{k}": v for k, v in rollouts.last_sync.items()} if published and getattr(
                rollouts, "last_sync", None) else {}),
        }
        if state.iteration % eval_every == 0 or state.iteration == 1:  # what practice looked like
            judged = {lab.success: ep for ep, lab in zip(episodes, labels) if "image" in ep.observations}
            metrics.log_clips([(f"v{ep.policy_version}-judged-{'success' if ok else 'failure'}",
                                ep.observations["image"]) for ok, ep in sorted(judged.items())], state.iteration)
        if state.iteration % eval_every == 0 and state.evaluations[-1].version != snapshot.version:
            with timer("evaluate"):
                state.evaluations.append(evaluate(rollouts, eval_seeds, snapshot.version, detector=judge_by()))
            if keep_best:
                _remember_best(state, state.evaluations[-1], learner)
            row.update(state.evaluations[-1].as_metrics())
            eval_s = timer.seconds["evaluate"]
        row.update(timer.as_metrics())
        # Pipeline: the share of the iteration the learner's side spent waiting for practice, and the share of
        # the actors' time they spent working (the rest they waited for the next collection, and its weights).
        row["time/learner_wait_fraction"] = timer.seconds["collect"] / max(
            1e-9, time.perf_counter() - started - timer.seconds.get("evaluate", 0.0))
        if busy is not None:
            row["rollout/busy_fraction"] = busy
        save_state(state)
        metrics.log(row, step=state.iteration)
        on_iteration(state, row)
        last_iteration_s = time.perf_counter() - started - timer.seconds.get("evaluate", 0.0)
        if eval_s == 0.0:
            eval_s = timer.seconds["collect"] * len(eval_seeds) / max(1, episodes_per_iteration)
    if pending is not None:  # collected while the budget ran out: stored, for a resumed run to learn from
        for ep in pending():
            store.add(ep)
    if state.evaluations[-1].version != learner.version:
        state.evaluations.append(evaluate(rollouts, eval_seeds, learner.version, detector=judge_by()))
        metrics.log(state.evaluations[-1].as_metrics(), step=state.iteration)
        on_iteration(state, state.evaluations[-1].as_metrics())
    return state


def _more_practice(keep_collecting: float, budget: Budget, state: LoopState, collected: int, layouts: int,
                   group_size: int, train_seed: Callable[[int], int]) -> MorePractice | None:
    """The rounds the actors may go on with after the next iteration's share: ``keep_collecting`` iterations'
    worth at most, and none past the budget's episodes."""
    limit = int(keep_collecting * layouts)
    if budget.max_episodes:
        left = budget.max_episodes - state.episodes - collected - layouts * group_size
        limit = min(limit, max(0, left) // group_size)
    round_layouts = max(1, -(-ROUND_EPISODES // group_size))
    if limit < round_layouts:
        return None
    return MorePractice(train_seed, state.next_train_index + layouts, group_size, limit, round_layouts)


MAX_DIVERGED_IN_A_ROW = 3


def _usage(rollouts: Rollouts) -> list[dict[str, float]] | None:
    return rollouts.usage() if hasattr(rollouts, "usage") else None


def _busy_fraction(before: list[dict] | None, now: list[dict] | None) -> tuple[float | None, list[dict] | None]:
    """The actors' busy seconds over their alive seconds between two readings (a replaced worker counts from its
    start) -> (fraction, ``now`` for the next interval)."""
    if not before or not now or len(before) != len(now):
        return None, now
    busy = alive = 0.0
    for b, n in zip(before, now):
        fresh = n["alive_s"] < b["alive_s"]  # a new actor in that place
        busy += n["busy_s"] - (0.0 if fresh else b["busy_s"])
        alive += n["alive_s"] - (0.0 if fresh else b["alive_s"])
    return (busy / alive if alive > 0 else None), now


def _check_finite(learner: Learner) -> None:
    """The NaN/inf guard after every update (trainers check each step's loss; this checks what it left)."""
    bad = [k for k, v in learner.snapshot().weights.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"the update left NaN/inf in {bad[:3]}")


def _recover(learner: Learner, checkpoints: CheckpointDir, rollouts: Rollouts, state: LoopState,
             error: FloatingPointError) -> dict[str, float]:
    """A learner that diverged goes back to the checkpoint of the version the actors run (weights, optimizer,
    generators); the iteration's update is lost, its episodes stay stored. Three in a row stop the run."""
    state.diverged_in_a_row += 1
    version = getattr(rollouts, "published_version", learner.version)
    weights, _, training = checkpoints.load(version, with_state=True)
    learner.resume_from(weights, training)
    state.recoveries.append({"iteration": state.iteration + 1, "error": str(error)[:300], "restored": version})
    if state.diverged_in_a_row >= MAX_DIVERGED_IN_A_ROW:
        raise FloatingPointError(
            f"the learner diverged (NaN/inf) in {state.diverged_in_a_row} updates in a row, each time restored from "
            f"checkpoint v{version}: {error}. Lower learner.lr (or learner.ppo_lr), then resume the run with "
            f"flywheel run run_dir=... ; its episodes and checkpoints are intact.") from error
    return {"diverged": 1.0}


def _adopt(stored: list[Episode], seeds: list[int]) -> tuple[list[Episode], list[int]]:
    """Of the attempts ``seeds`` asks for (a seed once per attempt), those already in ``stored``, and the seeds
    still to run. An attempt stored before a crash is used, never run again: none lost, none twice."""
    wanted: dict[int, int] = {}
    for s in seeds:
        wanted[s] = wanted.get(s, 0) + 1
    adopted = []
    for ep in stored:
        if wanted.get(ep.seed, 0) > 0:
            wanted[ep.seed] -= 1
            adopted.append(ep)
    rest = [s for s, n in wanted.items() for _ in range(n)]
    return adopted, rest


def _true_success(episodes: list[Episode]) -> dict[str, float]:
    """The simulator's success of the practice episodes that have one (a robot's: those a person judged), and
    (``train/true_success_unaided``) of those among them that no person took over: the policy's own. The first
    counts an episode a person finished (``rollout.corrections``) as a success, the second leaves it out."""
    known = [ep for ep in episodes if ep.ground_truth and "success" in ep.ground_truth]
    unaided = [ep for ep in known if not ep.intervened().any()]
    rate = lambda eps: float(np.mean([bool(ep.ground_truth["success"]) for ep in eps]))  # noqa: E731
    return {**({"train/true_success": rate(known)} if known else {}),
            **({"train/true_success_unaided": rate(unaided)} if unaided else {})}


def _rejudge_deployed(gate: GateSettings, state: LoopState, rollouts: Rollouts, detector: SuccessDetector) -> None:
    """The detector judging the gate was replaced: run the deployed version (which the actors hold between gates)
    on the gate's seeds again, so that candidates are compared with it by the same detector."""
    assert state.deployed is not None
    version, _, weights = state.deployed
    ran = evaluate(rollouts, gate.seeds, version, sample_seed=gate.sample_seed, detector=detector)
    state.deployed, state.deployed_judged_by = (version, ran.outcomes, weights), ran.judged_by


def _gate(gate: GateSettings, state: LoopState, rollouts: Rollouts, learner: Learner, snapshot: PolicySnapshot,
          detector: SuccessDetector | None) -> tuple[PolicySnapshot, dict[str, Any]]:
    """Run the candidate (just published) on the gate's seeds and judge it against the deployed version's outcomes
    there (by the simulator, or by ``detector`` with an audit of its verdicts); promote it, or roll the learner and
    the actors back to the deployed weights (a new version)."""
    assert state.deployed is not None
    episodes = rollouts.collect(gate.seeds, "eval", sample_seed=gate.sample_seed)
    ran = score_held_out(episodes, gate.seeds, snapshot.version, detector)
    deployed_version, deployed_outcomes, deployed_weights = state.deployed
    decision = judge(np.array(ran.outcomes), np.array(deployed_outcomes), confidence=gate.confidence,
                     margin=gate.margin, iteration=state.iteration + 1, candidate_version=snapshot.version,
                     deployed_version=deployed_version)
    decision.judged_by = ran.judged_by
    if detector is not None:
        rng = np.random.default_rng([gate.sample_seed, state.iteration])  # the same sample in a resumed run
        checked, _ = audit(episodes, [ep.latest_label("detector") for ep in episodes], gate.audit, gate.bound, rng)
        if checked is not None:
            decision.audit = {"n": checked.n, "claimed": checked.claimed, "audited": checked.audited,
                              "gap": checked.gap, "gap_se": checked.gap_se, "alarm": checked.alarm}
            decision.promoted = decision.promoted and not checked.alarm
    state.gates.append(decision)
    row = decision.as_metrics()
    if decision.promoted:
        state.deployed, state.deployed_judged_by = (snapshot.version, ran.outcomes, snapshot.weights), ran.judged_by
        return snapshot, row
    learner.restore(deployed_weights)
    restored = learner.snapshot()
    rollouts.publish(restored)
    state.rollbacks.append({"iteration": state.iteration + 1, "from_version": snapshot.version,
                            "to_weights_of": deployed_version, "new_version": restored.version, "reason": "gate"})
    state.deployed = (restored.version, deployed_outcomes, deployed_weights)  # the same weights: the same outcomes
    row["gate/rollback_to"] = deployed_version
    return restored, row


def _remember_best(state: LoopState, ev: Evaluation, learner: Learner) -> None:
    if state.best is None or ev.success >= state.best[1]:
        state.best = (ev.version, ev.success, learner.snapshot().weights)


def _audit_and_recover(settings: AuditSettings, rng: np.random.Generator, state: LoopState, store: EpisodeStore,
                       detector: SuccessDetector, episodes: list[Episode], labels: list[Label], learner: Learner,
                       rollouts: Rollouts, eval_seeds: list[int], metrics: MetricsSink):
    """Audit this iteration's labels; on an alarm retrain the detector, relabel, audit again, and roll the policy
    back if it regressed. -> (detector, labels, whether the labels can be trusted, metrics row)."""
    result, record = audit(episodes, labels, settings.sample, settings.bound, rng)
    if result is None:
        return detector, labels, True, {}
    store.add_labels([(ep.id, lab) for ep, lab in record])
    state.audits.append(result)
    row = result.as_metrics()
    if not result.alarm:
        due = settings.retrain_every and (state.iteration + 1) % settings.retrain_every == 0
        if settings.retrain is not None and due:
            detector = _periodic_retrain(settings, state, detector, record, row)
        return detector, labels, True, row
    state.alarms += 1
    if settings.retrain is not None:
        detector = settings.retrain()  # on every trusted label in the store: the audited episodes are among them
        state.detector_versions.append(detector.version)
        labels = label_episodes(detector, episodes)  # appended: the first detector's labels stay on record
        store.add_labels([(ep.id, lab) for ep, lab in zip(episodes, labels)])
        position = {ep.id: i for i, ep in enumerate(episodes)}
        again, _ = audit([ep for ep, _ in record], [labels[position[ep.id]] for ep, _ in record], len(record),
                         settings.bound, np.random.default_rng(0))
        row.update({"audit/retrained_detector": len(state.detector_versions) - 1,
                     **({"audit/gap_after_retrain": again.gap} if again else {})})
        trusted = again is not None and not again.alarm
    else:
        trusted = False
    # Roll back if the policy regressed while the labels were wrong: the newest evaluation below the best one's
    # lower 95% bound.
    latest = state.evaluations[-1]
    if state.best is not None and latest.version != state.best[0] and latest.ci95[1] < state.best[1]:
        version, success, weights = state.best
        learner.restore(weights)
        state.rollbacks.append({"iteration": state.iteration + 1, "from_version": latest.version,
                                "to_weights_of": version, "new_version": learner.version, "reason": "audit"})
        row["audit/rollback_to"] = version
    return detector, labels, trusted, row


def _periodic_retrain(settings: AuditSettings, state: LoopState, detector: SuccessDetector,
                      record: list[tuple[Episode, Label]], row: dict[str, Any]) -> SuccessDetector:
    """Train a candidate on every trusted label but this iteration's audit, judge both detectors on that audit (the
    newest policy's episodes, which neither trained on), and keep the candidate only if its AUROC is no worse."""
    from sklearn.metrics import roc_auc_score

    audited = [ep for ep, _ in record]
    truth = np.array([lab.success for _, lab in record], bool)
    if truth.all() or not truth.any():
        return detector  # one class: nothing to compare on
    candidate = settings.retrain(exclude={ep.id for ep in audited})
    current_auroc = float(roc_auc_score(truth, detector.score(audited)))
    candidate_auroc = float(roc_auc_score(truth, candidate.score(audited)))
    promoted = candidate_auroc >= current_auroc
    state.promotions.append({"iteration": state.iteration + 1, "current": detector.version,
                             "candidate": candidate.version, "current_auroc": current_auroc,
                             "candidate_auroc": candidate_auroc, "promoted": promoted})
    row.update({"detector/candidate_auroc": candidate_auroc, "detector/current_auroc": current_auroc,
                "detector/promoted": int(promoted)})
    if promoted:
        state.detector_versions.append(candidate.version)
        return candidate
    return detector
