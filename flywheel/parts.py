"""The parts of a run, built from its config: the policy, the environments' settings, the actors, the learner and
the detector. Each comes through a plug-in (flywheel/plugins.py), chosen by a registered name or an import path:
``policy.name``, ``env.name``, ``detector.name``, ``learner.algorithm``.

Seeds: each use of the training split draws its own range (``split_seed``), so no two uses share a layout.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig

from actors.expert import HARD_EXAMPLES
from actors.ray_actors import RolloutGroup
from actors.rollout import make_env, run_episodes
from actors.tabletop import TabletopEnv, split_seed
from flywheel import plugins
from flywheel.config import ConfigError, to_dict
from flywheel.contracts import Episode, Learner, PolicyBundle, PolicySnapshot, SuccessDetector
from flywheel.detectors import DetectorContext
from flywheel.store import EpisodeStore
from reward.pipeline import DetectorSources, ground_truth_labelled
from reward.pipeline import train_reward as train_detector_in
from learner.registry import make_learner

DEMO_SEEDS = 0  # pretraining demonstrations (the learner replays the same ones)
LOOP_SEEDS = 5_000_000
GATE_SEEDS = 1_000_000  # in the eval split, after the reported evaluation's: the promotion gate's own layouts
ROBUST_SEEDS = 2_000_000  # in the eval split: the robustness split's own layouts (eval.robust_episodes)


def loop_seed(index: int) -> int:
    return split_seed("train", LOOP_SEEDS + index)


def loop_seed_index(seed: int) -> int | None:
    """The practice episode index of a training seed (None for a seed of any other use)."""
    index = seed - loop_seed(0)
    return index if 0 <= index < split_seed("eval", 0) - loop_seed(0) else None


def resolve(kind: str, key: str, spec: str) -> Callable[..., Any]:
    """The plug-in ``spec`` of ``kind``, or a ConfigError that names the config ``key`` and the fix."""
    try:
        return plugins.resolve(kind, spec)
    except plugins.PluginError as e:
        raise ConfigError(f"{key}={spec!r}: {e}") from e


def policy_bundle(cfg: DictConfig) -> PolicyBundle:
    """The starting policy (``policy.name`` from ``policy.checkpoint``), acting in evaluation as ``eval.noise`` says."""
    factory = resolve("policy", "policy.name", cfg.policy.name)
    options = to_dict(cfg.policy.get("options", {}))
    try:
        bundle = factory(cfg.policy.checkpoint, cfg.eval.noise, **options)
    except TypeError as e:
        if options and "keyword argument" in str(e):
            raise ConfigError(f"policy.options={options}: {e}; the policy plug-in takes "
                              f"{list(inspect.signature(factory).parameters)[2:]}") from e
        raise
    if not isinstance(bundle, PolicyBundle):
        raise ConfigError(f"policy.name={cfg.policy.name!r} returned a {type(bundle).__name__}, not the "
                          f"flywheel.contracts.PolicyBundle a policy plug-in gives the run")
    return bundle


def env_kwargs_of(cfg: DictConfig) -> dict:
    return to_dict(cfg.env)  # EnvConfig's fields are run_episodes' environment arguments


def held_out_randomize(cfg: DictConfig) -> dict[str, float] | None:
    """The robustness split's randomisation (``eval.robust``), or None where it is off: ``eval.robust_episodes=0``,
    or an environment whose plug-in takes no ``randomize`` (Meta-World, a robot), which could not apply it."""
    if cfg.eval.robust_episodes <= 0 or "randomize" not in plugins.accepted(
            plugins.resolve("env", cfg.env.name), {"randomize": None}):
        return None
    return to_dict(cfg.eval.robust)


def check_env(env_kwargs: dict) -> None:
    """A ConfigError, before anything starts, when the environment the config names cannot be made (an unknown
    plug-in, a task family or a simulator's task that does not exist): one is made here, with the run's settings,
    and closed. Otherwise the environment's own error came as a traceback from deep inside the first collection."""
    resolve("env", "env.name", env_kwargs.get("name", "tabletop"))
    try:
        env = make_env(**{k: v for k, v in env_kwargs.items() if k != "execute"})  # run_episodes' argument alone
    except (ValueError, TypeError, ConnectionError) as e:  # TypeError: an env.options key the plug-in lacks
        raise ConfigError(f"the environment of env.name={env_kwargs.get('name')!r} env.family="
                          f"{env_kwargs.get('family')!r} cannot be made: {e}") from e
    env.close()


def makes_hard_examples(env_kwargs: dict) -> tuple[str, ...]:
    """The kinds of hard examples the scripted expert can make in these environments (the built-in tabletop's)."""
    return HARD_EXAMPLES if plugins.resolve("env", env_kwargs.get("name", "tabletop")) is TabletopEnv else ()


def pretraining_demos(n: int, base_meta: dict, env_kwargs: dict, demos_from: str = "",
                      demo_keys: dict | None = None) -> list[Episode]:
    """The demonstrations the base was pretrained on (the first ``n``), for the learner to replay: those of the
    LeRobot dataset ``demos_from`` (``learner.demos_from``: a team's own, for a policy flywheel did not pretrain),
    else of the one the base's record names, else the scripted expert's.

    They are remade from the environment settings the base's record names (its family, phrasing and combinations),
    not the run's: a run on held-out combinations must not hand the learner expert demonstrations of them, or a gain
    would come from those demonstrations rather than from practice. Without a record, the run's settings serve."""
    made_with = base_meta.get("config") or {}
    if demos_from or made_with.get("demos_from"):  # a LeRobot dataset's episodes
        from flywheel.pretrain import dataset_demos

        return dataset_demos(demos_from or made_with["demos_from"],
                             (demo_keys if demos_from else made_with.get("demo_keys")) or {}, n, env_kwargs)
    recorded = made_with.get("env") or {}
    demo_env = {**env_kwargs, **{k: recorded[k] for k in ("family", "phrasing", "combos") if k in recorded}}
    if env_kwargs.get("name") == "robot":  # no scripted expert on a robot: remade in the simulator the base learned in
        demo_env = {**{k: v for k, v in recorded.items() if k != "execute"}, "name": recorded.get("name", "tabletop")}
    seeds = [split_seed("train", DEMO_SEEDS + i) for i in range(n)]
    return run_episodes(seeds, "train", None, policy_version=-1,
                        expert={"operators": list(made_with.get("operators") or ["standard"])}, **demo_env)


def make_rollouts(cfg: DictConfig, bundle: PolicyBundle) -> RolloutGroup:
    """The rollout actors (Ray actors, or in-process workers with ``rollout.use_ray=false``). The person standing by
    in practice (``rollout.corrections``) is one of the base's demonstrators; a coach (``rollout.coaching``) speaks
    to a policy with a subtask head."""
    people = {"corrections": cfg.rollout.corrections, "after": cfg.rollout.correct_after,
              "coaching": cfg.rollout.coaching,
              "operators": list((bundle.meta.get("config") or {}).get("operators") or ["standard"])}
    standing_by = {"people": people} if cfg.rollout.corrections > 0 or cfg.rollout.coaching > 0 else {}
    robust = held_out_randomize(cfg)
    env = {**env_kwargs_of(cfg), **standing_by, **({"held_out_randomize": robust} if robust else {})}
    return RolloutGroup(bundle.make_actor, env, num_workers=cfg.rollout.num_workers,
                        use_ray=cfg.rollout.use_ray, cpus_per_worker=cfg.rollout.cpus_per_worker,
                        call_timeout_s=cfg.rollout.call_timeout_s, resources=to_dict(cfg.rollout.resources),
                        trim_idle_s=cfg.rollout.trim_idle_s)


def build_learner(options: dict[str, Any], seed: int, bundle: PolicyBundle | None, demo_env: dict,
                  device: str = "cpu") -> Learner:
    """The run's learner at version 0, on ``device`` ("auto": a GPU if there is one): the starting weights, its
    pretraining demonstrations to replay, and the algorithm's options. Module-level, so that a learner actor on
    another node can build it from a pickled partial."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"placement.device={device}, but the learner's process sees no GPU (torch "
                          f"{torch.__version__}, CUDA {torch.version.cuda}): use placement.device=auto or cpu, or run "
                          f"the learner on a GPU node (placement.remote=true placement.gpus=1)")
    model = bundle.make_model()
    model.load_weights(bundle.weights)
    options = dict(options)
    factory = resolve("learner", "learner.algorithm", options.pop("algorithm"))
    demos = pretraining_demos(options.pop("demos"), bundle.meta, demo_env, options.pop("demos_from", ""),
                              options.pop("demo_keys", None))
    own = options.pop("options", {})  # learner=custom: a team's learner's keyword arguments
    try:
        return make_learner(factory, model.to(device), demos, strict=True, version=0, seed=seed, **options, **own)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def detector_sources(cfg: DictConfig, rollouts: Callable[[], RolloutGroup], bundle: PolicyBundle) -> DetectorSources:
    """Where the detector's training episodes come from: the starting policy on the actors, the scripted expert in
    this process (its hard examples where it makes them)."""
    env_kwargs = env_kwargs_of(cfg)

    def demonstrate(seeds: list[int], hard: str | None = None) -> list[Episode]:
        return run_episodes(seeds, "train", None, policy_version=-1, expert={"hard": hard}, **env_kwargs)

    return DetectorSources(rollouts=rollouts, demonstrate=demonstrate, seed=functools.partial(split_seed, "train"),
                           policy_weights=bundle.weights, policy_sensors=bundle.sensors,
                           hard_examples=makes_hard_examples(env_kwargs))


def choose_detector(ctx: DetectorContext) -> SuccessDetector:
    """The detector ``detector.name`` names, built by its factory (flywheel/detectors.py says what it gets)."""
    detector = resolve("detector", "detector.name", ctx.cfg.detector.name)(ctx)
    for needed in ("version", "threshold", "score"):
        if not hasattr(detector, needed):
            raise ConfigError(f"detector.name={ctx.cfg.detector.name!r} returned a {type(detector).__name__} without "
                              f"{needed!r}: a detector has the SuccessDetector contract (flywheel/contracts.py)")
    return detector


def train_reward(cfg: DictConfig, say: Callable[[str], None] = print, progress=None, offline: bool = False):
    """``flywheel reward train``: a detector trained on ``run_dir``'s labelled episodes, or on new ones made there
    (the starting policy acting in this process) -> (detector, held-out metrics)."""
    check_env(env_kwargs_of(cfg))
    bundle = policy_bundle(cfg)

    @functools.cache
    def rollouts() -> RolloutGroup:
        group = RolloutGroup(bundle.make_actor, env_kwargs_of(cfg), num_workers=1, use_ray=False)
        group.publish(PolicySnapshot(0, bundle.weights))
        return group

    return train_detector_in(cfg, detector_sources(cfg, rollouts, bundle), say,
                             store=EpisodeStore(Path(cfg.run_dir) / "episodes"), progress=progress, offline=offline)


def write_demos(cfg: DictConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """``flywheel demos``: the scripted expert's episodes, labelled by the simulator, appended to ``cfg.out_dir``.

    Seeds already in the store are skipped, so running it again (or after an interruption) adds only what is
    missing."""
    store = EpisodeStore(Path(cfg.out_dir))
    have = {ep.seed for ep in store.iter(cfg.split)}
    seeds = [s for s in (split_seed(cfg.split, cfg.first + i) for i in range(cfg.episodes)) if s not in have]
    episodes = ground_truth_labelled(run_episodes(seeds, cfg.split, None, policy_version=-1,
                                                  expert={"noise": cfg.noise, "operators": list(cfg.operators)},
                                                  **env_kwargs_of(cfg)))
    for ep in episodes:
        store.add(ep)
    done = {"written": len(episodes), "already_there": cfg.episodes - len(seeds), "store": str(cfg.out_dir),
            "success": float(np.mean([ep.ground_truth["success"] for ep in episodes])) if episodes else None,
            "per_family": {f: sum(ep.task == f for ep in episodes) for f in sorted({ep.task for ep in episodes})}}
    say(f"demos: {done}")
    return done
