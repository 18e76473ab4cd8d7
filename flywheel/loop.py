"""The flywheel loop: collect -> store -> label -> audit -> update -> publish -> gate -> log, each phase timed.

Every part arrives through its contract (``flywheel.contracts``) and each phase is an object with one job
(``flywheel.collect``, ``flywheel.audit``, ``flywheel.update``, ``flywheel.gate``); ``run_loop`` only turns them.
The same function runs with in-process workers (tests, debugging) or Ray actors (real runs). Episodes are stored
the moment they come back, before anything else touches them, so a crash later in the iteration loses no completed
episode.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Collection

import numpy as np

from flywheel.audit import AuditSettings, Auditor
from flywheel.checkpoint import CheckpointDir
from flywheel.collect import Collector, Pace, PipelinedCollector, Practice
from flywheel.config import ConfigError
from flywheel.contracts import (CollectsAsync, Episode, Label, Learner, PolicySnapshot, ReportsUsage, Restarts,
                                Rollouts, SuccessDetector)
from flywheel.evaluation import evaluate, label_episodes
from flywheel.gate import Gatekeeper, GateSettings
from flywheel.metrics import MetricsSink, PhaseTimer
from flywheel.state import Budget, LoopState
from flywheel.store import EpisodeStore
from flywheel.update import Updater


@dataclasses.dataclass
class LoopParts:
    """What the loop turns. ``detector`` is the one labelling now: an audit's retrain replaces it."""

    rollouts: Rollouts
    store: EpisodeStore
    detector: SuccessDetector
    learner: Learner
    metrics: MetricsSink
    checkpoints: CheckpointDir


@dataclasses.dataclass
class LoopSettings:
    """How the loop turns.

    ``train_seed(i)``: the seed of practice layout ``i`` (never reused). ``group_size`` attempts at each layout, so
    that the learner can compare attempts. ``learner_reads``: the observation keys the policy reads (the learner sees
    no others). ``audit``/``gate``: None turns the phase off. ``eval_judge``: who scores evaluations and the gate,
    ``ground_truth`` (a simulator) or ``detector`` (the one labelling: a robot; the gate then audits it).
    ``overlap``: the actors collect the next iteration while this one is labelled and learned from (practice one
    version behind), and go on with up to ``keep_collecting`` iterations' more (``PipelinedCollector``).
    ``robust_seeds``: the robustness split's held-out seeds, evaluated at the start and the end in the scenes of the
    held-out randomisation (the rollouts' split "robust"); empty: none."""

    train_seed: Callable[[int], int]
    eval_seeds: list[int]
    episodes_per_iteration: int
    eval_every: int
    group_size: int = 1
    learner_reads: Collection[str] | None = None
    audit: AuditSettings | None = None
    gate: GateSettings | None = None
    eval_judge: str = "ground_truth"
    overlap: bool = False
    keep_collecting: float = 0.0
    robust_seeds: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.eval_judge not in ("ground_truth", "detector"):
            raise ConfigError(f"eval.judge={self.eval_judge}: choose ground_truth (the simulator's verdict) or "
                              f"detector")


@dataclasses.dataclass
class InFlight:
    """A resumed run's iteration in flight: its episodes stored before the crash, spanning ``layouts`` seed
    indices. The loop adopts them and collects only the attempts they lack."""

    episodes: list[Episode] = dataclasses.field(default_factory=list)
    layouts: int = 0


