"""LeRobotDataset v3.0, as LeRobot 0.4 writes and reads it: what flywheel's export and import share.

A dataset is a directory::

    meta/info.json                               codebase_version "v3.0", fps, features, totals, path templates
    meta/tasks.parquet                           the task strings (the pandas index) -> task_index
    meta/stats.json                              per feature: min, max, mean, std, count, q01, q10, q50, q90, q99
    meta/episodes/chunk-XXX/file-YYY.parquet     one row per episode: where its frames and video lie, its stats
    data/chunk-XXX/file-YYY.parquet              one row per frame, many episodes to a file
    videos/<camera>/chunk-XXX/file-YYY.mp4       the frames of many episodes, one after another

How a flywheel episode becomes frames: an episode of T actions has T+1 observations (the last is the state it ended
in, which a success detector judges). It is written as T+1 frames: frame t holds observation t and action t, and the
last frame holds the final observation with an action of zeros, marked by the per-frame feature ``flywheel.final``
(a LeRobot policy trainer should leave those frames out). Flywheel's lineage rides along as the per-frame
``flywheel.intervention`` (a person acted at that step) and as ``flywheel/...`` columns of the episodes table: the
episode's id, task family, environment, seed, split, policy version, labels (source, verdict, detector version or
person, score, threshold, when), ground truth, safety events and the rest of its record. A simulated episode's
privileged positions (the auxiliary targets pretraining learns grounding from; never a policy input) go out as
LeRobot's ``observation.environment_state``. What a policy drew besides its actions (chunks, log-probabilities) stays
in the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CODEBASE_VERSION = "v3.0"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
INFO, TASKS, STATS = "meta/info.json", "meta/tasks.parquet", "meta/stats.json"
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}

# flywheel's observation keys and the features they are exported as
CAMERAS = {"image": "observation.images.overhead", "wrist": "observation.images.wrist"}
STATE, TOUCH, ACTION = "observation.state", "observation.touch", "action"
ENV_STATE = "observation.environment_state"  # LeRobot's key for a simulator's privileged state: flywheel's
#                                              Extras.AUX_POSITIONS (the named block's and target's x, y)
INTERVENTION, FINAL = "flywheel.intervention", "flywheel.final"
LINEAGE = "flywheel/"  # the prefix of flywheel's per-episode columns
INDEX_FEATURES = {  # every LeRobot dataset has these
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


class DatasetError(RuntimeError):
    """A LeRobot dataset that cannot be read or appended to; the message names the file and what to do."""


def read_info(root: Path) -> dict[str, Any]:
    """``meta/info.json``, checked to be a v3.0 dataset's."""
    path = root / INFO
    if not path.is_file():
        raise DatasetError(f"{path} is missing: {root} is not a LeRobot dataset (v3.0 keeps meta/info.json)")
    try:
        info = json.loads(path.read_text())
        version, features = info["codebase_version"], info["features"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path} is damaged ({type(e).__name__}: {e}): restore it from a copy") from e
    if version != CODEBASE_VERSION:
        raise DatasetError(
            f"{path} says codebase_version {version!r}; flywheel reads and appends to {CODEBASE_VERSION} only. Convert "
            f"an older dataset with LeRobot's own converter (python -m lerobot.datasets.v30.convert_dataset_v21_to_v30"
            f" in a venv with lerobot 0.4), or export to a new directory")
    if not isinstance(features, dict):
        raise DatasetError(f"{path}: 'features' is not a mapping: restore it from a copy")
    return info


def read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file of the dataset, read whole; a damaged or missing one is a DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the dataset is incomplete (restore the file, or export again into a "
                           f"new directory)")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path} cannot be read ({type(e).__name__}: {e}): it was cut short or damaged. Restore it "
                           f"from a copy, or export again into a new directory") from e


