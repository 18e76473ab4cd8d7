"""``flywheel run``: build the parts, resume, turn the loop, summarise; everything lands in ``run_dir``.

    run_dir/config.yaml          the resolved config
    run_dir/episodes/            the episode store (detector data and every collected episode, with labels)
    run_dir/detector/            the detector checkpoint and its held-out metrics
    run_dir/checkpoints/         policy snapshots (safetensors + metadata), newest K kept
    run_dir/metrics.jsonl        every logged figure (wandb mirrors it under run_dir/wandb)
    run_dir/summary.json         the outcome: status, before/after success, detector quality, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from actors.ray_actors import RolloutGroup
from actors.tabletop import split_seed
from flywheel.audit import AuditSettings
from flywheel.checkpoint import CheckpointDir, CheckpointError
from flywheel.cluster import check_resources, start_ray, start_remote_learner
from flywheel.config import ConfigError, to_dict
from flywheel.contracts import Closes, Learner, PolicyBundle, Restarts, observation_keys
from flywheel.detectors import DetectorContext
from flywheel.gate import GateSettings
from flywheel.loop import InFlight, LoopParts, LoopSettings, run_loop
from flywheel.metrics import MetricsSink
from flywheel.parts import (GATE_SEEDS, ROBUST_SEEDS, build_learner, check_env, choose_detector, detector_sources,
                            env_kwargs_of, held_out_randomize, loop_seed, loop_seed_index, make_rollouts,
                            policy_bundle, resolve)
from flywheel.resume import RunDirError, check_unchanged, holds_a_run, loop_episodes, read_state, write_state  # noqa: F401
from flywheel.state import Budget, LoopState
from flywheel.store import EpisodeStore, atomic_write_bytes
from flywheel.update import learner_view


@dataclasses.dataclass
class Attempt:
    """This attempt at the run: its number, when it started, and the seconds earlier attempts spent (the budget is
    the run's, not each attempt's)."""

    number: int
    started: float
    spent: float


@dataclasses.dataclass
class Wiring:
    """The parts a run built, so that the run closes what it started whatever happens."""

    bundle: PolicyBundle
    rollouts: RolloutGroup
    learner: Learner | None  # started once the actors are (start_learner)
    checkpoints: CheckpointDir
    store: EpisodeStore
    reads: set[str]  # the observation keys the policy reads (the learner's replay keeps no others)


def run(cfg: DictConfig, say: Callable[[str], None] = print, on_iteration=None) -> dict[str, Any]:
    """Run the flywheel for its budget; returns (and writes) the summary. On a run_dir that holds a run, resume it
    (flywheel/resume.py): ``cfg`` must then be its recorded config, changed only where RESUMABLE allows."""
    started, run_dir = time.time(), Path(cfg.run_dir)
    resuming = holds_a_run(run_dir)
    if resuming:
        check_unchanged(cfg, run_dir)
    check_choices(cfg)  # before anything starts, not after the detector has trained
    saved = read_state(run_dir) if resuming else None
    summary = open_run(cfg, run_dir, resuming, saved)
    metrics = MetricsSink(run_dir, to_dict(cfg), mode=cfg.wandb.mode, project=cfg.wandb.project)
    wiring, ray_started = None, False
    attempt = Attempt(summary["attempt"], started, (saved or {}).get("elapsed_s", 0.0))
    try:
        bundle = load_policy(cfg, say)
        ray_started = cfg.rollout.use_ray and join_ray(cfg, say)
        wiring = build(cfg, bundle, run_dir)
        wiring.learner = start_learner(cfg, wiring, run_dir, say, summary)
        summary["rollout_workers"] = wiring.rollouts.placement()  # asked only now: the actors started meanwhile
        resumed = resume(wiring, cfg, saved, resuming, attempt.number, say)
        ctx = DetectorContext(cfg, run_dir, wiring.store, resuming, list(resumed[0].detector_versions),
                              detector_sources(cfg, lambda: wiring.rollouts, bundle), say,
                              log=lambda row: metrics.log(row, step=0))
        detector = choose_detector(ctx)
        summary["detector"] = {"version": detector.version, **ctx.metrics}
        settings = loop_settings(cfg, ctx, wiring.reads)
        state, budget = turn(cfg, wiring, LoopParts(wiring.rollouts, wiring.store, detector, wiring.learner, metrics,
                                                    wiring.checkpoints), settings, resumed, attempt, say, on_iteration)
        summary.update(summarise(cfg, state, wiring, budget, settings.audit))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM outside the loop (flywheel/cli.py), or either twice
        summary.update(status="interrupted", stop_reason=str(e) or "SIGINT")
        say(f"run: interrupted ({summary['stop_reason']}); {run_dir} keeps everything stored so far (episodes, "
            f"checkpoints, the detector's training so far). To go on from there: flywheel run run_dir={run_dir}")
        raise
    except BaseException as e:
        summary["status"] = "failed"
        summary["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        summary["wall_seconds"] = (saved or {}).get("elapsed_s", 0.0) + time.time() - started
        atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        metrics.close(summary)
        close(wiring, ray_started, summary["status"], say)
    return summary


def check_choices(cfg: DictConfig) -> None:
    """The plug-ins the config names exist, and the environment can be made, before anything is written."""
    resolve("learner", "learner.algorithm", cfg.learner.algorithm)
    resolve("policy", "policy.name", cfg.policy.name)
    resolve("detector", "detector.name", cfg.detector.name)
    check_env(env_kwargs_of(cfg))
    if cfg.rollout.group_size > 1 and cfg.learner.get("practice_noise", 1) == 0:
        raise ConfigError(f"rollout.group_size={cfg.rollout.group_size} with learner.practice_noise=0: the attempts at "
                          f"a layout would all be the same, so none could be compared with another; give "
                          f"rollout.group_size=1, or learner.practice_noise > 0 (e.g. 1: practise by sampling)")
    if cfg.rollout.group_size < 2 and cfg.learner.get("advantage") == "group":
        raise ConfigError(f"rollout.group_size={cfg.rollout.group_size} with learner.advantage=group: GRPO credits an "
                          f"attempt against the other attempts at its layout, so with one attempt no episode would teach "
                          f"anything; give rollout.group_size=4 (or 0, the learner's choice), or learner.advantage=gae")


def open_run(cfg: DictConfig, run_dir: Path, resuming: bool, saved: dict | None) -> dict[str, Any]:
    """The run directory with its resolved config, the process seeded, and the summary started: which attempt this
    is, with what the attempt before said (kept: nothing is lost)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    seed_everything(cfg.seed)
    # every core, unless OMP_NUM_THREADS says otherwise (torch read it at start): on cores another job is busy on,
    # torch's threads spin against it (a test measured 5-25x slower at 2 threads than at 1 on a shared 2-core machine)
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    previous = None
    if resuming and (run_dir / "summary.json").exists():
        with contextlib.suppress(json.JSONDecodeError):
            previous = json.loads((run_dir / "summary.json").read_text())
    # (an attempt stopped before its loop began saved no state, but its summary counts it)
    attempt = max((saved or {}).get("attempt", 0), (previous or {}).get("attempt", 0)) + 1 if resuming else 1
    return {"status": "running", "run_dir": str(run_dir.resolve()), "experiment": cfg.experiment, "attempt": attempt,
            **({"previous_attempt": previous} if previous else {})}