def run_loop(parts: LoopParts, settings: LoopSettings, state: LoopState, budget: Budget, *,
             in_flight: InFlight = InFlight(),
             on_iteration: Callable[[LoopState, dict[str, Any]], None] = lambda state, row: None,
             save_state: Callable[[LoopState], None] = lambda state: None) -> LoopState:
    """Turn the flywheel until the budget runs out; returns the final state (evaluations first to last).

    ``save_state(state)`` is called after each iteration, once its checkpoint is on disk (a resumable point);
    ``on_iteration(state, row)`` with each metrics row (the terminal's progress)."""
    p, s = parts, settings
    collector = _collector(p.rollouts, s, in_flight)
    auditor = Auditor(s.audit, p.store, p.learner)
    updater = Updater(p.learner, p.checkpoints, p.rollouts, s.learner_reads)
    gatekeeper = Gatekeeper(s.gate, p.rollouts, p.learner) if s.gate else None
    judge = lambda: p.detector if s.eval_judge == "detector" else None  # noqa: E731 (the one labelling now)
    pace = Pace(budget)
    _begin(p, s, state, auditor, gatekeeper, judge(), on_iteration)
    while pace.allows(state):
        started, timer = time.perf_counter(), PhaseTimer()
        with timer("collect"):
            practice = collector.collect(state)
        collector.look_ahead(state, pace, len(practice.episodes))  # the actors do not wait for what follows
        episodes = practice.episodes
        lag = p.learner.version - min((ep.policy_version for ep in episodes), default=p.learner.version)
        with timer("store"):
            for ep in practice.new:
                p.store.add(ep)
        with timer("label"):
            labels = _label(p, episodes)
        verdict_row, trusted, stats, gate_row = {}, True, {}, {}
        if auditor.on:
            with timer("audit"):
                verdict = auditor.check(state, p.detector, episodes, labels)
            p.detector, labels, trusted, verdict_row = verdict.detector, verdict.labels, verdict.trusted, verdict.row
        if gatekeeper and gatekeeper.needs_rejudging(state, judge()):
            with timer("gate"):  # a new detector: the deployed version's gate outcomes judged again, by it
                gatekeeper.rejudge(state, judge())
        if trusted:
            with timer("update"):
                stats = updater.update(state, episodes)
        else:
            state.paused_updates += 1  # labels not to be trusted: no update from them
        with timer("publish"):
            snapshot, published, sync_row = _publish(p.learner, p.rollouts)
        if published and gatekeeper and gatekeeper.due(state):
            with timer("gate"):
                snapshot, gate_row = gatekeeper.decide(state, snapshot, judge())
        if published:
            with timer("checkpoint"):
                _checkpoint(p.checkpoints, snapshot, p.learner, state)
        state.iteration += 1
        state.episodes += len(episodes)
        state.env_steps += sum(ep.num_steps for ep in episodes)
        row = iteration_row(state, practice, labels, snapshot, p.rollouts, lag,
                            {**{f"learner/{k}": v for k, v in stats.items()}, **verdict_row, **gate_row, **sync_row})
        _log_clips(p.metrics, state, episodes, labels, s.eval_every)
        if state.iteration % s.eval_every == 0 and state.evaluations[-1].version != snapshot.version:
            with timer("evaluate"):
                _evaluate(p, s, state, snapshot.version, auditor, judge())
            row.update(state.evaluations[-1].as_metrics())
        _log_time(row, timer, started, practice.busy)
        save_state(state)
        p.metrics.log(row, step=state.iteration)
        on_iteration(state, row)
        _keep_pace(pace, timer, started, s)
    for ep in collector.finish():  # collected while the budget ran out: stored, for a resumed run to learn from
        p.store.add(ep)
    if state.evaluations[-1].version != p.learner.version:
        _evaluate(p, s, state, p.learner.version, None, judge())
        p.metrics.log(state.evaluations[-1].as_metrics(), step=state.iteration)
        on_iteration(state, state.evaluations[-1].as_metrics())
    _evaluate_robust(p, s, state, judge())
    return state


def _collector(rollouts: Rollouts, s: LoopSettings, in_flight: InFlight) -> Collector:
    args = (rollouts, s.train_seed, s.episodes_per_iteration, s.group_size, in_flight.episodes, in_flight.layouts)
    if s.overlap and isinstance(rollouts, CollectsAsync):
        return PipelinedCollector(*args, keep_collecting=s.keep_collecting)
    return Collector(*args)


