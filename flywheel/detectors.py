"""Who judges practice (``detector.name``): the built-in detector plug-ins, and what every detector factory gets.

A detector factory is called with a ``DetectorContext`` and returns a ``SuccessDetector`` (flywheel/contracts.py).
It may set ``ctx.metrics`` (its held-out quality, for the summary), ``ctx.retrain`` (how to train a new one on the
store's trusted labels: the audit calls it on an alarm) and ``ctx.audited = False`` (only for a judge that *is* the
truth the audit checks against). A team's own reward model is one such factory::

    def make_detector(ctx):              # detector.name=my_lab.reward:make_detector
        return MyRewardModel.load(ctx.cfg.detector.checkpoint)   # version, threshold, score(episodes)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from flywheel.config import ConfigError
from flywheel.contracts import SuccessDetector
from flywheel.store import EpisodeStore


@dataclasses.dataclass
class DetectorContext:
    """What a detector factory may use: the run's config, directory and store, whether the run is resumed (and
    which detector versions labelled it so far), ``sources`` of training episodes (reward/pipeline.py
    DetectorSources) and how to ``say`` and ``log`` what it does. The factory fills in the last three fields."""

    cfg: DictConfig
    run_dir: Path
    store: EpisodeStore
    resuming: bool
    detector_versions: list[str]
    sources: Any
    say: Callable[[str], None] = print
    log: Callable[[dict[str, Any]], None] = lambda row: None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    retrain: Callable[..., SuccessDetector] | None = None
    audited: bool = True


class DetectorUntrusted(RuntimeError):
    """The run's detector scored below ``detector.min_auroc`` on its held-out episodes: the run stops before the
    loop, keeping what it stored."""


def check_floor(cfg, metrics: dict, where: str) -> None:
    """Stop before the loop when the detector's held-out AUROC is below the floor (an undefined AUROC, held-out
    episodes of one class only, cannot be checked and passes with a warning in the detector's own line)."""
    auroc, floor = metrics.get("auroc"), cfg.detector.min_auroc
    if auroc is None or floor <= 0 or auroc >= floor:
        return
    raise DetectorUntrusted(
        f"the detector ({where}) separates success from failure on its {metrics.get('n', '?')} held-out episodes "
        f"with AUROC {auroc:.3f}, below the floor detector.min_auroc={floor:g}: its labels cannot be trusted, and "
        f"practice judged by them would teach the policy its mistakes. The run stops before the loop ({cfg.run_dir} "
        f"keeps the episodes and the detector). In a new run_dir, give it more or more varied episodes to learn "
        f"from (detector.policy_episodes, detector.demo_episodes, detector.steps), or a detector trained before "
        f"(detector.checkpoint=PATH; `flywheel reward train` and `flywheel reward eval` make and check one); to go "
        f"on regardless, detector.min_auroc=0")


SHIPPED = ("auto", "base")  # detector.checkpoint values that mean flywheel/assets/base_detector.safetensors


def misfit(cfg, detector, env: dict, same_env: bool = False) -> str:
    """Why a detector trained elsewhere cannot judge this run ("" if it can): made for another task family (``env``,
    as its checkpoint records it; older ones record none), or, with ``same_env``, in another environment or on
    nominal scenes for a run that randomises them (without it, a detector trained in simulation may judge the robot
    doing the same task); or judging from cameras the run does not record, or at another image size."""
    if env and (env.get("family") != cfg.env.family or (same_env and env.get("name") != cfg.env.name)):
        return (f"was trained to judge env.name={env.get('name')} env.family={env.get('family')}, and this run "
                f"practises env.name={cfg.env.name} env.family={cfg.env.family}")
    randomized = {k: float(v) for k, v in (cfg.env.randomize or {}).items() if v}
    if same_env and randomized and not env.get("randomize"):
        # judging randomised practice, the nominal shipped detector's recall fell to 0.62 (bench/RESULTS.md)
        return (f"was trained on nominal scenes, and this run practises under env.randomize={randomized}")
    net = detector.net.cfg
    if [s for s in net.sensors if s not in cfg.env.sensors] or net.image_size != cfg.env.image_size:
        return (f"judges {net.image_size}px frames from [{', '.join(net.sensors)}], and this run records "
                f"{cfg.env.image_size}px frames from [{', '.join(cfg.env.sensors)}] "
                f"(env.sensors=[{','.join(net.sensors)}] env.image_size={net.image_size} would record what it reads)")
    return ""


