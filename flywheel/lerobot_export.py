"""A run's episode store (or a chosen part of it) -> a LeRobotDataset v3.0 directory, with flywheel's lineage.

``export_store`` appends: the episodes already in the dataset (by their flywheel id) are left as they are, and the new
ones go into new data, video and episode files, so a second night adds to the first night's dataset and rewrites
none of its files but the small ``meta/info.json``, ``meta/tasks.parquet`` and ``meta/stats.json`` (each replaced
whole, atomically). ``meta/info.json`` is written last: it commits the export. Files an export cut short left behind
(episodes beyond info.json's total) are removed by the next export before it writes.

pyarrow writes the parquet files and PyAV (FFmpeg) encodes the videos, as LeRobot does; the layout and the frames
of an episode are in flywheel/lerobot_format.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.contracts import Episode, Extras
from flywheel.lerobot_format import (ACTION, CAMERAS, CODEBASE_VERSION, DATA_PATH, ENV_STATE, EPISODES_PATH, FINAL,
                                     INDEX_FEATURES,
                                     INFO, INTERVENTION, LINEAGE, STATE, STATS, TASKS, TOUCH, VIDEO_PATH, DatasetError,
                                     aggregate_stats, check_parquet, episodes_table, feature_stats, hf_features,
                                     read_info, read_tasks, stats_from_json, stats_to_json)
from flywheel.store import EpisodeStore, atomic_write_bytes

log = logging.getLogger(__name__)

NAMES = {"flywheel/Tabletop": {STATE: ["x", "y", "gripper"], ACTION: ["dx", "dy", "gripper"]}}  # by env_id prefix


@dataclasses.dataclass
class Selection:
    """Which stored episodes to export. ``label`` and ``human_only`` go by each episode's newest label."""

    split: str | None = None  # train | eval | holdout; None: every split
    versions: list[int] | None = None  # policy versions (-1: the scripted expert); None: all
    label: str | None = None  # "success" or "failure"; None: labelled or not
    human_only: bool = False  # only episodes a person judged (a label of source "human")
    corrected_only: bool = False  # only episodes in which a person took over at some step

    def __post_init__(self) -> None:
        if self.label not in (None, "success", "failure"):
            raise ValueError(f"label={self.label!r}: choose success, failure, or leave it out")


@dataclasses.dataclass
class VideoSettings:
    """How camera frames are encoded (PyAV, FFmpeg's libx264: H.264 decodes wherever LeRobot runs, through its pyav
    and torchcodec backends). The default is lossless in colour (4:4:4, crf 0): on the built-in 64x64 frames it
    costs 10.3 KB an episode against 9.2 KB for LeRobot's usual 4:2:0 at crf 18, which blurs a block's colour edge
    by up to 166 levels (flywheel/lerobot_export.py, issue 35's note). For a real robot's camera, pix_fmt=yuv420p
    crf=23 keeps files small. ``gop`` 2 is LeRobot's: its reader finds a frame by decoding at most one other."""

    codec: str = "libx264"
    pix_fmt: str = "yuv444p"
    crf: int = 0
    gop: int = 2


@dataclasses.dataclass
class Layout:
    fps: int = 10
    robot_type: str = "flywheel-tabletop"
    chunks_size: int = 1000  # files per chunk directory
    data_files_size_in_mb: int = 100
    video_files_size_in_mb: int = 200


def selected(store: EpisodeStore, selection: Selection) -> list[Path]:
    """The stored episodes ``selection`` admits, read from their lineage and the label log (no frames decoded)."""
    labels = store.labels()
    chosen = []
    for path, meta in store.lineage(selection.split):
        newest = max(labels.get(meta["id"], []), key=lambda lab: lab.created, default=None)
        if selection.versions is not None and meta["policy_version"] not in selection.versions:
            continue
        if selection.label is not None and (newest is None or newest.success != (selection.label == "success")):
            continue
        if selection.human_only and not any(lab.source == "human" for lab in labels.get(meta["id"], [])):
            continue
        if selection.corrected_only and not (meta.get("info") or {}).get("interventions"):
            continue
        chosen.append(path)
    return chosen


