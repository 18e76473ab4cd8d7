"""The small VLA as a policy plug-in (``policy.name=small_vla``, the default): what ``flywheel run`` needs of it."""

from __future__ import annotations

import dataclasses
import functools

from flywheel.contracts import PolicyBundle
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import SmallVLA, VLAPolicy


def small_vla(checkpoint: str = "base", eval_noise: float | None = None) -> PolicyBundle:
    """``checkpoint``: "base" (the shipped one), "base:NAME", or a path to a .safetensors file flywheel wrote.
    ``eval_noise``: how it acts in evaluation (``eval.noise``)."""
    cfg, weights, meta = load_policy_checkpoint(checkpoint)
    return PolicyBundle(weights=weights, sensors=tuple(cfg.sensors), meta=meta,
                        make_model=functools.partial(SmallVLA, cfg),
                        make_actor=functools.partial(VLAPolicy, cfg, eval_noise=eval_noise),
                        record={"vla_config": dataclasses.asdict(cfg)})
