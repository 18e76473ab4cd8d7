"""A local LeRobotDataset v3.0 -> flywheel episodes: demonstrations for ``flywheel pretrain`` and the learners'
imitation terms, labelled episodes for a detector, or episodes in a store for a detector to judge.

``DatasetKeys`` (flywheel/config.py) says which of the dataset's features become the policy's inputs (its camera,
state and action keys). A dataset flywheel exported comes back whole: its final frames, interventions, ids, lineage
and labels. One written by other tools has no final frame: its last frame's observation stands in for the state the episode ended in
(``info["final_observation"] = "last frame"``), and its lineage is made up: the id from the dataset's name and the
episode's index, policy version -1 (a demonstration), the seed its episode index.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from flywheel.config import DatasetKeys
from flywheel.contracts import Episode, Extras, Label
from flywheel.lerobot_format import (CAMERAS, DATA_PATH, FINAL, INTERVENTION, LINEAGE, TOUCH, DatasetError,
                                     episodes_table, read_info, read_table, read_tasks)
from flywheel.store import EpisodeStore


class FrameReader:
    """Decodes the frames of one camera, episode after episode, keeping the file open while they follow on."""

    def __init__(self, root: Path, video_path: str, size: int):
        self.root, self.video_path, self.size = root, video_path, size
        self.path: Path | None = None
        self.container = None
        self.frames: Iterator | None = None
        self.at = -1.0  # the time of the next frame the open decoder yields
        self.rgb = None  # one reformatter for every frame: ~10x faster than a frame's own to_ndarray("rgb24")

    def read(self, key: str, chunk: int, file: int, start: float, n: int, fps: int) -> np.ndarray:
        import av

        path = self.root / self.video_path.format(video_key=key, chunk_index=chunk, file_index=file)
        tol = 0.5 / fps
        if path != self.path or start < self.at - tol:
            self.close()
            if not path.is_file():
                raise DatasetError(f"{path} is missing: the {key} frames of this dataset's episodes are in it. Restore "
                                   f"it from a copy, or export the dataset again")
            try:
                self.container = av.open(str(path))
                stream = self.container.streams.video[0]
                if start > 0:
                    self.container.seek(int(start / stream.time_base), stream=stream, backward=True)
                self.frames = self.container.decode(stream)
            except av.error.FFmpegError as e:
                raise DatasetError(f"{path} cannot be decoded ({e}): restore it from a copy") from e
            self.path = path
        out = []
        try:
            for frame in self.frames:
                t = float(frame.time)
                self.at = t + 1.0 / fps
                if t < start - tol:
                    continue
                kw = {"width": self.size, "height": self.size} if self.size and self.size != frame.width else {}
                if self.rgb is None:
                    self.rgb = av.video.reformatter.VideoReformatter()
                out.append(self.rgb.reformat(frame, format="rgb24", **kw).to_ndarray())
                if len(out) == n:
                    break
        except av.error.FFmpegError as e:
            raise DatasetError(f"{path} cannot be decoded past {self.at:.2f} s ({e}): restore it from a copy") from e
        if len(out) < n:
            raise DatasetError(f"{path} ends after {len(out)} of the {n} frames the episode from {start:.2f} s has: it "
                               f"was cut short. Restore it from a copy")
        return np.stack(out)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.frames, self.path, self.at = None, None, None, -1.0


def _numpy(column: pa.ChunkedArray | pa.Array, width: int | None) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if width is None:
        return array.to_numpy(zero_copy_only=False)
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False)).reshape(len(array), width)


class DataFiles:
    """The frame rows of one episode, reading each data file once while its episodes follow on."""

    def __init__(self, root: Path, data_path: str, features: dict[str, dict]):
        self.root, self.data_path, self.features = root, data_path, features
        self.at: tuple[int, int] | None = None
        self.columns: dict[str, np.ndarray] = {}
        self.episodes = np.zeros(0, np.int64)  # the episode of each row, sorted

    def rows(self, chunk: int, file: int, episode_index: int, keys: list[str]) -> dict[str, np.ndarray]:
        if self.at != (chunk, file):
            path = self.root / self.data_path.format(chunk_index=chunk, file_index=file)
            table = read_table(path)
            missing = [k for k in keys if k not in table.column_names]
            if missing:
                raise DatasetError(f"{path} lacks the columns {missing} that meta/info.json lists: restore it")
            self.columns = {k: _numpy(table.column(k), None if list(self.features[k]["shape"]) == [1] or
                                      self.features[k]["dtype"] == "image" else int(np.prod(self.features[k]["shape"])))
                            for k in keys}
            episode = _numpy(table.column("episode_index"), None)
            frame = _numpy(table.column("frame_index"), None)
            order = np.lexsort((frame, episode))  # each episode's rows together, in frame order
            self.columns = {k: v[order] for k, v in self.columns.items()}
            self.episodes = episode[order]
            self.at = (chunk, file)
        lo, hi = np.searchsorted(self.episodes, [episode_index, episode_index + 1])
        return {k: v[lo:hi] for k, v in self.columns.items()}


def _camera_keys(info: dict, keys: DatasetKeys) -> dict[str, str]:
    """flywheel observation key -> the dataset's camera feature."""
    cameras = [k for k, f in info["features"].items() if f["dtype"] in ("video", "image")]
    chosen = {"image": keys.image or (CAMERAS["image"] if CAMERAS["image"] in cameras else
                                      (cameras[0] if cameras else "")),
              "wrist": keys.wrist or (CAMERAS["wrist"] if CAMERAS["wrist"] in cameras else "")}
    for key, feature in chosen.items():
        if feature and feature not in cameras:
            raise DatasetError(f"dataset_keys.{key}={feature!r}: the dataset has no such camera; its cameras are "
                               f"{cameras} (meta/info.json)")
    if not chosen["image"]:
        raise DatasetError("the dataset has no camera (no video or image feature in meta/info.json): a policy needs "
                           "one")
    return {k: v for k, v in chosen.items() if v}


