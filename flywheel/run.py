"""``flywheel run``: wire the parts from the config and turn the loop; everything lands in ``run_dir``.

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

from actors.ray_actors import RolloutGroup, vla_policy_factory
from actors.rollout import make_env, run_episodes
from actors.expert import HARD_EXAMPLES
from actors.tabletop import split_seed
from flywheel.checkpoint import CheckpointDir, CheckpointError, save_weights
from flywheel.config import ConfigError, to_dict
from flywheel.contracts import Episode, Label, PolicySnapshot, observation_keys, sensor_key
from flywheel.audit import AuditSettings
from flywheel.gate import GateSettings
from flywheel.loop import InFlight, LoopParts, LoopSettings, run_loop
from flywheel.state import Budget, LoopState
from flywheel.update import learner_view
from flywheel.metrics import MetricsSink
from flywheel.resume import (RunDirError, check_unchanged, holds_a_run, loop_episodes, read_state,  # noqa: F401
                             write_state)
from flywheel.store import EpisodeStore, atomic_write_bytes
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import SmallVLA
from learner.registry import ALGORITHMS, accepted_options, make_learner
from reward.detector import DetectorNetConfig
from reward.ground_truth import GroundTruthJudge
from reward.report import latest_detector, load_detector
from reward.train import train_detector

# Where each use of the training split draws its seeds, so that no two uses share a layout.
DEMO_SEEDS = 0  # pretraining demonstrations (the learner replays the same ones)
DETECTOR_DEMO_SEEDS = 2_000_000
DETECTOR_POLICY_SEEDS = 3_000_000
DETECTOR_HARD_SEEDS = 4_000_000  # + 100,000 per kind of hard example
LOOP_SEEDS = 5_000_000
GATE_SEEDS = 1_000_000  # in the eval split, after the reported evaluation's: the promotion gate's own layouts


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


def loop_seed(index: int) -> int:
    return split_seed("train", LOOP_SEEDS + index)


def loop_seed_index(seed: int) -> int | None:
    """The practice episode index of a training seed (None for a seed of any other use)."""
    index = seed - loop_seed(0)
    return index if 0 <= index < split_seed("eval", 0) - loop_seed(0) else None


def write_demos(cfg: DictConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """``flywheel demos``: the scripted expert's episodes, labelled by the simulator, appended to ``cfg.out_dir``.

    Seeds already in the store are skipped, so running it again (or after an interruption) adds only what is
    missing."""
    store = EpisodeStore(Path(cfg.out_dir))
    have = {ep.seed for ep in store.iter(cfg.split)}
    seeds = [s for s in (split_seed(cfg.split, cfg.first + i) for i in range(cfg.episodes)) if s not in have]
    episodes = ground_truth_labelled(run_episodes(seeds, cfg.split, None, policy_version=-1,
                                                  expert_noise=cfg.noise, operators=list(cfg.operators),
                                                  **env_kwargs_of(cfg)))
    for ep in episodes:
        store.add(ep)
    done = {"written": len(episodes), "already_there": cfg.episodes - len(seeds), "store": str(cfg.out_dir),
            "success": float(np.mean([ep.ground_truth["success"] for ep in episodes])) if episodes else None,
            "per_family": {f: sum(ep.task == f for ep in episodes) for f in sorted({ep.task for ep in episodes})}}
    say(f"demos: {done}")
    return done


def pretraining_demos(n: int, base_meta: dict, env_kwargs: dict) -> list[Episode]:
    """The demonstrations the base was pretrained on (the first ``n``), for the learner to replay.

    They are remade from the environment settings the base's record names (its family, phrasing and combinations),
    not the run's: a run on held-out combinations must not hand the learner expert demonstrations of them, or a gain
    would come from those demonstrations rather than from practice. Without a record, the run's settings serve."""
    made_with = base_meta.get("config") or {}
    recorded = made_with.get("env") or {}
    demo_env = {**env_kwargs, **{k: recorded[k] for k in ("family", "phrasing", "combos") if k in recorded}}
    seeds = [split_seed("train", DEMO_SEEDS + i) for i in range(n)]
    return run_episodes(seeds, "train", None, policy_version=-1, operators=list(made_with.get("operators") or
                                                                                  ["standard"]), **demo_env)