def join_ray(cfg: DictConfig, say: Callable[[str], None]) -> bool:
    """Start or join Ray unless this process already has; True if the run did (and leaves it at the end)."""
    import ray

    started = not ray.is_initialized()
    if started:
        start_ray(cfg, say)
    check_resources(cfg.rollout.resources, ray.cluster_resources())
    return started


def load_policy(cfg: DictConfig, say: Callable[[str], None]) -> PolicyBundle:
    """The starting policy, checked against the sensors the environments record."""
    bundle = policy_bundle(cfg)
    say(f"policy: {cfg.policy.name} {cfg.policy.checkpoint} ({bundle.meta.get('description', 'no description')})")
    note = eval_noise_note(bundle.meta, cfg.eval.noise)
    if note:
        say(note)
    missing = [s for s in bundle.sensors if s not in cfg.env.sensors]
    if missing:
        raise ConfigError(f"the policy reads sensors {list(bundle.sensors)} but env.sensors={list(cfg.env.sensors)} "
                          f"lacks {missing}: add them, e.g. env.sensors=[{','.join(bundle.sensors)}]")
    if cfg.rollout.coaching > 0 and not getattr(bundle.make_actor(), "names_subtasks", False):
        raise ConfigError(f"rollout.coaching={cfg.rollout.coaching}: a coach corrects the subtask a policy names "
                          f"before it acts, and {cfg.policy.checkpoint} names none. Start from a checkpoint with a "
                          f"subtask head (flywheel pretrain subtask_head=true init=...), or set rollout.coaching=0")
    return bundle


