"""Plug-ins: the parts a team brings, chosen by config. This module imports nothing else of the project.

Each kind of part (``policy``, ``env``, ``detector``, ``learner``) is named in the config by a registered name
(``env.name=metaworld``) or by an import path, ``module:factory`` as Hydra's ``_target_`` names one
(``env.name=my_lab.sims:make_env``). Either way it is imported only when a run uses it, so an optional dependency
loads only then, and a missing one says which extra to install. The built-in parts are entries like any other::

    from flywheel import plugins
    plugins.register("env", "my_sim", "my_lab.sims:make_env")   # then env.name=my_sim
    make = plugins.resolve("env", "my_sim")                     # the factory, imported now

What each factory is called with and must return is the kind's contract (``KINDS`` below, and the README's
"Bring your own").
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

KINDS = {
    "policy": "a function (checkpoint path, run config dict) -> flywheel.policy.PolicyBundle: the model the learner "
              "trains (TrainablePolicy) and how the actors build one to act with",
    "env": "a gymnasium.Env factory: called with the env config keys it declares (family, image_size, max_steps, "
           "sensors, ...); observations {'image': uint8 (H, W, 3), 'proprio': float32 (P,)}, info['instruction'], and "
           "info['success'] where the environment can judge itself",
    "detector": "a function (run layer context) -> a SuccessDetector (flywheel.contracts)",
    "robot": "a factory -> an actors.robot.Robot driver (observe, send, hold, estop, reset, close; action_dim), given "
             "those of family, image_size, sensors and rate_hz it declares; env.name=robot puts it behind the "
             "safety layer",
    "learner": "a class or function (model, demos, *, version, seed, **its options) -> a Learner (flywheel.contracts)",
}

# Registered names -> import paths (or, registered in this process, the factories themselves). Nothing here is
# imported until a run names it.
REGISTRY: dict[str, dict[str, str | Callable[..., Any]]] = {
    "policy": {"small_vla": "flywheel.vla.bundle:small_vla", "pi0": "flywheel.vla.bundle:pi0",
               "remote": "flywheel.remote:remote", "dsrl": "flywheel.dsrl:dsrl"},
    "env": {"tabletop": "actors.tabletop:TabletopEnv", "metaworld": "actors.thirdparty:make_metaworld",
            "fetch": "actors.thirdparty:make_fetch", "libero": "actors.libero:make_libero",
            "robot": "actors.robot:make_robot_env"},
    "detector": {"learned": "flywheel.detectors:learned", "ground_truth": "flywheel.detectors:ground_truth",
                 "people": "flywheel.detectors:people"},
    "robot": {"sim": "actors.sim_robot:SimRobot", "so101": "actors.sim_robot:so101"},
    "learner": {"filtered_bc": "learner.filtered_bc:FilteredBCLearner", "recap": "learner.recap:RecapLearner",
                "ppo": "learner.ppo:PPOLearner", "residual_ppo": "learner.residual_ppo:ResidualPPOLearner",
                "imitation": "learner.imitation:ImitationLearner"},
}

# A module that is missing -> the extra of pyproject.toml that brings it.
EXTRAS = {"metaworld": "sims", "mujoco": "sims", "gymnasium_robotics": "sims"}


class PluginError(ValueError):
    """A part the config names that cannot be found or imported; the message says how to fix it."""


def register(kind: str, name: str, target: str | Callable[..., Any]) -> None:
    """Make ``name`` mean the import path ``target`` ("module:attribute") for parts of ``kind``, or the factory
    itself (known to this process only: a part built in a Ray actor needs an import path)."""
    _check_kind(kind)
    if isinstance(target, str) and ":" not in target:
        raise PluginError(f"{kind} plug-in {name!r}: {target!r} is not an import path; give 'module:factory'")
    REGISTRY[kind][name] = target


def registered(kind: str) -> list[str]:
    _check_kind(kind)
    return sorted(REGISTRY[kind])


def is_import_path(spec: str) -> bool:
    return ":" in spec


def resolve(kind: str, spec: str) -> Callable[..., Any]:
    """The factory ``spec`` names (a registered name or "module:factory"), imported now."""
    _check_kind(kind)
    target = REGISTRY[kind].get(spec, spec)
    if callable(target):
        return target
    if ":" not in target:
        raise PluginError(f"{kind}={spec!r} is neither a registered {kind} ({', '.join(registered(kind))}) nor an "
                          f"import path 'module:factory' (the module on PYTHONPATH)")
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing in EXTRAS:
            raise PluginError(f"{kind}={spec!r} needs {missing}, which is not installed: pip install -e "
                              f"'.[{EXTRAS[missing]}]' (make sims)") from e
        where = "" if missing != module_name.split(".")[0] else " (is its directory on PYTHONPATH?)"
        raise PluginError(f"{kind}={spec!r}: cannot import {module_name}: {e}{where}") from e
    try:
        factory = module
        for part in attribute.split("."):
            factory = getattr(factory, part)
    except AttributeError as e:
        raise PluginError(f"{kind}={spec!r}: {module_name} has no {attribute!r}") from e
    if not callable(factory):
        raise PluginError(f"{kind}={spec!r}: {target} is not callable; {kind} plug-ins are {KINDS[kind]}")
    return factory


def call_with_accepted(factory: Callable[..., Any], kwargs: dict[str, Any], *args: Any) -> Any:
    """``factory(*args, **kwargs)`` with only the keyword arguments it declares (all of them if it takes
    ``**kwargs``): an environment's factory is given the env config keys it knows."""
    return factory(*args, **accepted(factory, kwargs))


def accepted(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Those of ``kwargs`` that ``factory`` declares (all of them if it takes ``**kwargs`` or has no signature)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it everything
        return dict(kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(kwargs)
    names = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in kwargs.items() if k in names}


def _check_kind(kind: str) -> None:
    if kind not in REGISTRY:
        raise PluginError(f"unknown kind of plug-in {kind!r}: one of {sorted(REGISTRY)}")
