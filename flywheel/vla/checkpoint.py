"""Loading and saving the small VLA: weights + the VLAConfig that shapes them, in one safetensors file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flywheel.checkpoint import CheckpointError, load_weights, save_weights
from flywheel.vla.model import SmallVLA, VLAConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BASE = ASSETS / "base_vla.safetensors"


def resolve(spec: str) -> Path:
    """``base`` -> the shipped pretrained checkpoint; ``base:NAME`` -> the shipped ``flywheel/assets/NAME_vla``
    (``base:metaworld_button``: the base for Meta-World's button-press-topdown); anything else is a path."""
    if spec == "base":
        return BASE
    if spec.startswith("base:"):
        return ASSETS / f"{spec[5:]}_vla.safetensors"
    return Path(spec).expanduser()


def save_policy(path: str | Path, model: SmallVLA, meta: dict[str, Any]) -> Path:
    return save_weights(path, model.get_weights(), {**meta, "vla_config": dataclasses.asdict(model.cfg)})


def load_policy_checkpoint(spec: str, as_model: bool = False, subtask_head: bool = False):
    """-> (VLAConfig, weights, meta), or (SmallVLA, meta) with ``as_model``; with ``subtask_head`` as well, the model
    gains a new, untrained subtask head where the checkpoint has none. Errors say what is wrong and the fix."""
    path = resolve(spec)
    shipped = sorted(p.name[: -len("_vla.safetensors")] for p in ASSETS.glob("*_vla.safetensors"))
    if spec.startswith("base:") and not path.exists() and not path.with_suffix(".json").exists():
        name = spec[len("base:"):]
        raise CheckpointError(
            f"there is no shipped base {spec!r}: the shipped ones are policy.checkpoint=base and "
            + ", ".join(f"base:{n}" for n in shipped if n != "base")
            + f". To ship one of your own, pretrain it with export=flywheel/assets/{name}_vla.safetensors; anyone can "
            f"then rebuild it with the command recorded in {name}_vla.json.")
    if spec.startswith("base") and not path.exists():
        raise CheckpointError(
            f"the shipped base checkpoint {path} is missing. Restore it with `git checkout -- "
            f"flywheel/assets/{path.name}`, or rebuild it with the command recorded in flywheel/assets/"
            f"{path.with_suffix('.json').name}."
        )
    weights, meta = load_weights(path)
    if "vla_config" not in meta:
        raise CheckpointError(f"{path} has no vla_config in its metadata: it was not written by flywheel's VLA")
    cfg = VLAConfig(**meta["vla_config"])
    if not as_model:
        return cfg, weights, meta
    model = SmallVLA(dataclasses.replace(cfg, subtask_head=cfg.subtask_head or subtask_head))
    try:
        missing, unexpected = model.load_weights(weights, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the VLA its metadata describes: {e}") from e
    if unexpected or any(not (k.startswith("subtasker.") and not cfg.subtask_head) for k in missing):
        raise CheckpointError(f"{path} does not fit the VLA its metadata describes: it lacks {missing[:3]} and has "
                              f"{unexpected[:3]} besides")
    return model, meta