def features_of(episode: Episode, layout: Layout, video: VideoSettings) -> dict[str, dict]:
    """The dataset features an episode is written as (lerobot_format.py says how its frames map)."""
    names = next((v for k, v in NAMES.items() if episode.env_id.startswith(k)), {})
    features = {}
    for key, feature in CAMERAS.items():
        if key in episode.observations:
            h, w, c = episode.observations[key].shape[1:]
            if video.pix_fmt == "yuv420p" and (h % 2 or w % 2):
                raise DatasetError(f"the {key} camera's frames are {h}x{w}: yuv420p video needs even sizes; export "
                                   f"with video.pix_fmt=yuv444p")
            features[feature] = {"dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"],
                                 "info": {"video.height": h, "video.width": w, "video.codec": video.codec.removeprefix(
                                     "lib").replace("x264", "h264"), "video.pix_fmt": video.pix_fmt,
                                     "video.is_depth_map": False, "video.fps": layout.fps, "video.channels": c,
                                     "has_audio": False}}
    p, a = episode.observations["proprio"].shape[1], episode.actions.shape[1]
    features[STATE] = {"dtype": "float32", "shape": [p], "names": names.get(STATE) if p == 3 else None}
    if "touch" in episode.observations:
        features[TOUCH] = {"dtype": "float32", "shape": [1], "names": None}
    if Extras.AUX_POSITIONS in episode.extras:
        features[ENV_STATE] = {"dtype": "float32", "shape": [4],
                               "names": ["block_x", "block_y", "target_x", "target_y"]}
    features[ACTION] = {"dtype": "float32", "shape": [a], "names": names.get(ACTION) if a == 3 else None}
    features[INTERVENTION] = {"dtype": "bool", "shape": [1], "names": None}
    features[FINAL] = {"dtype": "bool", "shape": [1], "names": None}
    return {**features, **INDEX_FEATURES}


def frames_of(episode: Episode, features: dict[str, dict], episode_index: int, first: int, task_index: int,
              fps: int) -> dict[str, np.ndarray]:
    """An episode's T+1 frames, by feature (cameras as uint8 (T+1, H, W, C))."""
    n = episode.num_steps + 1
    out = {feature: episode.observations[key] for key, feature in CAMERAS.items() if feature in features}
    out[STATE] = np.asarray(episode.observations["proprio"], np.float32)
    if TOUCH in features:
        out[TOUCH] = np.asarray(episode.observations["touch"], np.float32).reshape(n, 1)
    if ENV_STATE in features:
        out[ENV_STATE] = np.asarray(episode.extras[Extras.AUX_POSITIONS], np.float32).reshape(n, 4)
    out[ACTION] = np.concatenate([np.asarray(episode.actions, np.float32), np.zeros((1, episode.actions.shape[1]),
                                                                                   np.float32)])
    out[INTERVENTION] = np.append(episode.intervened(), False)
    out[FINAL] = np.arange(n) == n - 1
    out["timestamp"] = (np.arange(n) / fps).astype(np.float32)
    out["frame_index"] = np.arange(n, dtype=np.int64)
    out["episode_index"] = np.full(n, episode_index, np.int64)
    out["index"] = first + np.arange(n, dtype=np.int64)
    out["task_index"] = np.full(n, task_index, np.int64)
    return out


def lineage_columns(episode: Episode) -> dict[str, Any]:
    """flywheel's per-episode columns: where the episode came from and every judgement of it."""
    newest = episode.latest_label()
    return {
        f"{LINEAGE}id": episode.id,
        f"{LINEAGE}task": episode.task,
        f"{LINEAGE}env_id": episode.env_id,
        f"{LINEAGE}seed": int(episode.seed),
        f"{LINEAGE}split": episode.split,
        f"{LINEAGE}policy_version": int(episode.policy_version),
        f"{LINEAGE}verdict": None if newest is None else bool(newest.success),
        f"{LINEAGE}verdict_source": None if newest is None else newest.source,
        f"{LINEAGE}labels": json.dumps([dataclasses.asdict(lab) for lab in episode.labels]),
        f"{LINEAGE}ground_truth": json.dumps(episode.ground_truth),
        f"{LINEAGE}interventions": int(episode.intervened().sum()),
        f"{LINEAGE}safety": json.dumps(episode.info.get("safety")),
        f"{LINEAGE}info": json.dumps(episode.info, default=str),
        f"{LINEAGE}exported_at": time.time(),
    }


LINEAGE_TYPES = {f"{LINEAGE}verdict": pa.bool_(), f"{LINEAGE}verdict_source": pa.string(),
                 f"{LINEAGE}exported_at": pa.float64()}