def _begin(p: LoopParts, s: LoopSettings, state: LoopState, auditor: Auditor, gatekeeper: Gatekeeper | None,
           judge: SuccessDetector | None, on_iteration: Callable) -> None:
    """Where a new run starts from: the starting policy's evaluation and its outcomes on the gate's seeds."""
    if not state.detector_versions:
        state.detector_versions.append(p.detector.version)
    if not state.evaluations:
        _evaluate(p, s, state, p.learner.version, auditor, judge)
        p.metrics.log(state.evaluations[-1].as_metrics(), step=0)
        on_iteration(state, state.evaluations[-1].as_metrics())
    if not state.robust:  # (a resumed run had its start's)
        _evaluate_robust(p, s, state, judge)
    if gatekeeper:
        gatekeeper.start(state, judge)


def _label(p: LoopParts, episodes: list[Episode]) -> list[Label]:
    """The frozen detector's verdict on every episode, appended to the store."""
    labels = label_episodes(p.detector, episodes)
    p.store.add_labels([(ep.id, lab) for ep, lab in zip(episodes, labels)])
    return labels


def _publish(learner: Learner, rollouts: Rollouts) -> tuple[PolicySnapshot, bool, dict[str, float]]:
    """The learner's newest version to every actor, if it is newer than what they hold -> (the snapshot, whether it
    was sent, what sending it cost)."""
    snapshot = learner.snapshot()
    if snapshot.version <= rollouts.published_version:
        return snapshot, False, {}
    rollouts.publish(snapshot)
    cost = rollouts.last_sync if isinstance(rollouts, ReportsUsage) else {}
    return snapshot, True, {f"sync/{k}": v for k, v in cost.items()}


def _checkpoint(checkpoints: CheckpointDir, snapshot: PolicySnapshot, learner: Learner, state: LoopState) -> None:
    checkpoints.save(snapshot.version, snapshot.weights,
                     {"version": snapshot.version, **snapshot.meta, "sampling": snapshot.sampling.as_dict()},
                     state=learner.training_state(), keep_also=state.protected_versions())


def _evaluate(p: LoopParts, s: LoopSettings, state: LoopState, version: int, auditor: Auditor | None,
              judge: SuccessDetector | None) -> None:
    """Held-out success of ``version`` (the same seeds every time); the auditor keeps the best weights."""
    state.evaluations.append(evaluate(p.rollouts, s.eval_seeds, version, detector=judge))
    if auditor is not None:
        auditor.remember(state, state.evaluations[-1])


def _evaluate_robust(p: LoopParts, s: LoopSettings, state: LoopState, judge: SuccessDetector | None) -> None:
    """The robustness split of the policy the actors hold, unless it has one: the same version's success in the
    scenes of the held-out randomisation, beside its nominal evaluation (wandb's eval_robust/*)."""
    version = p.learner.version
    if not s.robust_seeds or (state.robust and state.robust[-1].version == version):
        return
    state.robust.append(evaluate(p.rollouts, s.robust_seeds, version, detector=judge, split="robust"))
    p.metrics.log(state.robust[-1].as_metrics("eval_robust"), step=state.iteration)


def iteration_row(state: LoopState, practice: Practice, labels: list[Label], snapshot: PolicySnapshot,
                  rollouts: Rollouts, lag: int, phases: dict[str, Any]) -> dict[str, Any]:
    """The iteration's metrics row (before evaluation and timings): what was practised and how it was judged."""
    episodes = practice.episodes
    return {
        "iteration": state.iteration,
        "policy_version": snapshot.version,
        "episodes": state.episodes,
        "env_steps": state.env_steps,
        # Claimed (detector) against true (simulator) success of the collected episodes: the gap is what an audit
        # watches. The learner never saw the second number.
        "train/claimed_success": float(np.mean([lab.success for lab in labels])),
        **true_success(episodes),
        **safety_counts(episodes),
        **phases,
        "rollout/faults": len(rollouts.faults) if isinstance(rollouts, Restarts) else 0,  # actors replaced, lost
        # the share of practice a person took over and finished (the learner does not credit the policy with it)
        "rollout/corrected": float(np.mean([ep.intervened().any() for ep in episodes])) if episodes else 0.0,
        # a coach's words (rollout.coaching): the share of practice it spoke in, and what it said an episode
        "rollout/coached": float(np.mean([ep.coached().any() for ep in episodes])) if episodes else 0.0,
        "rollout/coach_words": float(np.mean([len(ep.info.get("coaching", ())) for ep in episodes])) if episodes
        else 0.0,
        # how many versions behind the learner the practice it learned from was (0: synchronous)
        "rollout/lag_versions": lag,
        # practice beyond episodes_per_iteration: what the actors collected while the learner trained
        "rollout/kept_collecting": practice.beyond,
    }