def read_dataset(root: str | os.PathLike, keys: DatasetKeys = DatasetKeys(), split: str = "train", demos: bool = False,
                 limit: int | None = None) -> Iterator[Episode]:
    """The dataset's episodes in episode order (the first ``limit``). ``split``: theirs where flywheel exported them,
    else this. ``demos``: each episode without a label of its own gets a demonstration marker."""
    root = Path(root)
    info = read_info(root)
    features, fps = info["features"], int(info["fps"])
    for needed in (keys.proprio, keys.action):
        if needed not in features:
            raise DatasetError(f"{root / 'meta/info.json'} has no feature {needed!r} (dataset_keys.proprio, "
                               f"dataset_keys.action): its features are {sorted(features)}")
    cameras = _camera_keys(info, keys)
    tasks = read_tasks(root)
    table = episodes_table(root, committed=int(info["total_episodes"]))
    columns = [k for k in table.column_names if not k.startswith("stats/")]
    data_keys = [k for k in (keys.proprio, keys.action, TOUCH, keys.environment_state, INTERVENTION, FINAL,
                             keys.success, "task_index")
                 if k and k in features] + [f for f in cameras.values() if features[f]["dtype"] == "image"]
    data_path = info.get("data_path") or DATA_PATH
    data = DataFiles(root, data_path, features)
    readers = {f: FrameReader(root, info["video_path"], keys.image_size) for f in cameras.values()
               if features[f]["dtype"] == "video"}
    try:
        for row in table.select(columns).slice(0, limit).to_pylist():
            frames = data.rows(row["data/chunk_index"], row["data/file_index"], row["episode_index"], data_keys)
            n = len(frames[keys.action])
            if n != row["length"]:
                path = root / data_path.format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
                raise DatasetError(f"{path} holds {n} frames of episode {row['episode_index']}, meta/episodes says "
                                   f"{row['length']}: the dataset is inconsistent")
            images = {}
            for key, feature in cameras.items():
                if feature in readers:
                    images[key] = readers[feature].read(feature, row[f"videos/{feature}/chunk_index"],
                                                        row[f"videos/{feature}/file_index"],
                                                        row[f"videos/{feature}/from_timestamp"], n, fps)
                else:
                    images[key] = _png_frames(frames[feature], keys.image_size)
            yield _episode(root, row, frames, images, tasks, keys, split, demos)
    finally:
        for reader in readers.values():
            reader.close()


def _png_frames(cells: np.ndarray, size: int) -> np.ndarray:
    """Frames of an ``image`` feature (PNG bytes in the parquet rows)."""
    import io

    from PIL import Image

    out = []
    for cell in cells:
        image = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
        out.append(np.asarray(image.resize((size, size)) if size else image))
    return np.stack(out)