def _given_detector(cfg, say: Callable[[str], None]):
    """The detector ``detector.checkpoint`` gives, checked against the run -> (detector, its record), or None: one is
    to be trained. ``auto``: the shipped one where it fits the run, else None; anything else that does not fit is a
    ConfigError."""
    from reward.report import load_detector

    spec = cfg.detector.checkpoint
    if not spec:
        return None
    detector, meta = load_detector("base" if spec == "auto" else spec)
    reason = misfit(cfg, detector, meta.get("env") or {}, same_env=spec == "auto")
    if reason and spec == "auto":
        say(f"detector: the shipped one {reason}, so one is trained for this run (detector.checkpoint='' always "
            f"trains one)")
        return None
    if reason:
        raise ConfigError(f"detector.checkpoint={spec} {reason}: its verdicts would fail or mean nothing here. Train "
                          f"a detector for this run (detector.checkpoint=''), or give one trained on this task "
                          f"(`flywheel reward train`)")
    return detector, meta


def learned(ctx: DetectorContext) -> SuccessDetector:
    """flywheel's learned success detector: the one a resumed run labelled with last, else ``detector.checkpoint``
    (trained elsewhere, copied into the run), else one trained now on simulator-labelled episodes."""
    from reward.pipeline import adopt_detector, train_reward
    from reward.report import latest_detector, load_detector

    cfg, folder = ctx.cfg, ctx.run_dir / "detector"
    if ctx.resuming and list(folder.glob("detector-*.safetensors")):
        # the one that labelled last (a retrain the run did not get to use is not it), else the one it trained
        path = folder / f"{ctx.detector_versions[-1]}.safetensors" if ctx.detector_versions else \
            latest_detector(ctx.run_dir)
        detector, meta = load_detector(path)
        ctx.metrics = meta.get("heldout", {})
        ctx.say(f"detector: {detector.version}, as the run left it ({path})")
    elif given := _given_detector(cfg, ctx.say):
        detector, meta = given
        source = "base" if cfg.detector.checkpoint in SHIPPED else cfg.detector.checkpoint
        adopt_detector(detector, meta, source, ctx.run_dir)
        ctx.metrics = meta.get("heldout", {})
        auroc = ctx.metrics.get("auroc")
        named = "the one shipped for the tabletop (flywheel/assets/base_detector.json)" if source == "base" else source
        ctx.say(f"detector: {named}, held-out AUROC {'unknown' if auroc is None else f'{auroc:.3f}'}, copied into "
                f"{folder}")
    else:
        detector, ctx.metrics = train_reward(cfg, ctx.sources, ctx.say, store=ctx.store)
        ctx.log({f"detector/{k}": v for k, v in ctx.metrics.items() if v is not None})
    check_floor(cfg, ctx.metrics, detector.version)
    if cfg.audit.retrain or cfg.audit.retrain_every:
        ctx.retrain = lambda exclude=(): train_reward(cfg, ctx.sources, ctx.say, store=ctx.store, exclude=exclude)[0]
    return detector


def ground_truth(ctx: DetectorContext) -> SuccessDetector:
    """The simulator's own record judges (the upper bound a learned detector is measured by; simulation only)."""
    from reward.ground_truth import GroundTruthJudge

    ctx.say("detector: the simulator's ground truth judges practice (detector.name=ground_truth); none is trained")
    ctx.audited = False  # the truth needs no audit
    return GroundTruthJudge()


def people(ctx: DetectorContext) -> SuccessDetector:
    """The people at the robots judge (``detector.name=people``): an episode succeeded where a person said so, live
    on the robot page (its success) or later in its queue (a human label), and failed otherwise, as HIL-SERL's
    operators press "success" and let the rest time out. Nothing is trained; nothing audits it."""
    ctx.say("detector: the people at the robots judge practice (detector.name=people): what they did not call a "
            "success failed")
    ctx.audited = False  # they are the truth the audit checks against
    return PeopleJudge()


class PeopleJudge:
    """P(success) is 1 where a person judged the episode a success, else 0."""

    version = "people"
    threshold = 0.5

    def score(self, episodes, instructions: list[str] | None = None):
        import numpy as np

        if instructions is not None:
            raise ValueError("a person judged the instruction an episode was given, not another one")
        return np.array([float(bool(ep.trusted_success())) for ep in episodes], np.float32)

