"""Metrics: a local JSON-lines file is the source of truth; wandb mirrors it (offline when no API key is set)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (well-behaved at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def png_data_uri(fig) -> str:
    """A matplotlib figure as an inline PNG (``data:`` URI): reports that open without a network or other files."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def gif_bytes(frames, scale: int = 3, ms_per_frame: int = 120) -> bytes:
    """Frames (T, H, W, 3) uint8 as an animated GIF, each pixel ``scale`` wide (Pillow, which matplotlib brings)."""
    from PIL import Image

    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return buf.getvalue()


class PhaseTimer:
    """Named wall-clock timers for the phases of one iteration: ``with timer("collect"): ...``.

    ``PhaseTimer.spans``: given a list, every timer appends each phase's ``(phase, start, end)`` in ``time.time()``
    seconds to it, to lay the loop's phases beside another timeline (bench/pipeline.py, beside Ray's)."""

    spans: list[tuple[str, float, float]] | None = None

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            if PhaseTimer.spans is not None:
                PhaseTimer.spans.append((phase, wall, time.time()))

    def as_metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}


class MetricsSink:
    """``log(dict, step)`` appends one JSON line to ``<run_dir>/metrics.jsonl`` and mirrors it to wandb."""

    def __init__(self, run_dir: str | os.PathLike, config: dict[str, Any], mode: str = "auto", project: str = "flywheel"):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wandb = None
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "disabled":
            wdir = Path(run_dir).resolve()
            for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
                os.environ.setdefault(var, str(wdir))  # keep wandb's files in the run, not in ~/.cache
            import wandb

            self._wandb = wandb.init(
                project=project, mode=mode, dir=str(wdir), config=config, name=Path(run_dir).name,
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_clips(self, clips: list[tuple[str, Any]], step: int) -> list[Path]:
        """Rollout clips, ``(name, frames (T, H, W, 3) uint8)``: GIFs under ``<run_dir>/media/``, and wandb videos."""
        paths = []
        for name, frames in clips:
            path = self.path.parent / "media" / f"{name}-step{step:05d}.gif"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gif_bytes(frames))
            paths.append(path)
            if self._wandb is not None:
                import wandb

                self._wandb.log({f"clips/{name}": wandb.Video(str(path), format="gif")}, step=step)
        return paths

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._wandb is not None:
            if summary:
                for k, v in summary.items():
                    if isinstance(v, (int, float, str)):
                        self._wandb.summary[k] = v
            self._wandb.finish()
            self._wandb = None
