"""Exporting a 5,000-episode store to a LeRobotDataset v3.0 (issue 35): episodes per second and bytes per episode,
against the store's own writing rate and size, measured in the same run.

The store holds the scripted expert's tabletop episodes (64x64 overhead camera, with noise, so some fail), each with
a detector's label, written as a run writes them (``EpisodeStore.add``: the baseline rate). ``export_store`` then
writes them all into a new dataset, and a further 500 are appended to it (the second night: its cost should not
grow with what the dataset already holds). Last, flywheel's reader reads the whole dataset back.

    PYTHONPATH=. .venv/bin/python bench/lerobot_export.py [EPISODES]      (~5 min on 2 cores for 5,000)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import write_result
from flywheel.contracts import Label
from flywheel.lerobot_export import export_store
from flywheel.lerobot_import import read_dataset
from flywheel.store import EpisodeStore


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def fill(store: EpisodeStore, first: int, n: int, batch: int = 250) -> float:
    """Add ``n`` episodes; returns the seconds spent writing them into the store (not making them)."""
    seconds = 0.0
    for start in range(first, first + n, batch):
        seeds = [split_seed("train", i) for i in range(start, min(start + batch, first + n))]
        episodes = run_episodes(seeds, "train", None, policy_version=-1, expert={"noise": 0.3})
        started = time.perf_counter()
        for ep in episodes:
            ep.labels.append(Label("detector", bool(ep.ground_truth["success"]), version="detector-1", score=0.9,
                                   threshold=0.5))
            store.add(ep)
        seconds += time.perf_counter() - started
    return seconds


def main(n: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="flywheel-export-bench-"))
    try:
        store = EpisodeStore(work / "store")
        store_seconds = fill(store, 0, n)
        store_bytes = size(work / "store")

        started = time.perf_counter()
        report = export_store(store, work / "dataset")
        export_seconds = time.perf_counter() - started
        dataset_bytes = size(work / "dataset")

        more = n // 10
        fill(store, n, more)
        started = time.perf_counter()
        appended = export_store(store, work / "dataset")
        append_seconds = time.perf_counter() - started

        started = time.perf_counter()
        read = sum(1 for _ in read_dataset(work / "dataset"))
        read_seconds = time.perf_counter() - started
        assert report["exported"] == n and appended["exported"] == more and read == n + more

        export_rate, store_rate = n / export_seconds, n / store_seconds
        write_result(
            "lerobot_export", export_rate / store_rate, None, None, args=[str(n)] if len(sys.argv) > 1 else [],
            what=f"episodes/s exporting a {n:,}-episode store to a LeRobotDataset v3.0 / episodes/s writing the "
                 f"same episodes into the store; bytes per episode beside it",
            episodes=n, frames=report["frames"],
            export_episodes_per_s=round(export_rate, 1), store_write_episodes_per_s=round(store_rate, 1),
            append_episodes_per_s=round(more / append_seconds, 1),
            read_back_episodes_per_s=round(read / read_seconds, 1),
            dataset_bytes_per_episode=round(dataset_bytes / n), store_bytes_per_episode=round(store_bytes / n),
            bytes_ratio=round(dataset_bytes / store_bytes, 3),
            note="ratio: export's episodes per second over the store's own writing rate, measured in the same run; "
                 "bytes_ratio: the dataset's size over the store's (the video is lossless in colour, crf 0 4:4:4)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