def ground_truth_labelled(episodes: list[Episode]) -> list[Episode]:
    """Each episode labelled with the environment's own verdict: how the run makes a detector's training data."""
    unjudged = sum(not ep.ground_truth or "success" not in ep.ground_truth for ep in episodes)
    if unjudged:
        raise ConfigError(
            f"{unjudged} of {len(episodes)} episodes made to train the detector came back without a success verdict "
            f"(the environment's info['success']): an environment that cannot judge itself, such as a robot, needs a "
            f"detector trained before (flywheel reward train, on labelled episodes), given as detector.checkpoint=PATH, "
            f"and eval.judge=detector")
    for ep in episodes:
        source = "demo" if ep.policy_version < 0 and not ep.made_on_purpose() else "ground_truth"
        ep.labels.append(Label(source=source, success=bool(ep.ground_truth["success"]), version="simulator"))
    return episodes


def make_detector_data(cfg: DictConfig, rollouts: RolloutGroup, env_kwargs: dict) -> list[Episode]:
    """Scripted demonstrations, hard examples made on purpose (the expert putting the block just outside or just
    inside success, or holding it over the target; actors/expert.py) and starting-policy rollouts, labelled with the
    simulator's success."""
    policy_seeds = [split_seed("train", DETECTOR_POLICY_SEEDS + i) for i in range(cfg.detector.policy_episodes)]
    # The actors roll the policy out while this process runs the scripted expert (Ray actors: at the same time)
    policy_rollouts = rollouts.collect_async(policy_seeds, "train", sample_seed=7, corrected=False)  # as it acts alone
    demo_seeds = [split_seed("train", DETECTOR_DEMO_SEEDS + i) for i in range(cfg.detector.demo_episodes)]
    demos = run_episodes(demo_seeds, "train", None, policy_version=-1, **env_kwargs)
    if ":" not in cfg.env.family:  # the tabletop's expert makes them; third-party experts do not
        for k, kind in enumerate(HARD_EXAMPLES):
            n = getattr(cfg.detector, f"{kind}_episodes")
            seeds = [split_seed("train", DETECTOR_HARD_SEEDS + 100_000 * k + i) for i in range(n)]
            demos += run_episodes(seeds, "train", None, policy_version=-1, hard=kind, **env_kwargs)
    return ground_truth_labelled(demos + policy_rollouts())


