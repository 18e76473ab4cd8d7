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


def pi0(checkpoint: str, eval_noise: float | None = None, tokenizer: str | None = None, asset_id: str | None = None,
        vlm: str = "train", lora_rank: int = 16, gradient_checkpointing: bool = False,
        autocast: bool = True) -> PolicyBundle:
    """``policy.name=pi0 policy.checkpoint=DIR``: a π0 or π0.5 checkpoint directory in openpi's file set, or
    LeRobot's (flywheel/vla/openpi.py). Its cameras are flywheel's overhead (openpi's base slot) and wrist (its left
    wrist slot) where its ``flywheel.json`` does not say otherwise; the environment's action dims are the first of
    the model's, as many as its action statistics have. ``tokenizer``: PaliGemma's SentencePiece file, where the
    checkpoint has none; ``asset_id``: whose norm stats, where it has several; the rest: ``Pi0Spec``'s (what fits
    one GPU), given as ``policy.options``."""
    from pathlib import Path

    from flywheel.vla import openpi
    from flywheel.vla.pi0_policy import Pi0Policy, Pi0Spec

    ck = openpi.load(checkpoint, asset_id)
    stats_dims = len(ck.norm_stats.get("actions", {}).get("mean", ()))
    spec = Pi0Spec(ck.cfg, str(openpi.find_tokenizer(Path(checkpoint), tokenizer)), ck.norm_stats,
                   sensors=tuple(ck.record.get("sensors", ("overhead",))),
                   action_dim=int(ck.record.get("action_dim", stats_dims or ck.cfg.action_dim)), vlm=vlm,
                   lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing, autocast=autocast)
    return PolicyBundle(weights={k: v.numpy() for k, v in ck.weights.items()}, sensors=spec.sensors,
                        meta=ck.record, make_model=functools.partial(Pi0Policy, spec),
                        make_actor=functools.partial(_pi0_actor, spec, eval_noise),
                        record={"pi0_checkpoint": str(Path(checkpoint).resolve()),
                                **({"state_dim": len(ck.norm_stats["state"]["mean"])} if "state" in ck.norm_stats
                                   else {})})


def _pi0_actor(spec, eval_noise: float | None) -> VLAPolicy:
    from flywheel.vla.pi0_policy import Pi0Policy

    return VLAPolicy(model=Pi0Policy(spec), eval_noise=eval_noise)