def build(cfg: DictConfig, bundle: PolicyBundle, run_dir: Path) -> Wiring:
    """The actors and where the run keeps what it makes; the learner comes next (``start_learner``)."""
    rollouts = make_rollouts(cfg, bundle)
    checkpoints = CheckpointDir(run_dir / "checkpoints", keep=3, meta={
        **bundle.record, "description": f"{cfg.learner.algorithm} in {run_dir.name}, from {cfg.policy.checkpoint}",
        "eval_noise": cfg.eval.noise,  # how its held-out figures were measured
        **({"config": bundle.meta["config"]} if "config" in bundle.meta else {})})
    return Wiring(bundle, rollouts, None, checkpoints, EpisodeStore(run_dir / "episodes"),
                  observation_keys(bundle.sensors))


def start_learner(cfg: DictConfig, w: Wiring, run_dir: Path, say: Callable[[str], None],
                  summary: dict[str, Any]) -> Learner:
    """The learner at version 0 (the starting policy as its algorithm acts with it), in this process or as a Ray
    actor of its own (``placement.remote``), put back where the run was if that actor's process dies."""
    factory = functools.partial(build_learner, to_dict(cfg.learner), cfg.seed, w.bundle,
                                {**env_kwargs_of(cfg), "sensors": list(w.bundle.sensors)})
    if not cfg.placement.remote:
        return factory(cfg.placement.device)
    learner = start_remote_learner(cfg, factory, lambda new: put_back(new, cfg, w, run_dir, say))
    summary["learner"] = learner.placement
    return learner


def resume(w: Wiring, cfg: DictConfig, saved: dict | None, resuming: bool, attempt: int, say: Callable[[str], None]
           ) -> tuple[LoopState, list]:
    """Where the run stands: a new run's state, or a resumed one's (the learner restored from its checkpoint, its
    replay refilled, the iteration in flight's stored episodes to adopt); version 0 or the restored one published."""
    state, in_flight = LoopState(), []
    if saved is not None:
        state = restore_learner_and_state(w.learner, w.checkpoints, saved, Path(cfg.run_dir))
    if resuming:
        learned, in_flight = refill_learner(w.learner, cfg, w.store, state.next_train_index, w.reads)
        say(f"run: resuming {cfg.run_dir} (attempt {attempt}) at iteration {state.iteration}, policy "
            f"v{w.learner.version}: the "
            f"learner's buffer refilled from {learned} stored episodes; {len(in_flight)} episodes of the iteration in "
            f"flight are used, the rest collected")
    first = w.learner.snapshot()
    w.rollouts.publish(dataclasses.replace(first, meta={**first.meta, "source": cfg.policy.checkpoint}))
    if saved is None:  # every version the loop may return to has a checkpoint, the starting one too
        w.checkpoints.save(first.version, first.weights, {"version": first.version, **first.meta,
                                                          "sampling": first.sampling.as_dict()},
                           state=w.learner.training_state())
    return state, in_flight


def audit_settings(cfg: DictConfig, ctx: DetectorContext) -> AuditSettings:
    return AuditSettings(sample=cfg.audit.sample if ctx.audited else 0, bound=cfg.audit.bound, seed=cfg.seed,
                         retrain_every=cfg.audit.retrain_every if ctx.retrain else 0,
                         retrain=ctx.retrain if cfg.audit.retrain or cfg.audit.retrain_every else None)


def loop_settings(cfg: DictConfig, ctx: DetectorContext, reads: set[str]) -> LoopSettings:
    gate = GateSettings([split_seed("eval", GATE_SEEDS + i) for i in range(cfg.gate.episodes)], every=cfg.gate.every,
                        confidence=cfg.gate.confidence, margin=cfg.gate.margin, audit=cfg.gate.audit,
                        bound=cfg.audit.bound) if cfg.gate.episodes else None
    return LoopSettings(train_seed=loop_seed, eval_seeds=[split_seed("eval", i) for i in range(cfg.eval.episodes)],
                        episodes_per_iteration=cfg.rollout.episodes_per_iteration, eval_every=cfg.eval.every,
                        group_size=cfg.rollout.group_size, learner_reads=reads, audit=audit_settings(cfg, ctx),
                        gate=gate, eval_judge=cfg.eval.judge, overlap=cfg.rollout.overlap and cfg.rollout.use_ray,
                        keep_collecting=cfg.rollout.keep_collecting,
                        robust_seeds=[split_seed("eval", ROBUST_SEEDS + i) for i in range(cfg.eval.robust_episodes)]
                        if held_out_randomize(cfg) else [])