def _episode(root: Path, row: dict[str, Any], frames: dict[str, np.ndarray], images: dict[str, np.ndarray],
             tasks: list[str], keys: DatasetKeys, split: str, demos: bool) -> Episode:
    n = len(frames[keys.action])
    state = np.asarray(frames[keys.proprio], np.float32).reshape(n, -1)
    action = np.asarray(frames[keys.action], np.float32).reshape(n, -1)
    observations = {**images, "proprio": state}
    if TOUCH in frames:
        observations["touch"] = np.asarray(frames[TOUCH], np.float32).reshape(n, 1)
    lineage = {k[len(LINEAGE):]: v for k, v in row.items() if k.startswith(LINEAGE)}
    info = json.loads(lineage["info"]) if "info" in lineage else {}
    info["lerobot"] = {"dataset": root.name, "episode_index": int(row["episode_index"])}
    per_state = {k: v for k, v in [("aux", frames.get(keys.environment_state))] if v is not None}
    per_state = {k: np.asarray(v, np.float32).reshape(n, -1) for k, v in per_state.items()}
    if FINAL in frames and frames[FINAL][-1]:
        actions, intervention = action[:-1], frames.get(INTERVENTION, np.zeros(n, bool))[:-1]
    else:  # every frame has an action: the last frame's observation stands in for the final one
        actions, intervention = action, frames.get(INTERVENTION, np.zeros(n, bool))
        observations = {k: np.concatenate([v, v[-1:]]) for k, v in observations.items()}
        per_state = {k: np.concatenate([v, v[-1:]]) for k, v in per_state.items()}
        info["final_observation"] = "last frame"
    labels = [Label(**lab) for lab in json.loads(lineage.get("labels") or "[]")]
    if keys.success and not labels:
        verdict = row.get(keys.success, frames[keys.success][-1] if keys.success in frames else None)
        if verdict is None:
            raise DatasetError(f"dataset_keys.success={keys.success!r} is neither a feature nor an episode column of "
                               f"{root}")
        labels.append(Label(source=keys.success_source, success=bool(np.asarray(verdict).reshape(-1)[0]),
                            version=f"lerobot:{keys.success}"))
    if demos and not labels:
        labels.append(Label(source="demo", success=True))
    task = tasks[int(frames["task_index"][0])] if "task_index" in frames else row["tasks"][0]
    extras = {Extras.INTERVENTION: np.asarray(intervention, bool)} if np.any(intervention) else {}
    if "aux" in per_state and per_state["aux"].shape[1] == 4:
        extras[Extras.AUX_POSITIONS] = per_state["aux"]
    return Episode(
        id=lineage.get("id") or f"lerobot-{root.name}-{int(row['episode_index']):06d}",
        task=lineage.get("task") or "imported", instruction=task,
        env_id=lineage.get("env_id") or f"lerobot:{root.name}",
        seed=int(lineage.get("seed", row["episode_index"])), split=lineage.get("split") or split,
        policy_version=int(lineage.get("policy_version", -1)), observations=observations, actions=actions,
        extras=extras, ground_truth=json.loads(lineage["ground_truth"]) if lineage.get("ground_truth") else None,
        labels=labels, info=info)


def import_dataset(root: str | os.PathLike, store: EpisodeStore, keys: DatasetKeys = DatasetKeys(),
                   split: str = "train", demos: bool = False, progress=None) -> dict[str, Any]:
    """Add the dataset's episodes to ``store`` (those it does not hold yet, by id); returns what was done."""
    have = {p.stem for p in store.paths()}
    added = skipped = 0
    total = int(read_info(Path(root))["total_episodes"])
    for i, episode in enumerate(read_dataset(root, keys, split, demos)):
        if episode.id in have:
            skipped += 1
        else:
            store.add(episode)
            added += 1
        if progress is not None:
            progress(i + 1, total)
    return {"dataset": str(root), "store": str(store.root), "imported": added, "already_there": skipped}


def demonstrations(root: str | os.PathLike, keys: DatasetKeys, n: int, image_size: int) -> list[Episode]:
    """The first ``n`` episodes of a dataset as demonstrations, their cameras at ``image_size`` unless ``keys`` says
    otherwise."""
    keys = dataclasses.replace(keys, image_size=keys.image_size or image_size)
    demos = list(read_dataset(root, keys, demos=True, limit=n))
    if len(demos) < n:
        raise DatasetError(f"{root} holds {len(demos)} episodes; {n} demonstrations were asked for (demos={n}): ask "
                           f"for at most {len(demos)}")
    return demos