def check_parquet(path: Path) -> None:
    """Raise a DatasetError naming ``path`` unless its footer reads (a file cut short has none)."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the dataset is incomplete (restore the file, or export again into a "
                           f"new directory)")
    try:
        pq.read_metadata(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path} cannot be read ({type(e).__name__}: {e}): it was cut short or damaged. Restore it "
                           f"from a copy, or export again into a new directory") from e


def episodes_table(root: Path, committed: int | None = None) -> pa.Table:
    """The episode rows of ``meta/episodes``, in episode order: all of them, or the first ``committed`` (files past
    those, which an export cut short may have left, are not read)."""
    tables, rows = [], 0
    for path in sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet")):
        if committed is not None and rows >= committed:
            break
        tables.append(read_table(path))
        rows += tables[-1].num_rows
    if not tables:
        return pa.table({"episode_index": pa.array([], pa.int64())})
    table = pa.concat_tables(tables, promote_options="permissive").sort_by("episode_index")
    return table if committed is None else table.slice(0, committed)


def read_tasks(root: Path) -> list[str]:
    """The task strings, by task_index (LeRobot keeps them as the pandas index of ``meta/tasks.parquet``)."""
    import pandas as pd

    path = root / TASKS
    read_table(path)  # a clear error for a missing or damaged file
    frame = pd.read_parquet(path)
    tasks = [""] * len(frame)
    for task, index in zip(frame.index, frame["task_index"]):
        tasks[int(index)] = str(task)
    return tasks


def feature_stats(values: np.ndarray, image: bool = False) -> dict[str, np.ndarray]:
    """LeRobot's per-feature statistics of one episode's values (frames first). Images are (T, H, W, C) uint8 and are
    summarised per channel in [0, 1], shaped (C, 1, 1) as LeRobot keeps them."""
    if image:
        return _image_stats(values)
    x = values.reshape(len(values), -1).astype(np.float64)
    stats = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}
    stats.update(zip(QUANTILES, np.quantile(x, list(QUANTILES.values()), axis=0)))
    return {**stats, "count": np.array([len(values)], np.int64)}


def _image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Exact statistics of uint8 frames from each channel's 256-bin histogram: ~10x faster than sorting the pixels,
    which was most of an export's time."""
    levels = np.arange(256, dtype=np.float64)
    hist = np.stack([np.bincount(frames[..., c].ravel(), minlength=256) for c in range(frames.shape[-1])])
    total = hist.sum(1, keepdims=True)
    cdf = np.cumsum(hist, 1) / total
    mean = (hist * levels).sum(1) / total[:, 0]
    var = (hist * (levels - mean[:, None]) ** 2).sum(1) / total[:, 0]
    present = hist > 0
    stats = {"min": present.argmax(1), "max": 255 - present[:, ::-1].argmax(1), "mean": mean, "std": np.sqrt(var)}
    stats.update({k: np.array([np.searchsorted(row, q) for row in cdf]) for k, q in QUANTILES.items()})
    out = {k: (np.asarray(v, np.float64) / 255.0).reshape(-1, 1, 1) for k, v in stats.items()}
    return {**out, "count": np.array([len(frames)], np.int64)}


def aggregate_stats(parts: list[dict[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, np.ndarray]]:
    """Whole-dataset statistics from parts (episodes, or an earlier aggregate): min of mins, max of maxes, the
    count-weighted mean, the pooled variance, and the count-weighted mean of each quantile (as LeRobot aggregates)."""
    out = {}
    for key in sorted({k for p in parts for k in p}):
        group = [p[key] for p in parts if key in p]
        counts = np.stack([np.asarray(s["count"], np.float64) for s in group])
        means = np.stack([np.asarray(s["mean"], np.float64) for s in group])
        while counts.ndim < means.ndim:
            counts = counts[..., None]
        total = counts.sum(0)
        mean = (means * counts).sum(0) / total
        var = ((np.stack([np.asarray(s["std"], np.float64) for s in group]) ** 2 + (means - mean) ** 2) * counts).sum(0)
        agg = {"min": np.min(np.stack([s["min"] for s in group]), 0),
               "max": np.max(np.stack([s["max"] for s in group]), 0),
               "mean": mean, "std": np.sqrt(var / total),
               "count": np.sum(np.stack([np.asarray(s["count"], np.int64) for s in group]), 0)}
        for q in QUANTILES:
            agg[q] = (np.stack([np.asarray(s[q], np.float64) for s in group]) * counts).sum(0) / total
        out[key] = agg
    return out


def stats_to_json(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in stats.items()}


def stats_from_json(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    return {k: {s: np.asarray(v) for s, v in d.items()} for k, d in data.items()}


def hf_features(features: dict[str, dict]) -> dict[str, Any]:
    """The ``huggingface`` schema metadata LeRobot writes into its data files (Hugging Face ``datasets`` types), so
    that tools reading them through ``datasets`` see the same types."""
    out = {}
    for key, ft in features.items():
        if ft["dtype"] in ("video", "image"):
            continue
        if list(ft["shape"]) == [1]:
            out[key] = {"dtype": ft["dtype"], "_type": "Value"}
        else:
            out[key] = {"feature": {"dtype": ft["dtype"], "_type": "Value"}, "length": int(ft["shape"][0]),
                        "_type": "List"}
    return {"info": {"features": out}}
