"""The detector's workflow in a run: its training episodes made (or read from the store), split, trained, saved.

The episodes come from ``DetectorSources``, which the run layer builds from the actors (this package does not import
them): the starting policy acting alone, the scripted expert's demonstrations, and hard examples the expert makes on
purpose where it can. Everything lands in ``run_dir/detector/``: ``detector-N.safetensors`` (weights, threshold,
calibration, held-out metrics and which episodes trained it) and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig

from flywheel.checkpoint import save_weights
from flywheel.config import ConfigError
from flywheel.contracts import Episode, Label, Rollouts, sensor_key
from flywheel.store import EpisodeStore, atomic_write_bytes
from reward.detector import DetectorNetConfig, LearnedSuccessDetector
from reward.report import load_detector
from reward.train import Calibration, Training, train_detector

# Where each kind of detector data draws its training seeds (seed indices), apart from every other use.
DEMO_SEEDS = 2_000_000
POLICY_SEEDS = 3_000_000
HARD_SEEDS = 4_000_000  # + 100,000 per kind of hard example


@dataclasses.dataclass
class DetectorSources:
    """Where a detector's training episodes come from, as the run layer wires them.

    ``rollouts()``: the starting policy's actors (built on first use). ``demonstrate(seeds, hard=None)``: the
    scripted expert's episodes on training seeds (``hard``: one of ``hard_examples``, a near miss made on purpose).
    ``seed(i)``: the training split's seed of index ``i``. ``policy_weights`` and ``policy_sensors``: the starting
    policy's, from which the detector's encoder may start (``detector.init_from_policy``)."""

    rollouts: Callable[[], Rollouts]
    demonstrate: Callable[..., list[Episode]]
    seed: Callable[[int], int]
    policy_weights: dict[str, np.ndarray]
    policy_sensors: tuple[str, ...]
    hard_examples: tuple[str, ...] = ()


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


def make_detector_data(cfg: DictConfig, sources: DetectorSources) -> list[Episode]:
    """Scripted demonstrations, hard examples made on purpose (the expert putting the block just outside or just
    inside success, or holding it over the target) and starting-policy rollouts, labelled with the simulator's
    success."""
    policy_seeds = [sources.seed(POLICY_SEEDS + i) for i in range(cfg.detector.policy_episodes)]
    # The actors roll the policy out (as it acts alone) while this process runs the scripted expert
    policy_rollouts = sources.rollouts().collect_async(policy_seeds, "train", sample_seed=7, corrected=False)
    demos = sources.demonstrate([sources.seed(DEMO_SEEDS + i) for i in range(cfg.detector.demo_episodes)])
    for k, kind in enumerate(sources.hard_examples):
        n = getattr(cfg.detector, f"{kind}_episodes")
        demos += sources.demonstrate([sources.seed(HARD_SEEDS + 100_000 * k + i) for i in range(n)], hard=kind)
    return ground_truth_labelled(demos + policy_rollouts())


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
    # successes and easy, pull it toward over-claiming).
    rollouts = [ep for ep in rest if ep.policy_version >= 0]
    n_cal = int(round(len(rollouts) * fraction))
    cal_ids = {ep.id for ep in rollouts[:n_cal]}
    judged = [ep for ep in held if ep.policy_version >= 0] or held
    calibration = rollouts[:n_cal] if n_cal else judged
    rest = [ep for ep in rest if ep.id not in cal_ids]
    how += f", calibrated on {n_cal} others" if n_cal else ", calibrated on the held-out rollouts"
    return rest + made, held, calibration, how


def train_reward(cfg: DictConfig, sources: DetectorSources, say: Callable[[str], None] = print,
                 store: EpisodeStore | None = None, progress=None, exclude=(), offline: bool = False):
    """Train a success detector on the run's labelled episodes (made first if the store has none).

    In the loop (``offline=False``) it trains on the episodes that carry a label (a human's, the simulator's, a
    demonstration marker: the audit's budget of labels, never the simulator's record of every episode) and holds
    out a random share, so a retrain learns from the newest audit. ``flywheel reward train`` (``offline=True``) is
    the reward-model workflow: every episode whose truth is known (``Episode.trusted_success``, which includes the
    simulator's record) trains it, and the newest policy's episodes are held out: trained on older policies,
    validated on the newest, as the detector will be used.

    Returns (detector, held-out metrics). Interrupted, it continues where it stopped when started again
    (``run_dir/detector/<version>.partial/``). ``progress(step, steps, loss)`` is called every step. Episodes
    whose ids are in ``exclude`` are left out (the loop keeps its newest audit to judge the result on).
    """
    run_dir = Path(cfg.run_dir)
    store = store or EpisodeStore(run_dir / "episodes")
    # Every camera that is on (flywheel/config.py checks that env.sensors records the ones asked for)
    judged_by = tuple(cfg.detector.sensors or cfg.env.sensors)
    known = (lambda ep: ep.trusted_success() is not None) if offline else (
        lambda ep: any(lab.source != "detector" for lab in ep.labels))
    data = [ep for ep in store.iter(with_ground_truth=True) if known(ep) and ep.id not in exclude]
    if not data:
        say("detector: collecting labelled episodes (demonstrations + starting-policy rollouts)" if not offline else
            f"detector: {run_dir} holds no labelled episodes, so new ones are made there (demonstrations + "
            f"starting-policy rollouts). To train on a run's episodes instead, give that run's directory.")
        data = make_detector_data(cfg, sources)
        for ep in data:
            store.add(ep)
    # In the order they were made (demonstrations, hard examples, rollouts, each by seed), not the store's (by
    # random id): a run interrupted after making them trains, when started again, the detector it would have trained.
    data.sort(key=lambda ep: (ep.policy_version, ep.seed))
    check_recorded(data, judged_by)
    version = f"detector-{len(sorted((run_dir / 'detector').glob('detector-*.safetensors'))) + 1}"
    train, held, calibration, how = split_detector_data(data, cfg, offline)
    # The starting policy's success rate: the mix of successes the detector will judge, which sets its precision.
    rollouts_ok = [ep.trusted_success() for ep in data if ep.policy_version >= 0]
    say(f"detector: training {version} on {len(train)} episodes, {len(held)} held out {how}")
    d = cfg.detector
    detector, det_metrics = train_detector(
        train, held, version=version,
        training=Training(steps=d.steps, batch_size=d.batch_size, lr=d.lr, seed=cfg.seed, augment=d.augment,
                          ensemble=d.ensemble, swaps=d.swaps),
        cfg=DetectorNetConfig(image_size=cfg.env.image_size, sensors=judged_by, window=d.window, stride=d.stride,
                              horizon=cfg.env.max_steps),
        calibration=Calibration(d.threshold, calibration, d.target_precision,
                                base_rate=float(np.mean(rollouts_ok)) if rollouts_ok else None),
        init_weights=sources.policy_weights if d.init_from_policy else None,
        init_sensors=tuple(sources.policy_sensors),
        checkpoint_dir=run_dir / "detector" / f"{version}.partial", progress=progress,
    )
    save_detector(run_dir, detector, det_metrics, train, held, calibration,
                  env={"name": cfg.env.name, "family": cfg.env.family,
                       "randomize": {k: float(v) for k, v in (cfg.env.randomize or {}).items() if v}})
    fmt = lambda k: "undefined" if det_metrics[k] is None else f"{det_metrics[k]:.3f}"  # noqa: E731 (one class)
    say(f"detector: precision {fmt('precision')}  recall {fmt('recall')}  AUROC {fmt('auroc')}  ECE {fmt('ece')} "
        f"on {det_metrics['n']} held-out episodes (threshold {detector.threshold:.3f}, temperature "
        f"{detector.temperature:.2f}, bias {detector.bias:.2f})")
    return detector, det_metrics


def save_detector(run_dir: Path, detector: LearnedSuccessDetector, det_metrics: dict, train: list[Episode],
                  held: list[Episode], calibration: list[Episode], env: dict | None = None) -> None:
    """``run_dir/detector/<version>.safetensors`` with everything that judges, what trained it and the environment
    it judges (``env``: its name and task family), and ``metrics.json`` (the newest detector's held-out metrics)."""
    held_ids = {ep.id for ep in held}
    save_weights(run_dir / "detector" / f"{detector.version}.safetensors", detector.weights(),
                 {"version": detector.version, "members": len(detector.members), "threshold": detector.threshold,
                  "temperature": detector.temperature, "bias": detector.bias, "per_task": detector.per_task,
                  "heldout": det_metrics, "config": dataclasses.asdict(detector.net.cfg), "env": env or {},
                  "episodes": {"train": [ep.id for ep in train], "heldout": [ep.id for ep in held],
                               "calibration": [ep.id for ep in calibration if ep.id not in held_ids]}})
    atomic_write_bytes(run_dir / "detector" / "metrics.json",
                       json.dumps({"version": detector.version, **det_metrics}, indent=2).encode())


def adopt_detector(detector: LearnedSuccessDetector, meta: dict, source: str, run_dir: Path) -> None:
    """A detector trained elsewhere (``load_detector(source)``'s), copied into the run as its first version, so
    that the run holds everything it judged with (a resumed run, ``flywheel reward eval`` and an audit's retrain find
    it there)."""
    own = run_dir / "detector" / "detector-1.safetensors"
    own.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in meta.items() if k != "progress_head"}  # load_detector's note, not the file's
    save_weights(own, detector.weights(), {**meta, "version": "detector-1", "copied_from": source})
    detector.version = "detector-1"