def train_reward(cfg: DictConfig, say: Callable[[str], None] = print, rollouts: RolloutGroup | None = None,
                 store: EpisodeStore | None = None, policy_weights: dict | None = None,
                 policy_sensors: tuple[str, ...] | None = None, progress=None, exclude=(), offline: bool = False):
    """Train a success detector on the run's labelled episodes (made first if the store has none).

    In the loop (``offline=False``) it trains on the episodes that carry a label (a human's, the simulator's, a
    demonstration marker: the audit's budget of labels, never the simulator's record of every episode) and holds
    out a random share, so a retrain learns from the newest audit. ``flywheel reward train`` (``offline=True``) is
    the reward-model workflow: every episode whose truth is known (``Episode.trusted_success``, which includes the
    simulator's record) trains it, and the newest policy's episodes are held out: trained on older policies,
    validated on the newest, as the detector will be used.

    Writes ``run_dir/detector/<version>.safetensors`` and ``run_dir/detector/metrics.json``; returns
    (detector, held-out metrics). Interrupted, it continues where it stopped when started again
    (``run_dir/detector/<version>.partial/``). ``progress(step, steps, loss)`` is called every step. Episodes
    whose ids are in ``exclude`` are left out (the loop keeps its newest audit to judge the result on).
    """
    run_dir = Path(cfg.run_dir)
    store = store or EpisodeStore(run_dir / "episodes")
    if policy_weights is None or policy_sensors is None or rollouts is None:  # the run passes all three
        vla_cfg, checkpoint_weights, _ = load_policy_checkpoint(cfg.policy.checkpoint)
        policy_weights = checkpoint_weights if policy_weights is None else policy_weights
        policy_sensors = vla_cfg.sensors if policy_sensors is None else policy_sensors
    # Every camera that is on (flywheel/config.py checks that env.sensors records the ones asked for; the detector's
    # config drops touch, which it does not read).
    judged_by = tuple(cfg.detector.sensors or cfg.env.sensors)
    known = (lambda ep: ep.trusted_success() is not None) if offline else (
        lambda ep: any(lab.source != "detector" for lab in ep.labels))
    data = [ep for ep in store.iter(with_ground_truth=True) if known(ep) and ep.id not in exclude]
    if not data:
        say("detector: collecting labelled episodes (demonstrations + starting-policy rollouts)" if not offline else
            f"detector: {run_dir} holds no labelled episodes, so new ones are made there (demonstrations + "
            f"starting-policy rollouts). To train on a run's episodes instead, give that run's directory.")
        if rollouts is None:
            check_env(env_kwargs_of(cfg))
            rollouts = RolloutGroup(vla_policy_factory(vla_cfg), env_kwargs_of(cfg), num_workers=1, use_ray=False)
            rollouts.publish(PolicySnapshot(0, policy_weights))
        data = make_detector_data(cfg, rollouts, env_kwargs_of(cfg))
        for ep in data:
            store.add(ep)
    # In the order they were made (make_detector_data's: demonstrations, hard examples, rollouts, each by seed), not
    # the store's (by random id): a run interrupted after making them trains, when started again, the detector it
    # would have trained. (Read back in the store's order, the tiny run's came out AUROC 0.52 against 0.71.)
    data.sort(key=lambda ep: (ep.policy_version, ep.seed))
    check_recorded(data, judged_by)
    previous = sorted((run_dir / "detector").glob("detector-*.safetensors"))
    version = f"detector-{len(previous) + 1}"
    train, held, calibration, how = split_detector_data(data, cfg, offline)
    held_ids = {ep.id for ep in held}
    # The starting policy's success rate: the mix of successes the detector will judge, which sets its precision.
    rollouts_ok = [ep.trusted_success() for ep in data if ep.policy_version >= 0]
    base_rate = float(np.mean(rollouts_ok)) if rollouts_ok else None
    say(f"detector: training {version} on {len(train)} episodes, {len(held)} held out {how}")
    init = policy_weights if cfg.detector.init_from_policy else None
    detector, det_metrics = train_detector(
        train, held, version=version, steps=cfg.detector.steps, batch_size=cfg.detector.batch_size,
        lr=cfg.detector.lr, seed=cfg.seed, threshold=cfg.detector.threshold, init_weights=init, init_sensors=tuple(policy_sensors),
        augment=cfg.detector.augment, cfg=DetectorNetConfig(image_size=cfg.env.image_size, sensors=judged_by,
                                                               window=cfg.detector.window, stride=cfg.detector.stride,
                                                               horizon=cfg.env.max_steps),
        calibration_episodes=calibration, target_precision=cfg.detector.target_precision, base_rate=base_rate,
        checkpoint_dir=run_dir / "detector" / f"{version}.partial", progress=progress, ensemble=cfg.detector.ensemble,
        swaps=cfg.detector.swaps,
    )
    save_weights(run_dir / "detector" / f"{version}.safetensors", detector.weights(),
                 {"version": version, "members": len(detector.members), "threshold": detector.threshold,
                  "temperature": detector.temperature, "bias": detector.bias, "per_task": detector.per_task,
                  "heldout": det_metrics, "config": dataclasses.asdict(detector.net.cfg),
                  "episodes": {"train": [ep.id for ep in train], "heldout": [ep.id for ep in held],
                               "calibration": [ep.id for ep in calibration if ep.id not in held_ids]}})
    atomic_write_bytes(run_dir / "detector" / "metrics.json", json.dumps({"version": version, **det_metrics},
                                                                         indent=2).encode())
    fmt = lambda k: "undefined" if det_metrics[k] is None else f"{det_metrics[k]:.3f}"  # noqa: E731 (one class)
    say(f"detector: precision {fmt('precision')}  recall {fmt('recall')}  AUROC {fmt('auroc')}  ECE {fmt('ece')} "
        f"on {det_metrics['n']} held-out episodes (threshold {detector.threshold:.3f}, temperature "
        f"{detector.temperature:.2f}, bias {detector.bias:.2f})")
    return detector, det_metrics


def adopt_detector(path: Path, run_dir: Path):
    """A detector trained elsewhere (``detector.checkpoint``), copied into the run as its first version, so that the
    run holds everything it judged with (a resumed run, ``flywheel reward eval`` and an audit's retrain find it
    there) -> (detector, its held-out metrics as recorded)."""
    detector, meta = load_detector(path)
    own = run_dir / "detector" / "detector-1.safetensors"
    own.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != "progress_head"}  # load_detector's note, not the file's
    save_weights(own, detector.weights(), {**meta, "version": "detector-1", "copied_from": str(path)})
    detector.version = "detector-1"
    return detector, meta.get("heldout", {})