def true_success(episodes: list[Episode]) -> dict[str, float]:
    """The simulator's success of the practice episodes that have one (a robot's: those a person judged), and
    (``train/true_success_unaided``) of those among them that no person took over or coached: the policy's own."""
    known = [ep for ep in episodes if ep.ground_truth and "success" in ep.ground_truth]
    unaided = [ep for ep in known if not ep.intervened().any() and not ep.coached().any()]
    rate = lambda eps: float(np.mean([bool(ep.ground_truth["success"]) for ep in eps]))  # noqa: E731
    return {**({"train/true_success": rate(known)} if known else {}),
            **({"train/true_success_unaided": rate(unaided)} if unaided else {})}


def safety_counts(episodes: list[Episode]) -> dict[str, float]:
    """A robot's safety layer over the practice (none for a simulator): the share of episodes cut short, and how
    many times each event happened (actors/robot.py)."""
    records = [ep.info["safety"] for ep in episodes if "safety" in ep.info]
    if not records:
        return {}
    counts: dict[str, float] = {}
    for r in records:
        for event, n in r.get("counts", {}).items():
            counts[f"robot/{event}"] = counts.get(f"robot/{event}", 0.0) + n
    return {"robot/cut_short": float(np.mean([bool(ep.info.get("cut_short")) for ep in episodes])), **counts,
            "robot/tick_error_p99_ms": 1000.0 * max(r.get("tick_error_p99_s", 0.0) for r in records)}


def _log_clips(metrics: MetricsSink, state: LoopState, episodes: list[Episode], labels: list[Label],
               eval_every: int) -> None:
    """What practice looked like: one judged success and one judged failure, at every evaluation."""
    if state.iteration % eval_every == 0 or state.iteration == 1:
        judged = {lab.success: ep for ep, lab in zip(episodes, labels) if "image" in ep.observations}
        metrics.log_clips([(f"v{ep.policy_version}-judged-{'success' if ok else 'failure'}",
                            ep.observations["image"]) for ok, ep in sorted(judged.items())], state.iteration)


def _log_time(row: dict[str, Any], timer: PhaseTimer, started: float, busy: float | None) -> None:
    """Each phase's seconds, and the pipeline: the share of the iteration the learner's side waited for practice,
    and the share of the actors' time they worked (the rest they waited for the next collection and its weights)."""
    row.update(timer.as_metrics())
    row["time/learner_wait_fraction"] = timer.seconds["collect"] / max(
        1e-9, time.perf_counter() - started - timer.seconds.get("evaluate", 0.0))
    if busy is not None:
        row["rollout/busy_fraction"] = busy


def _keep_pace(pace: Pace, timer: PhaseTimer, started: float, s: LoopSettings) -> None:
    """How long the next iteration and the final evaluation will take, from this one's times."""
    pace.iteration_s = time.perf_counter() - started - timer.seconds.get("evaluate", 0.0)
    final = 1 + len(s.robust_seeds) / max(1, len(s.eval_seeds))  # the end's evaluations: nominal and robust
    if "evaluate" in timer.seconds:
        pace.eval_s = timer.seconds["evaluate"] * final
    elif pace.eval_s == 0.0:
        pace.eval_s = timer.seconds["collect"] * (len(s.eval_seeds) + len(s.robust_seeds)) / max(
            1, s.episodes_per_iteration)