class VideoFile:
    """One mp4 being written: frames appended episode after episode, each frame's time its number / fps."""

    def __init__(self, path: Path, shape: list[int], fps: int, settings: VideoSettings):
        import av

        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.stream = self.container.add_stream(settings.codec, rate=fps)
        self.stream.height, self.stream.width = shape[0], shape[1]
        self.stream.pix_fmt = settings.pix_fmt
        self.stream.codec_context.time_base = Fraction(1, fps)
        self.stream.options = {"crf": str(settings.crf), "g": str(settings.gop)}
        self.frames = 0

    def add(self, images: np.ndarray) -> tuple[int, int]:
        """Append frames (T, H, W, 3); returns (first, end) frame numbers in the file."""
        import av

        first = self.frames
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            self.container.mux(self.stream.encode(frame))
        return first, self.frames

    def size_mb(self) -> float:
        return self.tmp.stat().st_size / 2**20

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)


def _column(values: np.ndarray, feature: dict) -> pa.Array:
    if list(feature["shape"]) == [1]:
        return pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(feature["shape"][0]))


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@dataclasses.dataclass
class Committed:
    """What the dataset held before this export: its info, tasks, whole-dataset stats, and the flywheel ids of its
    episodes."""

    info: dict[str, Any]
    tasks: list[str]
    stats: dict[str, dict[str, np.ndarray]] | None
    ids: set[str]
    next_file: dict[str, tuple[int, int]]  # "data", each video key, "episodes" -> the next (chunk, file) index