def check_recorded(episodes: list[Episode], sensors: tuple[str, ...]) -> None:
    """A ConfigError, before any training, when stored episodes lack a camera the detector is to judge from."""
    short = [ep for ep in episodes if not all(sensor_key(s) in ep.observations for s in sensors)]
    if short:
        lacking = [s for s in sensors if any(sensor_key(s) not in ep.observations for ep in short)]
        held = [s for s in sensors if s not in lacking] or ["overhead"]
        raise ConfigError(
            f"the detector is to judge from [{', '.join(sensors)}], but {len(short)} of {len(episodes)} stored "
            f"episodes lack [{', '.join(lacking)}]: they were recorded without it. Judge from what they hold "
            f"(detector.sensors=[{','.join(held)}]), or record it in the run (env.sensors=...).")


def split_detector_data(data: list[Episode], cfg: DictConfig, offline: bool
                        ) -> tuple[list[Episode], list[Episode], list[Episode], str]:
    """-> (train, held out, calibration, how they were split). Hard examples made on purpose always train and are
    never judged on: they are not what the detector will meet. Offline, the newest policy's episodes are held out
    (train on older policies, validate on the newest) and, as `flywheel reward eval` judges on them, a tenth of the
    others' policy episodes (at least) calibrates. In the loop, a random ``heldout_fraction`` is held out and, without
    a calibration split of its own (``calibration_fraction`` 0), its policy episodes also calibrate: no training data
    is given up and the held-out AUROC is untouched (the temperature reorders nothing)."""
    made = [ep for ep in data if ep.made_on_purpose()]
    met = [ep for ep in data if not ep.made_on_purpose()]
    newest = max((ep.policy_version for ep in met), default=-1)
    rng = np.random.default_rng(cfg.seed)
    if offline and newest > 0:
        held = [ep for ep in met if ep.policy_version == newest]
        rest = [met[i] for i in rng.permutation(len(met)) if met[i].policy_version != newest]
        fraction, how = max(cfg.detector.calibration_fraction, 0.1), f"(the newest policy's, v{newest})"
    else:
        order = rng.permutation(len(met))
        n_held = int(round(len(met) * cfg.detector.heldout_fraction))
        held, rest = [met[i] for i in order[:n_held]], [met[i] for i in order[n_held:]]
        fraction, how = cfg.detector.calibration_fraction, "(at random)"
    # Calibration fits P(success) to the policy's episodes, which the detector will judge (demonstrations, all
    # successes and easy, pulled it toward over-claiming: bias +0.24 against -0.20 fitted on the rollouts alone).
    rollouts = [ep for ep in rest if ep.policy_version >= 0]
    n_cal = int(round(len(rollouts) * fraction))
    cal_ids = {ep.id for ep in rollouts[:n_cal]}
    judged = [ep for ep in held if ep.policy_version >= 0] or held
    calibration = rollouts[:n_cal] if n_cal else judged
    rest = [ep for ep in rest if ep.id not in cal_ids]
    how += f", calibrated on {n_cal} others" if n_cal else ", calibrated on the held-out rollouts"
    return rest + made, held, calibration, how


def env_kwargs_of(cfg: DictConfig) -> dict:
    return to_dict(cfg.env)  # EnvConfig's fields are run_episodes' environment arguments


def check_env(env_kwargs: dict) -> None:
    """A ConfigError, before anything starts, when the environment the config names cannot be made (a task family
    or a simulator's task that does not exist): one is made here, with the run's settings, and closed. Otherwise the
    environment's own error came as a traceback from deep inside the detector's first collection."""
    try:
        env = make_env(**{k: v for k, v in env_kwargs.items() if k != "execute"})  # run_episodes' argument alone
    except ValueError as e:
        raise ConfigError(f"the environment of env.family={env_kwargs.get('family')!r} cannot be made: {e}") from e
    env.close()


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