def turn(cfg: DictConfig, w: Wiring, parts: LoopParts, settings: LoopSettings, resumed: tuple[LoopState, list],
         attempt: Attempt, say: Callable[[str], None], on_iteration) -> tuple[LoopState, Budget]:
    """The loop, for the run's budget (what earlier attempts spent counts), its state saved after each iteration."""
    state, in_flight = resumed
    budget = Budget(attempt.started + cfg.budget.minutes * 60 - attempt.spent, cfg.budget.iterations,
                    cfg.budget.env_steps, cfg.budget.episodes)

    def save_state(s: LoopState) -> None:
        write_state(Path(cfg.run_dir), {"loop": s.to_json(), "policy_version": w.learner.version,
                                        "attempt": attempt.number, "written": time.time(),
                                        "elapsed_s": attempt.spent + time.time() - attempt.started})

    layouts = max((loop_seed_index(ep.seed) + 1 - state.next_train_index for ep in in_flight), default=0)
    with graceful_stop(budget, say):
        state = run_loop(parts, settings, state, budget, in_flight=InFlight(in_flight, layouts),
                         save_state=save_state, on_iteration=on_iteration or (lambda s, row: None))
    return state, budget


def summarise(cfg: DictConfig, state: LoopState, w: Wiring, budget: Budget, audit: AuditSettings) -> dict[str, Any]:
    """What summary.json says of the loop: the outcome, every evaluation, the audit, the gate and the faults."""
    first, last = state.evaluations[0], state.evaluations[-1]
    return dict(
        status="stopped" if budget.stop_requested else "completed",
        **({"stop_reason": budget.stop_requested} if budget.stop_requested else {}),
        episodes=state.episodes, env_steps=state.env_steps, iterations=state.iteration,
        policy_version_final=w.learner.version,
        initial_success=first.success, initial_ci95=list(first.ci95),
        final_success=last.success, final_ci95=list(last.ci95), eval_episodes=last.episodes,
        final_outcomes=last.outcomes_text,  # 1/0 per held-out seed, in seed order (empty if the run kept none)
        evaluations=[{"version": e.version, "success": e.success, "ci95": list(e.ci95), "episodes": e.episodes,
                      "per_task": e.per_task, "judged_by": e.judged_by} for e in state.evaluations],
        audit=audit.as_summary(state),
        gate={"episodes": cfg.gate.episodes, "confidence": cfg.gate.confidence, "margin": cfg.gate.margin,
              "judge": cfg.eval.judge, "audit": cfg.gate.audit if cfg.eval.judge == "detector" else 0,
              "decisions": [dataclasses.asdict(g) for g in state.gates],
              "held_back": sum(not g.promoted for g in state.gates)},
        robustness=robustness(cfg, state),
        rollbacks=state.rollbacks,
        faults={"restarts": w.rollouts.restarts, "events": w.rollouts.faults,
                **({"learner_restarts": w.learner.restarts, "learner_events": w.learner.faults}
                   if isinstance(w.learner, Restarts) else {"learner_restarts": 0, "learner_events": []})},
        learner_recoveries=state.recoveries,
    )


def robustness(cfg: DictConfig, state: LoopState) -> dict[str, Any]:
    """The robustness split in summary.json: success in the nominal scene and under the held-out randomisation, at
    the start and the end, each with its interval (``measured`` false, and why, where the split was off)."""
    randomize = held_out_randomize(cfg)
    if not state.robust:
        return {"measured": False, "why": "eval.robust_episodes=0" if cfg.eval.robust_episodes <= 0 else
                f"env.name={cfg.env.name} takes no randomize" if randomize is None else "not evaluated yet"}
    fig = lambda e: {"version": e.version, "success": e.success, "ci95": list(e.ci95)}  # noqa: E731
    nominal = {e.version: e for e in state.evaluations}
    first, last = state.robust[0], state.robust[-1]
    # the randomised figures keep their per-seed outcomes, so that two runs compare seed by seed (a paired test)
    return {"measured": True, "randomize": randomize, "episodes": last.episodes,
            "nominal_episodes": state.evaluations[-1].episodes,
            "initial": {"nominal": fig(nominal.get(first.version, state.evaluations[0])),
                        "randomized": {**fig(first), "outcomes": first.outcomes_text}},
            "final": {"nominal": fig(nominal.get(last.version, state.evaluations[-1])),
                      "randomized": {**fig(last), "outcomes": last.outcomes_text}}}