def _next(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file + 1 >= chunks_size else (chunk, file + 1)


def open_committed(root: Path, layout: Layout) -> Committed | None:
    """Read what an earlier export committed, check that its files are whole, and clear what an export cut short
    left behind. None where ``root`` holds no dataset yet."""
    if not (root / INFO).exists():
        leftovers = [p for d in ("data", "videos", "meta") for p in (root / d).rglob("*") if p.is_file()]
        for p in leftovers:  # an export cut short before its first commit
            p.unlink()
        return None
    info = read_info(root)
    total = int(info["total_episodes"])
    committed = episodes_table(root, committed=total)
    if committed.num_rows < total:
        raise DatasetError(f"{root / INFO} counts {total} episodes but meta/episodes holds {committed.num_rows}: an "
                           f"episodes file is missing. Restore it from a copy, or export into a new directory")
    rows = committed.to_pylist()
    keep = set()
    video_keys = [k for k, f in info["features"].items() if f["dtype"] == "video"]
    for r in rows:
        keep.add(root / DATA_PATH.format(chunk_index=r["data/chunk_index"], file_index=r["data/file_index"]))
        keep.add(root / EPISODES_PATH.format(chunk_index=r["meta/episodes/chunk_index"],
                                             file_index=r["meta/episodes/file_index"]))
        for k in video_keys:
            keep.add(root / VIDEO_PATH.format(video_key=k, chunk_index=r[f"videos/{k}/chunk_index"],
                                              file_index=r[f"videos/{k}/file_index"]))
    for path in sorted(keep):
        if path.suffix == ".parquet":
            check_parquet(path)
        elif not path.is_file():
            raise DatasetError(f"{path} is missing: the dataset's videos are incomplete. Restore it from a copy, or "
                               f"export into a new directory")
    for p in [p for d in ("data", "videos", "meta/episodes") for p in (root / d).rglob("*") if p.is_file()]:
        if p not in keep:
            log.warning("%s was left by an export that did not finish: removed", p)
            p.unlink()
    next_file = {"data": (0, 0), "episodes": (0, 0), **{k: (0, 0) for k in video_keys}}
    if rows:
        last = rows[-1]
        next_file["data"] = _next(last["data/chunk_index"], last["data/file_index"], layout.chunks_size)
        next_file["episodes"] = _next(last["meta/episodes/chunk_index"], last["meta/episodes/file_index"],
                                      layout.chunks_size)
        for k in video_keys:
            next_file[k] = _next(last[f"videos/{k}/chunk_index"], last[f"videos/{k}/file_index"], layout.chunks_size)
    stats = stats_from_json(json.loads((root / STATS).read_text())) if (root / STATS).exists() else None
    ids = set(committed.column(f"{LINEAGE}id").to_pylist()) if f"{LINEAGE}id" in committed.column_names else set()
    return Committed(info, read_tasks(root), stats, ids, next_file)


class Writer:
    """The files of one export: data and video files rolled over at their size limits, episode rows collected."""

    def __init__(self, root: Path, features: dict[str, dict], layout: Layout, video: VideoSettings,
                 next_file: dict[str, tuple[int, int]], first_episode: int, first_frame: int):
        self.root, self.features, self.layout, self.video = root, features, layout, video
        self.next_file = dict(next_file)
        self.episode_index, self.frame_index = first_episode, first_frame
        self.video_keys = [k for k, f in features.items() if f["dtype"] == "video"]
        self.data_keys = [k for k, f in features.items() if f["dtype"] != "video"]
        self.rows: list[dict[str, Any]] = []
        self.stats: list[dict[str, dict[str, np.ndarray]]] = []
        self.bytes_written = 0
        self._data: list[dict[str, np.ndarray]] = []
        self._data_bytes = 0
        self._data_at: tuple[int, int] | None = None
        self._videos: dict[str, tuple[tuple[int, int], VideoFile]] = {}

    def _take(self, what: str) -> tuple[int, int]:
        at = self.next_file[what]
        self.next_file[what] = _next(*at, self.layout.chunks_size)
        return at

    def add(self, episode: Episode, task_index: int) -> None:
        frames = frames_of(episode, self.features, self.episode_index, self.frame_index, task_index, self.layout.fps)
        n = len(frames["index"])
        if self._data_at is None:
            self._data_at = self._take("data")
        row: dict[str, Any] = {"episode_index": self.episode_index, "tasks": [episode.instruction], "length": n,
                               "data/chunk_index": self._data_at[0], "data/file_index": self._data_at[1],
                               "dataset_from_index": self.frame_index, "dataset_to_index": self.frame_index + n}
        for key in self.video_keys:
            if key not in self._videos:
                at = self._take(key)
                path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=at[0], file_index=at[1])
                self._videos[key] = (at, VideoFile(path, self.features[key]["shape"], self.layout.fps, self.video))
            at, video = self._videos[key]
            start, end = video.add(frames[key])
            row.update({f"videos/{key}/chunk_index": at[0], f"videos/{key}/file_index": at[1],
                        f"videos/{key}/from_timestamp": start / self.layout.fps,
                        f"videos/{key}/to_timestamp": end / self.layout.fps})
        stats = {k: feature_stats(v, image=k in self.video_keys) for k, v in frames.items()}
        for k, f in self.features.items():
            if f["dtype"] == "bool":
                stats[k]["min"], stats[k]["max"] = stats[k]["min"] > 0, stats[k]["max"] > 0
        row.update({f"stats/{k}/{s}": v.tolist() for k, d in stats.items() for s, v in d.items()})
        row.update(lineage_columns(episode))
        self.rows.append(row)
        self.stats.append(stats)
        self._data.append({k: frames[k] for k in self.data_keys})
        self._data_bytes += sum(frames[k].nbytes for k in self.data_keys)
        self.episode_index += 1
        self.frame_index += n
        if self._data_bytes / 2**20 >= self.layout.data_files_size_in_mb:
            self._flush_data()
        for key in list(self._videos):
            if self._videos[key][1].size_mb() >= self.layout.video_files_size_in_mb:
                self._videos.pop(key)[1].close()

    def _flush_data(self) -> None:
        if not self._data:
            return
        table = pa.table({k: _column(np.concatenate([d[k] for d in self._data]), self.features[k])
                          for k in self.data_keys})
        table = table.replace_schema_metadata({"huggingface": json.dumps(hf_features(self.features))})
        path = self.root / DATA_PATH.format(chunk_index=self._data_at[0], file_index=self._data_at[1])
        data = parquet_bytes(table)
        atomic_write_bytes(path, data)
        self.bytes_written += len(data)
        self._data, self._data_bytes, self._data_at = [], 0, None

    def close(self) -> None:
        """Write what is pending: the last data file, the videos, then the episode rows (one file)."""
        self._flush_data()
        for _, video in self._videos.values():
            video.close()
            self.bytes_written += video.path.stat().st_size
        self._videos = {}
        if not self.rows:
            return
        at = self._take("episodes")
        for row in self.rows:
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = at
        table = pa.Table.from_pylist(self.rows)
        for name, kind in LINEAGE_TYPES.items():
            table = table.set_column(table.column_names.index(name), name, table.column(name).cast(kind))
        data = parquet_bytes(table)
        atomic_write_bytes(self.root / EPISODES_PATH.format(chunk_index=at[0], file_index=at[1]), data)
        self.bytes_written += len(data)