def run(cfg: DictConfig, say: Callable[[str], None] = print, on_iteration=None) -> dict[str, Any]:
    """Run the flywheel for its budget; returns (and writes) the summary. On a run_dir that holds a run, resume it
    (flywheel/resume.py): ``cfg`` must then be its recorded config, changed only where RESUMABLE allows."""
    started = time.time()
    run_dir = Path(cfg.run_dir)
    resuming = holds_a_run(run_dir)
    if resuming:
        check_unchanged(cfg, run_dir)
    if cfg.learner.algorithm not in ALGORITHMS:  # before anything starts, not after the detector has trained
        renamed = " (token_ppo is now ppo, for both kinds of VLA)" if cfg.learner.algorithm == "token_ppo" else ""
        raise ConfigError(f"learner.algorithm={cfg.learner.algorithm!r} is unknown{renamed}: choose one of "
                          f"{sorted(ALGORITHMS)}")
    check_env(env_kwargs_of(cfg))
    if cfg.rollout.group_size > 1 and cfg.learner.practice_noise == 0 and "practice_noise" in accepted_options(
            ALGORITHMS[cfg.learner.algorithm]):
        raise ConfigError(f"rollout.group_size={cfg.rollout.group_size} with learner.practice_noise=0: the attempts at a "
                          f"layout would all be the same, so none could be compared with another; give "
                          f"rollout.group_size=1, or learner.practice_noise > 0 (e.g. 1: practise by sampling)")
    saved = read_state(run_dir) if resuming else None
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    previous = None
    if resuming and (run_dir / "summary.json").exists():  # what the attempt before said, kept: nothing is lost
        try:
            previous = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            pass
    # (an attempt stopped before its loop began saved no state, but its summary counts it)
    attempt = max((saved or {}).get("attempt", 0), (previous or {}).get("attempt", 0)) + 1 if resuming else 1
    summary: dict[str, Any] = {"status": "running", "run_dir": str(run_dir.resolve()), "experiment": cfg.experiment,
                               "attempt": attempt, **({"previous_attempt": previous} if previous else {})}
    metrics = MetricsSink(run_dir, to_dict(cfg), mode=cfg.wandb.mode, project=cfg.wandb.project)
    rollouts = learner = None
    ray_started = False
    try:
        vla_cfg, base_weights, base_meta = load_policy_checkpoint(cfg.policy.checkpoint)
        say(f"policy: {cfg.policy.checkpoint} ({base_meta.get('description', 'no description')})")
        note = eval_noise_note(base_meta, cfg.eval.noise)
        if note:
            say(note)
        missing = [s for s in vla_cfg.sensors if s not in cfg.env.sensors]
        if missing:
            raise ConfigError(f"the policy reads sensors {list(vla_cfg.sensors)} but env.sensors={list(cfg.env.sensors)}"
                              f" lacks {missing}: add them, e.g. env.sensors=[{','.join(vla_cfg.sensors)}]")
        env_kwargs = env_kwargs_of(cfg)
        if cfg.rollout.use_ray:
            import ray

            if not ray.is_initialized():
                start_ray(cfg, say)
                ray_started = True  # started or joined: at the end the run leaves (a joined cluster goes on)
            check_resources(cfg.rollout.resources, ray.cluster_resources())
        # the person standing by is one of the base's demonstrators (the workers apply corrections in practice only)
        corrections = {"corrections": {"rate": cfg.rollout.corrections, "after": cfg.rollout.correct_after,
                                       "operators": list((base_meta.get("config") or {}).get("operators") or
                                                         ["standard"])}} if cfg.rollout.corrections > 0 else {}
        rollouts = RolloutGroup(
            vla_policy_factory(vla_cfg, cfg.eval.noise), {**env_kwargs, **corrections},
            num_workers=cfg.rollout.num_workers,
            use_ray=cfg.rollout.use_ray, cpus_per_worker=cfg.rollout.cpus_per_worker,
            call_timeout_s=cfg.rollout.call_timeout_s, resources=to_dict(cfg.rollout.resources),
            trim_idle_s=cfg.rollout.trim_idle_s,
        )
        # The learner first: version 0 is the base as its algorithm acts with it (a residual policy explores).
        checkpoints = CheckpointDir(run_dir / "checkpoints", keep=3, meta={
            "vla_config": dataclasses.asdict(vla_cfg), "description": f"{cfg.learner.algorithm} in {run_dir.name}, "
            f"from {cfg.policy.checkpoint}", "eval_noise": cfg.eval.noise,  # how its held-out figures were measured
            **({"config": base_meta["config"]} if "config" in base_meta else {})})
        store = EpisodeStore(run_dir / "episodes")
        reads = observation_keys(vla_cfg.sensors)
        # recorded with the policy's own cameras: one the run records for its detector alone has no place in replay
        factory = functools.partial(build_learner, to_dict(cfg.learner), cfg.seed, vla_cfg, base_weights, base_meta,
                                    {**env_kwargs, "sensors": list(vla_cfg.sensors)})
        if cfg.learner.remote:
            learner = start_remote_learner(cfg, factory, lambda new: put_back(new, cfg, checkpoints, store, rollouts,
                                                                              run_dir, reads, say))
            summary["learner"] = learner.placement
        else:
            learner = factory(cfg.learner.device)
        state, in_flight = LoopState(), []
        if saved is not None:
            state = restore_learner_and_state(learner, checkpoints, saved, run_dir)
        if resuming:
            learned, in_flight = refill_learner(learner, cfg, store, state.next_train_index, reads)
            say(f"run: resuming {run_dir} (attempt {attempt}) at iteration {state.iteration}, policy "
                f"v{learner.version}: the learner's buffer refilled from {learned} stored episodes; "
                f"{len(in_flight)} episodes of the iteration in flight are used, the rest collected")
        summary["rollout_workers"] = rollouts.placement()  # asked only now: the actors started meanwhile
        first = learner.snapshot()
        rollouts.publish(dataclasses.replace(first, meta={**first.meta, "source": cfg.policy.checkpoint}))
        if saved is None:  # every version the loop may return to has a checkpoint, the starting one too
            checkpoints.save(first.version, first.weights, {"version": first.version, **first.meta},
                             state=learner.training_state())

        # ---- the success detector, trained on simulator-labelled episodes ----------------------------------------
        if cfg.reward == "ground_truth":
            detector, det_metrics = GroundTruthJudge(), {}
            say("reward: the simulator's ground truth judges practice (reward=ground_truth); no detector is trained")
        elif resuming and list((run_dir / "detector").glob("detector-*.safetensors")):
            # the one that labelled last (a retrain the run did not get to use is not it), else the one it trained
            path = (run_dir / "detector" / f"{state.detector_versions[-1]}.safetensors" if state.detector_versions
                    else latest_detector(run_dir))
            detector, det_meta = load_detector(path)
            det_metrics = det_meta.get("heldout", {})
            say(f"detector: {detector.version}, as the run left it ({path})")
        elif cfg.detector.checkpoint:
            detector, det_metrics = adopt_detector(Path(cfg.detector.checkpoint), run_dir)
            auroc = det_metrics.get("auroc")
            say(f"detector: {cfg.detector.checkpoint} (held-out AUROC "
                f"{'unknown' if auroc is None else f'{auroc:.3f}'}), copied into {run_dir / 'detector'}")
        else:
            detector, det_metrics = train_reward(cfg, say, rollouts=rollouts, store=store,
                                                  policy_weights=base_weights, policy_sensors=vla_cfg.sensors)
            metrics.log({f"detector/{k}": v for k, v in det_metrics.items() if v is not None}, step=0)
        summary["detector"] = {"version": detector.version, **det_metrics}

        # ---- the loop ---------------------------------------------------------------------------------------------
        audit_settings = AuditSettings(
            sample=cfg.audit.sample if cfg.reward == "detector" else 0,  # the truth needs no audit
            bound=cfg.audit.bound, seed=cfg.seed, retrain_every=cfg.audit.retrain_every,
            retrain=(lambda exclude=(): train_reward(cfg, say, rollouts=rollouts, store=store,
                                                      policy_weights=base_weights, policy_sensors=vla_cfg.sensors,
                                                      exclude=exclude)[0])
            if (cfg.audit.retrain or cfg.audit.retrain_every) and cfg.reward == "detector" else None)
        spent = (saved or {}).get("elapsed_s", 0.0)  # by earlier attempts: the budget is the run's, not each one's
        budget = Budget(started + cfg.budget.minutes * 60 - spent, cfg.budget.iterations, cfg.budget.env_steps,
                        cfg.budget.episodes)
        gate = GateSettings([split_seed("eval", GATE_SEEDS + i) for i in range(cfg.gate.episodes)],
                            confidence=cfg.gate.confidence, margin=cfg.gate.margin, audit=cfg.gate.audit,
                            bound=cfg.audit.bound) if cfg.gate.episodes else None

        def save_state(s: LoopState) -> None:
            write_state(run_dir, {"loop": s.to_json(), "policy_version": learner.version, "attempt": attempt,
                                  "elapsed_s": spent + time.time() - started, "written": time.time()})

        with graceful_stop(budget, say):
            state = run_loop(
                LoopParts(rollouts, store, detector, learner, metrics, checkpoints),
                LoopSettings(train_seed=loop_seed, eval_seeds=[split_seed("eval", i) for i in range(cfg.eval.episodes)],
                             episodes_per_iteration=cfg.rollout.episodes_per_iteration, eval_every=cfg.eval.every,
                             group_size=cfg.rollout.group_size, learner_reads=reads, audit=audit_settings, gate=gate,
                             eval_judge=cfg.eval.judge, overlap=cfg.rollout.overlap and cfg.rollout.use_ray,
                             keep_collecting=cfg.rollout.keep_collecting),
                state, budget, save_state=save_state, on_iteration=on_iteration or (lambda s, row: None),
                in_flight=InFlight(in_flight, max((loop_seed_index(ep.seed) + 1 - state.next_train_index
                                                   for ep in in_flight), default=0)))
        first, last = state.evaluations[0], state.evaluations[-1]
        summary.update(
            status="stopped" if budget.stop_requested else "completed",
            **({"stop_reason": budget.stop_requested} if budget.stop_requested else {}),
            episodes=state.episodes,
            env_steps=state.env_steps,
            iterations=state.iteration,
            policy_version_final=learner.version,
            initial_success=first.success,
            initial_ci95=list(first.ci95),
            final_success=last.success,
            final_ci95=list(last.ci95),
            eval_episodes=last.episodes,
            final_outcomes=last.outcomes_text,  # 1/0 per held-out seed, in seed order (empty if the run kept none)
            evaluations=[{"version": e.version, "success": e.success, "ci95": list(e.ci95), "episodes": e.episodes,
                          "per_task": e.per_task, "judged_by": e.judged_by} for e in state.evaluations],
            audit=audit_settings.as_summary(state),
            gate={"episodes": cfg.gate.episodes, "confidence": cfg.gate.confidence, "margin": cfg.gate.margin,
                  "judge": cfg.eval.judge, "audit": cfg.gate.audit if cfg.eval.judge == "detector" else 0,
                  "decisions": [dataclasses.asdict(g) for g in state.gates],
                  "held_back": sum(not g.promoted for g in state.gates)},
            rollbacks=state.rollbacks,
            faults={"restarts": rollouts.restarts, "events": rollouts.faults,
                    "learner_restarts": getattr(learner, "restarts", 0), "learner_events": getattr(learner, "faults", [])},
            learner_recoveries=state.recoveries,
        )
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
        if rollouts is not None:
            rollouts.close()
        if hasattr(learner, "close"):
            learner.close()
        if ray_started:
            import ray

            if summary["status"] == "interrupted":  # after SIGTERM to the whole job, Ray's own processes are going
                say("ray: shutting down (it can take ~10 s)")  # too, and ray.shutdown waits on them (~7 s measured)
            ray.shutdown()
    return summary