def close(w: Wiring | None, ray_started: bool, status: str, say: Callable[[str], None]) -> None:
    if w is not None:
        w.rollouts.close()
        if isinstance(w.learner, Closes):
            w.learner.close()
    if ray_started:
        import ray

        if status == "interrupted":  # after SIGTERM to the whole job, Ray's own processes are going too, and
            say("ray: shutting down (it can take ~10 s)")  # ray.shutdown waits on them
        ray.shutdown()


def eval_noise_note(base_meta: dict, eval_noise: float | None) -> str | None:
    """A line for a run whose policy checkpoint was evaluated (by the run that wrote it) with another ``eval.noise``:
    its held-out figures and this run's starting one then measure different policies' behaviour. None if alike, or
    if the checkpoint does not say (the shipped base)."""
    if "eval_noise" not in base_meta or base_meta["eval_noise"] == eval_noise:
        return None
    was = "null" if base_meta["eval_noise"] is None else f"{base_meta['eval_noise']:g}"
    now = "null" if eval_noise is None else f"{eval_noise:g}"
    return (f"policy: the run that wrote it evaluated with eval.noise={was}, this one with eval.noise={now}: their "
            f"held-out figures are not comparable (give eval.noise={was} to compare)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def graceful_stop(budget: Budget, say: Callable[[str], None]):
    """While the loop turns, SIGTERM or SIGINT (a scheduler ending the job, Ctrl-C) asks it to stop: the iteration
    in flight finishes (its episodes stored, its update checkpointed), the policy gets its final evaluation, and
    summary.json says status "stopped". A second signal stops at once, as without this. Only in the main thread
    (where Python delivers signals); elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, frame):
        name = signal.Signals(signum).name
        if budget.stop_requested:  # the second time: stop now
            raise KeyboardInterrupt(f"{name} again: stopping at once")
        budget.stop_requested = name
        say(f"run: {name} received: finishing this iteration, then the final evaluation and summary "
            f"(send it again to stop at once)")

    previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def restore_learner_and_state(learner, checkpoints: CheckpointDir, saved: dict[str, Any], run_dir: Path) -> LoopState:
    """The learner as the last resumable point left it (policy weights, optimizer, generators), and the loop's
    state. A damaged checkpoint is a CheckpointError that says how to go on from an earlier one."""
    version = int(saved["policy_version"])
    try:
        weights, _, training = checkpoints.load(version, with_state=True)
        state = LoopState.from_json(saved["loop"], weights_of=lambda v: checkpoints.load(v)[0])
    except CheckpointError as e:
        good = checkpoints.latest_good()
        hint = (f"start a new run from the newest good one: flywheel run run_dir=NEW "
                f"policy.checkpoint={checkpoints.path(good[0])}" if good else "start a new run_dir")
        raise CheckpointError(f"{run_dir} cannot be resumed: {e}. Its episodes are intact; {hint}") from e
    learner.resume_from(weights, training)
    return state


def refill_learner(learner, cfg: DictConfig, store: EpisodeStore, next_index: int, reads) -> tuple[int, list]:
    """Put the practice episodes the learner had learned from (seed indices below ``next_index``; the newest
    2 x learner.max_episodes) back in its replay buffer. -> (how many, the iteration in flight's stored episodes)."""
    learned, in_flight = loop_episodes(store, loop_seed_index, next_index,
                                      keep=2 * cfg.learner.get("max_episodes", 4000))
    learner.refill([learner_view(ep, reads) for ep in learned if ep.latest_label("detector") is not None])
    return len(learned), in_flight


def put_back(learner, cfg: DictConfig, w: Wiring, run_dir: Path, say: Callable[[str], None]) -> None:
    """A restarted learner actor, put back where the run was: the deployed version's checkpoint (weights, optimizer,
    generators) and the replay buffer of every iteration that had ended."""
    version = w.rollouts.published_version
    weights, _, training = w.checkpoints.load(version, with_state=True)
    learner.resume_from(weights, training)
    saved = read_state(run_dir)
    count, _ = refill_learner(learner, cfg, w.store, saved["loop"]["next_train_index"] if saved else 0, w.reads)
    say(f"learner: lost, restarted on {learner.placement['host']} at v{version} with {count} episodes refilled")
