"""openpi's PyTorch checkpoint files, read and written, and LeRobot's pi0 layout read through a key map.

The file set openpi writes (``examples/convert_jax_model_to_pytorch.py``, and its PyTorch training)::

    CHECKPOINT/model.safetensors                 the weights, named as flywheel/vla/pi0.py names them
    CHECKPOINT/config.json                       action_dim, action_horizon, paligemma_variant,
                                                 action_expert_variant, precision
    CHECKPOINT/assets/<asset id>/norm_stats.json {"norm_stats": {"state": {mean, std, q01, q99}, "actions": {...}}}

plus what flywheel needs besides: the PaliGemma SentencePiece tokenizer (openpi downloads it at first use; here it
must be a local file: ``paligemma_tokenizer.model`` or ``tokenizer.model`` in the checkpoint or given by path), and,
where flywheel wrote the checkpoint, ``flywheel.safetensors`` (its advantage indicator, kept out of
``model.safetensors`` so that openpi's strict loader still reads the file) and ``flywheel.json`` (the cameras it
reads, the environment's action dims, the asset id).

LeRobot's pi0/pi05 checkpoints (``model.safetensors`` whose names start with ``model.``, ``config.json`` with
``type``, ``chunk_size``, ``max_action_dim``, and normalisation in ``*normalizer_processor.safetensors``) are read
through ``LEROBOT_KEYS``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flywheel.checkpoint import CheckpointError
from flywheel.vla.pi0 import SIGLIP, Pi0, Pi0Config

# Names in a checkpoint that the model has no use for: the action expert's language-model head (openpi's PyTorch
# model keeps an untrained one) and PaliGemma's, which is the embedding itself (tied).
UNUSED = ("paligemma_with_expert.gemma_expert.lm_head.weight", "paligemma_with_expert.paligemma.lm_head.weight")
EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
FLYWHEEL_EXTRA = "flywheel.safetensors"
RECORD = "flywheel.json"
# LeRobot's names -> openpi's: its policy holds the model as ``model``; LeRobot before 0.4 nested PaliGemma's parts
# as transformers 4.4x did; and its π0 may name the time MLP as π0.5 does.
LEROBOT_KEYS = (
    (r"^model\.", ""),
    (r"paligemma\.language_model\.model\.", "paligemma.model.language_model."),
    (r"paligemma\.language_model\.lm_head\.", "paligemma.lm_head."),
    (r"paligemma\.vision_tower\.", "paligemma.model.vision_tower."),
    (r"paligemma\.multi_modal_projector\.", "paligemma.model.multi_modal_projector."),
)


class Pi0CheckpointError(CheckpointError, ValueError):
    """A π0 checkpoint that cannot be loaded; the message names the file or the key and what to do (the command
    line prints it, as it does any CheckpointError, without a traceback)."""


def read_config(directory: Path, weights: dict[str, torch.Tensor]) -> Pi0Config:
    """``config.json`` (openpi's or LeRobot's), completed from the weights' names and shapes where it is silent."""
    path = directory / "config.json"
    if not path.is_file():
        raise Pi0CheckpointError(f"{path} is missing: an openpi checkpoint has config.json beside model.safetensors "
                                 f"(action_dim, action_horizon, paligemma_variant, action_expert_variant, precision)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Pi0CheckpointError(f"{path} is not valid JSON ({e}): restore it from the checkpoint's source") from e
    if "type" in raw:  # LeRobot's PI0Config / PI05Config
        raw = {"action_dim": raw.get("max_action_dim", 32), "action_horizon": raw.get("chunk_size", 50),
               "paligemma_variant": raw.get("paligemma_variant", "gemma_2b"),
               "action_expert_variant": raw.get("action_expert_variant", "gemma_300m"),
               "precision": raw.get("dtype", "float32"), "pi05": raw["type"] == "pi05",
               "max_token_len": raw.get("tokenizer_max_length", 200 if raw["type"] == "pi05" else 48),
               "flow_steps": raw.get("num_inference_steps", 10),
               **{k: raw[k] for k in ("vision_variant", "vocab_size") if k in raw}}
    known = set(Pi0Config.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise Pi0CheckpointError(f"{path} has keys {unknown} that a π0 config does not: expected {sorted(known)}")
    if "pi05" not in raw:  # openpi's config.json does not say; the weights do
        raw["pi05"] = "time_mlp_in.weight" in weights and "state_proj.weight" not in weights
        raw.setdefault("max_token_len", 200 if raw["pi05"] else 48)
    raw.update({k: v for k, v in shapes_of(weights).items() if k not in raw})
    try:
        return Pi0Config(**raw)
    except (TypeError, ValueError) as e:
        raise Pi0CheckpointError(f"{path}: {e}") from e


def shapes_of(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The vocabulary and the vision tower that the weights' shapes say (for config.json files that do not)."""
    found: dict[str, Any] = {}
    embed = weights.get(EMBED, weights.get(UNUSED[1]))
    if embed is not None:
        found["vocab_size"] = int(embed.shape[0])
    stem = "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings."
    patch, where = weights.get(stem + "patch_embedding.weight"), weights.get(stem + "position_embedding.weight")
    if patch is not None and where is not None:
        for name, s in SIGLIP.items():
            if (s.width, s.patch, (s.image // s.patch) ** 2) == (patch.shape[0], patch.shape[-1], where.shape[0]):
                found["vision_variant"] = name
    return found


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise Pi0CheckpointError(f"{path} is missing: a π0 checkpoint directory holds model.safetensors")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise Pi0CheckpointError(f"{path} is damaged or not a safetensors file ({e}): copy the checkpoint again "
                                 f"from where it came from") from e


def lerobot_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LeRobot's names as openpi's (``LEROBOT_KEYS``)."""
    renamed = {}
    for name, tensor in weights.items():
        for pattern, replacement in LEROBOT_KEYS:
            name = re.sub(pattern, replacement, name)
        renamed[name] = tensor
    return renamed


def match_weights(model: Pi0, weights: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as ``model.load_state_dict`` takes them: every parameter present with its shape
    (an error names the first missing, unexpected or misshapen ones), unused names dropped, float32 on a CPU."""
    weights = dict(weights)
    if EMBED not in weights and UNUSED[1] in weights:  # the tied embedding saved under the head's name
        weights[EMBED] = weights[UNUSED[1]]
    if not model.cfg.pi05:  # π0 written with π0.5's time-MLP names (LeRobot's conversion does this)
        for old, new in (("time_mlp_in.", "action_time_mlp_in."), ("time_mlp_out.", "action_time_mlp_out.")):
            for name in [n for n in weights if n.startswith(old)]:
                weights[new + name[len(old):]] = weights.pop(name)
    for name in UNUSED:
        weights.pop(name, None)
    for name, tensor in model.state_dict().items():  # flywheel's own parameters start at zero (no effect)
        if name.startswith("flywheel_") and name not in weights:
            weights[name] = torch.zeros(tensor.shape)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise Pi0CheckpointError(
            f"{source} does not fit {_describe(model.cfg)}: " + "; ".join(
                part for part in (f"missing {len(missing)} keys, e.g. {missing[:3]}" if missing else "",
                                  f"unexpected {len(unexpected)} keys, e.g. {unexpected[:3]}" if unexpected else "")
                if part) + ". Check config.json's variants against the weights, or the layout (openpi or LeRobot)")
    for name, tensor in weights.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise Pi0CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, {_describe(model.cfg)} "
                                     f"expects {tuple(expected[name].shape)}: config.json does not match the weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise Pi0CheckpointError(f"{source}: {name} holds NaN or inf: the checkpoint is damaged (or training "
                                     f"diverged); use an earlier one")
    return {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def _describe(cfg: Pi0Config) -> str:
    return (f"{'π0.5' if cfg.pi05 else 'π0'} ({cfg.paligemma_variant} + {cfg.action_expert_variant}, vision "
            f"{cfg.vision_variant}, action_dim {cfg.action_dim})")


def read_norm_stats(directory: Path, asset_id: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``assets/<asset id>/norm_stats.json`` (the only one, or ``asset_id``'s) -> {"state"|"actions": {stat: array}};
    LeRobot's normaliser file where that is what the checkpoint has; {} where it has neither."""
    found = sorted((directory / "assets").glob("*/norm_stats.json"))
    if asset_id is not None:
        found = [p for p in found if p.parent.name == asset_id]
        if not found:
            raise Pi0CheckpointError(f"{directory}/assets/{asset_id}/norm_stats.json is missing")
    if len(found) > 1:
        raise Pi0CheckpointError(f"{directory}/assets holds norm stats for {[p.parent.name for p in found]}: name "
                                 f"the robot's with policy.asset_id")
    if found:
        try:
            stats = json.loads(found[0].read_text())["norm_stats"]
            return {key: {s: np.asarray(v, np.float32) for s, v in entry.items() if v is not None}
                    for key, entry in stats.items()}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Pi0CheckpointError(f"{found[0]} is not openpi's norm-stats file ({e!r}): expected "
                                     f'{{"norm_stats": {{"state": {{"mean": [...], ...}}, "actions": ...}}}}') from e
    lerobot = sorted(directory.glob("*normalizer_processor.safetensors"))
    if lerobot:
        from safetensors.numpy import load_file

        flat = load_file(str(lerobot[0]))
        out: dict[str, dict[str, np.ndarray]] = {}
        for name, array in flat.items():
            feature, _, stat = name.rpartition(".")
            key = {"observation.state": "state", "action": "actions"}.get(feature)
            if key:
                out.setdefault(key, {})[stat] = array.astype(np.float32)
        return out
    return {}


def find_tokenizer(directory: Path, given: str | None = None) -> Path:
    candidates = [Path(given)] if given else [directory / n for n in ("paligemma_tokenizer.model", "tokenizer.model")]
    for path in candidates:
        if path.is_file():
            return path
    raise Pi0CheckpointError(
        f"no tokenizer for the π0 checkpoint in {directory}: put PaliGemma's SentencePiece model there as "
        f"paligemma_tokenizer.model (openpi fetches it from gs://big_vision/paligemma_tokenizer.model), or name "
        f"it with policy.tokenizer=PATH" if not given else f"tokenizer {given} is missing")


@dataclasses.dataclass
class Pi0Checkpoint:
    cfg: Pi0Config
    weights: dict[str, torch.Tensor]  # ready for ``Pi0.load_state_dict`` (float32)
    norm_stats: dict[str, dict[str, np.ndarray]]
    record: dict[str, Any]  # flywheel.json where flywheel wrote the checkpoint: sensors, the env's action dims


def load(directory: str | Path, asset_id: str | None = None) -> Pi0Checkpoint:
    """An openpi or LeRobot checkpoint directory, checked against the model its config describes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise Pi0CheckpointError(f"{directory} is not a directory: policy.checkpoint names a π0 checkpoint directory "
                                 f"(model.safetensors, config.json, assets/). To try one without weights: flywheel "
                                 f"pretrain model=pi0 out_dir=DIR, then policy.checkpoint=DIR/base_pi0")
    weights = read_weights(directory / "model.safetensors")
    if any(name.startswith("model.") for name in weights):
        weights = lerobot_names(weights)
    if (directory / FLYWHEEL_EXTRA).is_file():
        weights.update(read_weights(directory / FLYWHEEL_EXTRA))
    cfg = read_config(directory, weights)
    with torch.device("meta"):
        shapes = Pi0(cfg)
    record = json.loads((directory / RECORD).read_text()) if (directory / RECORD).is_file() else {}
    return Pi0Checkpoint(cfg, match_weights(shapes, weights, str(directory / "model.safetensors")),
                         read_norm_stats(directory, asset_id or record.get("asset_id")), record)


def save(directory: str | Path, model: Pi0, norm_stats: dict[str, dict[str, np.ndarray]] | None = None,
         asset_id: str = "flywheel", tokenizer: str | Path | None = None, record: dict | None = None) -> Path:
    """Write ``model`` as openpi does (its precision, its names), its norm stats under ``assets/<asset_id>``, and
    flywheel's own parameters and ``record`` beside them. Each file is written to a temporary name and renamed."""
    from safetensors.torch import save_file

    directory = Path(directory)
    (directory / "assets" / asset_id).mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = torch.bfloat16 if cfg.precision == "bfloat16" else torch.float32
    state = {k: v.detach() for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, module in model.named_modules():  # low-rank adapters folded into their weights, as openpi reads them
        if hasattr(module, "merged"):
            state[name + ".weight"] = module.merged().detach()
    state = {k: v.to("cpu", dtype).contiguous() for k, v in state.items()}
    ours = {k: state.pop(k).float() for k in [k for k in state if k.startswith("flywheel_")]}
    _atomic(directory / "model.safetensors", lambda p: save_file(state, str(p)))
    _atomic(directory / FLYWHEEL_EXTRA, lambda p: save_file(ours, str(p)))
    fields = {"action_dim": cfg.action_dim, "action_horizon": cfg.action_horizon,
              "paligemma_variant": cfg.paligemma_variant, "action_expert_variant": cfg.action_expert_variant,
              "precision": cfg.precision}
    extra = {k: getattr(cfg, k) for k in ("pi05", "vision_variant", "vocab_size", "max_token_len", "flow_steps",
                                          "image_slots")
             if getattr(cfg, k) != Pi0Config.__dataclass_fields__[k].default}
    _atomic(directory / "config.json", lambda p: p.write_text(json.dumps({**fields, **extra}, indent=2)))
    if norm_stats:
        stats = {"norm_stats": {k: {s: np.asarray(v).tolist() for s, v in entry.items()}
                                for k, entry in norm_stats.items()}}
        _atomic(directory / "assets" / asset_id / "norm_stats.json", lambda p: p.write_text(json.dumps(stats)))
    _atomic(directory / RECORD, lambda p: p.write_text(json.dumps({"asset_id": asset_id, **(record or {})},
                                                                    indent=2)))
    if tokenizer is not None and Path(tokenizer).resolve() != (directory / "paligemma_tokenizer.model").resolve():
        data = Path(tokenizer).read_bytes()
        _atomic(directory / "paligemma_tokenizer.model", lambda p: p.write_bytes(data))
    return directory


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