def start_ray(cfg: DictConfig, say: Callable[[str], None]) -> None:
    """Join the cluster at ``ray.address``, or start Ray on this machine (its dashboard on localhost if asked).

    ``ray.init`` puts in its own SIGTERM handler (a stack dump, then ``sys.exit``); a handler the caller had set in
    Python (the command's, flywheel/cli.py sigterm_interrupts) is put back, so that SIGTERM still says what the run
    kept and how to go on."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        _start_ray(cfg, say)
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _start_ray(cfg: DictConfig, say: Callable[[str], None]) -> None:
    import ray

    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False, configure_logging=False)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        say(f"ray: joined {cfg.ray.address}: {len(nodes)} nodes, {ray.cluster_resources()}")
        return
    # Ray's own servers (GCS, raylet) listen on every interface: Ray 2.60 has no setting that binds them to
    # 127.0.0.1. What keeps the network out is Ray's token authentication, which ray.init turns on for a new local
    # cluster unless RAY_AUTH_MODE says otherwise: a process without this machine's token (~/.ray/auth_token, made
    # on first use) is refused. (Setting RAY_AUTH_MODE=token here instead would stop Ray making the token.)
    try:
        started = ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=cfg.ray.dashboard,
                           dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
    except ValueError as e:
        if "existing cluster" not in str(e):
            raise
        raise ConfigError(  # ray.init joins a cluster that `ray start` began on this machine, if it finds one
            "a Ray cluster started with `ray start` is running on this machine (or one that was killed left "
            "/tmp/ray/ray_current_cluster behind), and a run without ray.address starts its own. Give ray.address=auto "
            "to run on that cluster, or stop it with `ray stop`.") from e
    if os.environ.get("RAY_AUTH_MODE") == "token":
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if token.is_file() and token.stat().st_mode & 0o077:
            token.chmod(0o600)  # Ray writes it readable by every user of the machine
    else:
        say(f"ray: token authentication is off (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE')}): anyone who can "
            f"reach this machine's Ray ports can run code here")
    if cfg.ray.dashboard:
        say(f"ray: dashboard at http://{getattr(started, 'dashboard_url', None) or '127.0.0.1:8265'}")


def check_resources(wanted: dict, offered: dict, who: str = "rollout") -> None:
    """A ConfigError, before any actor waits forever, when no node offers a resource the actors (``who``) need."""
    missing = {k: v for k, v in dict(wanted).items() if offered.get(k, 0) < v}
    if missing:
        start = ("--num-gpus=1" if "GPU" in missing else
                 f"--resources='{{\"{next(iter(k for k in missing if k != 'GPU'))}\": 1}}'")
        raise ConfigError(
            f"{who}.resources={dict(wanted)}, but the Ray cluster offers {dict(offered)}: no node has "
            f"{sorted(missing)}. Start the hosts that have them with `ray start --address=HEAD:6379 {start}` and "
            f"give ray.address=HEAD:6379, or drop the setting.")


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


def build_learner(options: dict[str, Any], seed: int, vla_cfg, base_weights: dict, base_meta: dict, demo_env: dict,
                  device: str = "cpu"):
    """The run's learner at version 0, on ``device`` ("auto": a GPU if there is one): the base's weights, its
    pretraining demonstrations to replay, and the algorithm's options. Module-level, so that a learner actor on
    another node can build it from a pickled partial."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"learner.device={device}, but the learner's process sees no GPU (torch "
                          f"{torch.__version__}, CUDA {torch.version.cuda}): use learner.device=auto or cpu, or run "
                          f"the learner on a GPU node (learner.remote=true learner.gpus=1)")
    model = SmallVLA(vla_cfg)
    model.load_weights(base_weights)
    demos = pretraining_demos(options["demos"], base_meta, demo_env)
    return make_learner(options["algorithm"], model.to(device), demos, version=0, seed=seed, **options)


