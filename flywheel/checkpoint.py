"""Checkpoints: safetensors weights with JSON metadata in the header, written atomically, last K kept.

safetensors rather than pickle: loading cannot run code, the header is checked against the file size (a file cut
short is detected, not half-loaded), and other tools (and other frameworks) read it.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from flywheel.store import atomic_write_bytes


def numpy_state(module) -> dict[str, np.ndarray]:
    """A torch module's state dict as numpy arrays (copies): what checkpoints and snapshots carry."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or holds non-finite weights."""


def save_weights(path: str | os.PathLike, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``weights`` and ``meta`` (JSON-able) to ``path`` atomically. Refuses non-finite weights."""
    bad = [k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to save {path}: NaN/inf in {bad[:5]} - the last good checkpoint is kept")
    path = Path(path)
    data = st_save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata={"flywheel": json.dumps(meta)})
    atomic_write_bytes(path, data)
    return path


def load_weights(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by ``save_weights``: (weights, meta). Errors name the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist. Check the path, or run `flywheel pretrain` to make a base checkpoint."
        )
    raw = path.read_bytes()
    try:
        weights = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("flywheel", "{}"))
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is damaged or cut short ({e}). Use an earlier checkpoint from the same folder, or "
            f"the shipped base (policy.checkpoint=base)."
        ) from e
    bad = [k for k, v in weights.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"checkpoint {path} holds NaN/inf weights in {bad[:5]}. It cannot be used; load an earlier checkpoint."
        )
    return weights, meta


class CheckpointDir:
    """``<dir>/<prefix>-<number>.safetensors``, keeping the newest ``keep``. Numbers are versions or steps.

    Beside each, optionally, ``<prefix>-<number>.state.pt``: the trainer's state (optimizer moments, random
    generators, a learner's value network; tensors and plain values, read with ``torch.load(weights_only=True)``,
    which cannot run code). It is written before the weights, so a checkpoint whose weights are on disk is complete.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "policy", keep: int = 3,
                 meta: dict[str, Any] | None = None):
        """``meta``: what every checkpoint's metadata carries besides its own (a run's: the VLA's config, so that
        any of its checkpoints is a ``policy.checkpoint`` for the next run)."""
        self.dir = Path(directory)
        self.prefix = prefix
        self.keep = keep
        self.meta = dict(meta or {})
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)\.safetensors$")

    def path(self, number: int) -> Path:
        return self.dir / f"{self.prefix}-{number:06d}.safetensors"

    def state_path(self, number: int) -> Path:
        return self.dir / f"{self.prefix}-{number:06d}.state.pt"

    def numbers(self) -> list[int]:
        if not self.dir.exists():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := self._pattern.match(p.name)))

    def save(self, number: int, weights: dict[str, np.ndarray], meta: dict[str, Any], state: dict | None = None,
             keep_also: tuple[int, ...] = ()) -> Path:
        """Write checkpoint ``number`` (and its trainer ``state``), then delete all but the newest ``keep`` and
        those in ``keep_also`` (a run keeps the version its actors run and its best, whatever their age)."""
        import torch

        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(self.state_path(number), buf.getvalue())
        path = save_weights(self.path(number), weights, {**self.meta, **meta, "number": number})
        for old in self.numbers()[: -self.keep]:
            if old not in keep_also:
                self.path(old).unlink(missing_ok=True)
                self.state_path(old).unlink(missing_ok=True)
        return path

    def load(self, number: int, with_state: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any], dict | None]:
        """(weights, meta, trainer state or None). CheckpointError if it is missing, damaged or, ``with_state``,
        has no readable state."""
        weights, meta = load_weights(self.path(number))
        if not with_state:
            return weights, meta, None
        import torch

        path = self.state_path(number)
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing: checkpoint {number} cannot resume training") from e
        except Exception as e:  # a damaged file: torch raises RuntimeError, pickle's UnpicklingError, EOFError...
            raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from e
        return weights, meta, state

    def latest_good(self, with_state: bool = False, at_most: int | None = None
                    ) -> tuple[int, dict[str, np.ndarray], dict[str, Any], dict | None] | None:
        """The newest checkpoint (numbered ``at_most`` or lower) that loads cleanly, with its state if asked for:
        (number, weights, meta, state). Damaged ones are skipped and left in place for inspection."""
        for number in reversed(self.numbers()):
            if at_most is not None and number > at_most:
                continue
            try:
                return number, *self.load(number, with_state)
            except CheckpointError:
                continue
        return None