def write_tasks(root: Path, tasks: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame({"task_index": np.arange(len(tasks), dtype=np.int64)}, index=pd.Index(tasks))
    atomic_write_bytes(root / TASKS, parquet_bytes(pa.Table.from_pandas(frame)))


def export_store(store: EpisodeStore, root: str | os.PathLike, selection: Selection = Selection(),
                 layout: Layout = Layout(), video: VideoSettings = VideoSettings(),
                 progress=None) -> dict[str, Any]:
    """Export the episodes ``selection`` admits that ``root`` does not hold yet; returns what was done."""
    root = Path(root)
    started = time.time()
    root.mkdir(parents=True, exist_ok=True)
    committed = open_committed(root, layout)
    if committed is not None:
        layout = dataclasses.replace(layout, fps=int(committed.info["fps"]),
                                     chunks_size=int(committed.info["chunks_size"]))
    have = committed.ids if committed else set()
    paths = [p for p in selected(store, selection) if p.stem not in have]
    report = {"dataset": str(root), "exported": 0, "already_there": len(have), "frames": 0, "bytes": 0,
              "left_out_observations": []}
    if not paths:
        report["seconds"] = time.time() - started
        return report
    labels = store.labels()
    episodes = (store.read(p, labels.get(p.stem)) for p in paths)
    first = next(episodes)
    features = features_of(first, layout, video)
    if committed is not None and _comparable(committed.info["features"]) != _comparable(features):
        raise DatasetError(f"{root / INFO} holds features {_comparable(committed.info['features'])}, but these "
                           f"episodes have {_comparable(features)}: export them into a new directory")
    tasks = list(committed.tasks) if committed else []
    task_index = {t: i for i, t in enumerate(tasks)}
    info = committed.info if committed else _new_info(features, layout)
    writer = Writer(root, features, layout, video, committed.next_file if committed else
                    {"data": (0, 0), "episodes": (0, 0), **{k: (0, 0) for k in features if
                                                            features[k]["dtype"] == "video"}},
                    int(info["total_episodes"]), int(info["total_frames"]))
    left_out = sorted({k for k in first.observations} - set(CAMERAS) - {"proprio", "touch"})
    for i, episode in enumerate(itertools.chain([first], episodes)):
        if episode.instruction not in task_index:
            task_index[episode.instruction] = len(tasks)
            tasks.append(episode.instruction)
        writer.add(episode, task_index[episode.instruction])
        if progress is not None:
            progress(i + 1, len(paths))
    writer.close()
    write_tasks(root, tasks)
    parts = ([committed.stats] if committed and committed.stats else []) + writer.stats
    atomic_write_bytes(root / STATS, json.dumps(stats_to_json(aggregate_stats(parts)), indent=2).encode())
    info.update(total_episodes=writer.episode_index, total_frames=writer.frame_index, total_tasks=len(tasks),
                splits={"train": f"0:{writer.episode_index}"})
    atomic_write_bytes(root / INFO, json.dumps(info, indent=4).encode())  # the commit
    report.update(exported=len(writer.rows), frames=sum(r["length"] for r in writer.rows),
                  bytes=writer.bytes_written, left_out_observations=left_out, total_episodes=writer.episode_index,
                  seconds=time.time() - started)
    return report


def _comparable(features: dict[str, dict]) -> dict[str, tuple]:
    return {k: (f["dtype"], tuple(f["shape"])) for k, f in features.items()}


def _new_info(features: dict[str, dict], layout: Layout) -> dict[str, Any]:
    return {"codebase_version": CODEBASE_VERSION, "robot_type": layout.robot_type, "total_episodes": 0,
            "total_frames": 0, "total_tasks": 0, "chunks_size": layout.chunks_size,
            "data_files_size_in_mb": layout.data_files_size_in_mb,
            "video_files_size_in_mb": layout.video_files_size_in_mb, "fps": layout.fps, "splits": {},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if any(f["dtype"] == "video" for f in features.values()) else None,
            "features": features}