def start_remote_learner(cfg: DictConfig, factory, on_restart):
    """``learner.remote=true``: the learner as a Ray actor, placed by learner.gpus / learner.resources."""
    import ray

    from learner.remote import RemoteLearner

    if not cfg.rollout.use_ray:
        raise ConfigError("learner.remote=true needs Ray: drop rollout.use_ray=false (or set learner.remote=false)")
    check_learner_fits(cfg, ray.cluster_resources())
    return RemoteLearner(factory, device=cfg.learner.device, cpus=cfg.learner.cpus, gpus=cfg.learner.gpus,
                         resources=to_dict(cfg.learner.resources), call_timeout_s=cfg.learner.call_timeout_s,
                         on_restart=on_restart)


def check_learner_fits(cfg: DictConfig, offered: dict) -> None:
    """A ConfigError, before the learner actor waits for a place that will never come: a resource no node offers,
    or more CPUs than the cluster has once the rollout actors hold theirs (a 2-core laptop with the defaults)."""
    check_resources({**({"GPU": cfg.learner.gpus} if cfg.learner.gpus else {}), **to_dict(cfg.learner.resources)},
                    offered, who="learner")
    rollout = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
    if rollout + cfg.learner.cpus > offered.get("CPU", 0) + 1e-9:
        raise ConfigError(
            f"learner.cpus={cfg.learner.cpus:g} does not fit: the rollout actors hold {rollout:g} of the cluster's "
            f"{offered.get('CPU', 0):g} CPUs (rollout.num_workers={cfg.rollout.num_workers} x "
            f"rollout.cpus_per_worker={cfg.rollout.cpus_per_worker:g}). Lower learner.cpus (0 shares the CPUs, as a "
            f"learner in the driver does) or rollout.cpus_per_worker, or join a cluster with more (ray.address).")


def refill_learner(learner, cfg: DictConfig, store: EpisodeStore, next_index: int, reads) -> tuple[int, list]:
    """Put the practice episodes the learner had learned from (seed indices below ``next_index``; the newest
    2 x learner.max_episodes) back in its replay buffer. -> (how many, the iteration in flight's stored episodes)."""
    learned, in_flight = loop_episodes(store, loop_seed_index, next_index, keep=2 * cfg.learner.max_episodes)
    learner.refill([learner_view(ep, reads) for ep in learned if ep.latest_label("detector") is not None])
    return len(learned), in_flight


def put_back(learner, cfg: DictConfig, checkpoints: CheckpointDir, store: EpisodeStore, rollouts: RolloutGroup,
             run_dir: Path, reads, say: Callable[[str], None]) -> None:
    """A restarted learner actor, put back where the run was: the deployed version's checkpoint (weights, optimizer,
    generators) and the replay buffer of every iteration that had ended."""
    version = rollouts.published_version
    weights, _, training = checkpoints.load(version, with_state=True)
    learner.resume_from(weights, training)
    saved = read_state(run_dir)
    count, _ = refill_learner(learner, cfg, store, saved["loop"]["next_train_index"] if saved else 0, reads)
    say(f"learner: lost, restarted on {learner.placement['host']} at v{version} with {count} episodes refilled")
