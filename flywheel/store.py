"""The episode store: durable, append-only, one file per episode, labels in an append-only log beside them.

Layout under ``root``::

    <split>/<episode id>.npz     arrays (observations, actions, extras) + the lineage as JSON, zip-compressed
    labels.jsonl                 one label per line: {"episode": id, "source": ..., "success": ..., ...}
    quarantine/                  files that failed to read, moved aside (never deleted)

Durability: an episode is written to a temporary name in the same folder, fsynced, then renamed, so a crash leaves
either the whole episode or none of it. Labels are appended and fsynced; a line cut short by a crash is skipped with
a warning. Nothing is ever rewritten: relabelling adds lines.

Why .npz: the frames of the built-in tasks are flat colours that zip compresses ~20x, numpy reads them without a
new dependency, and the zip CRC tells a damaged file from a good one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from flywheel.contracts import SPLITS, Episode, Label

log = logging.getLogger(__name__)


# What every stored episode must say about where it came from (../shared/DESIGN.md "The episode and its lineage").
LINEAGE = ("id", "task", "instruction", "env_id", "seed", "split", "policy_version", "ground_truth")


class CorruptEpisodeError(RuntimeError):
    """An episode file that cannot be read back (cut short, overwritten, not an episode)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def npz_bytes(arrays: dict[str, np.ndarray], level: int = 3) -> bytes:
    """``arrays`` as the bytes of an .npz file (``np.load`` reads it), deflated at zlib ``level``.

    ``np.savez_compressed`` always deflates at level 6. On the built-in tasks' episodes level 3 compresses about
    2.3x faster (levels 1-3 cost the same; 4 and up cost twice as much) into files ~1.6x larger (~12 KB an
    episode), and writing episodes is on the loop's critical path (bench/store_write.py).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def _label_to_json(episode_id: str, label: Label) -> str:
    return json.dumps({"episode": episode_id, **dataclasses.asdict(label)})


class EpisodeStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.labels_path = self.root / "labels.jsonl"

    # ---- writing ---------------------------------------------------------------------------------------------------
    def add(self, episode: Episode) -> Path:
        """Store a completed episode (and any labels it already carries). Refuses to overwrite an existing id."""
        path = self.root / episode.split / f"{episode.id}.npz"
        if path.exists():
            raise FileExistsError(f"episode {episode.id} is already stored at {path}; the store is append-only")
        meta = {
            "id": episode.id,
            "task": episode.task,
            "instruction": episode.instruction,
            "env_id": episode.env_id,
            "seed": episode.seed,
            "split": episode.split,
            "policy_version": episode.policy_version,
            "ground_truth": episode.ground_truth,
            "info": episode.info,
        }
        arrays = {f"obs.{k}": v for k, v in episode.observations.items()}
        arrays.update({f"extra.{k}": v for k, v in episode.extras.items()})
        arrays["actions"] = episode.actions
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_write_bytes(path, npz_bytes(arrays))
        for label in episode.labels:
            self.add_label(episode.id, label)
        return path

    def add_label(self, episode_id: str, label: Label) -> None:
        self.add_labels([(episode_id, label)])

    def add_labels(self, items: list[tuple[str, Label]]) -> None:
        """Append labels (one fsync for the batch)."""
        if not items:
            return
        with open(self.labels_path, "a", encoding="utf-8") as f:
            f.write("".join(_label_to_json(eid, lab) + "\n" for eid, lab in items))
            f.flush()
            os.fsync(f.fileno())

    # ---- reading ---------------------------------------------------------------------------------------------------
    def paths(self, split: str | None = None) -> list[Path]:
        splits = SPLITS if split is None else (split,)
        return sorted(p for s in splits for p in (self.root / s).glob("*.npz"))

    def __len__(self) -> int:
        return len(self.paths())

    def labels(self) -> dict[str, list[Label]]:
        """Every label ever given, by episode id, oldest first."""
        out: dict[str, list[Label]] = {}
        for n, eid, label in self._label_lines():
            if isinstance(label, Exception):
                log.warning("labels.jsonl line %d is unreadable (%s); skipped (a write cut short by a crash?)", n,
                            label)
            else:
                out.setdefault(eid, []).append(label)
        return out

    def _label_lines(self) -> Iterator[tuple[int, str | None, Label | Exception]]:
        """Each non-empty line of labels.jsonl: (line number, episode id, its Label, or what made it unreadable)."""
        if not self.labels_path.exists():
            return
        with open(self.labels_path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    eid = row.pop("episode")
                    yield n, eid, Label(**row)
                except (json.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as e:
                    yield n, None, e

    def _arrays(self, path: Path) -> tuple[dict, dict, dict, np.ndarray]:
        """Every array of an episode file, read in full (so the zip checks each one's CRC): (lineage meta,
        observations, extras, actions). Raises CorruptEpisodeError, naming the file and the fix."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                observations = {k[4:]: z[k] for k in z.files if k.startswith("obs.")}
                extras = {k[6:]: z[k] for k in z.files if k.startswith("extra.")}
                actions = z["actions"]
            if not isinstance(meta, dict):
                raise ValueError("its lineage is not a JSON object")
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise CorruptEpisodeError(
                f"episode file {path} cannot be read ({type(e).__name__}: {e}). It was cut short or damaged after "
                f"it was written. Move it aside with `flywheel store check --repair {self.root}` (it is kept in "
                f"quarantine/, not deleted); the rest of the store is unaffected."
            ) from e
        return meta, observations, extras, actions

    def lineage(self, split: str | None = None) -> Iterator[tuple[Path, dict]]:
        """(path, lineage) of every stored episode, reading only its lineage (cheap: no frames are decompressed).
        Unreadable files are skipped with a warning."""
        for path in self.paths(split):
            try:
                with np.load(path, allow_pickle=False) as z:
                    yield path, json.loads(bytes(z["meta"]).decode())
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, json.JSONDecodeError) as e:
                log.warning("episode file %s cannot be read (%s): skipped", path, e)

    def read(self, path: Path, labels: list[Label] | None = None, with_ground_truth: bool = True) -> Episode:
        """Read one episode file. Raises CorruptEpisodeError, naming the file and the fix, if it is damaged."""
        meta, observations, extras, actions = self._arrays(path)
        missing = [k for k in LINEAGE if k not in meta]
        if missing:
            raise CorruptEpisodeError(f"episode file {path} lacks lineage {missing}: it was not written by this "
                                      f"store. Move it aside with `flywheel store check --repair {self.root}`.")
        return Episode(
            id=meta["id"],
            task=meta["task"],
            instruction=meta["instruction"],
            env_id=meta["env_id"],
            seed=meta["seed"],
            split=meta["split"],
            policy_version=meta["policy_version"],
            observations=observations,
            actions=actions,
            extras=extras,
            ground_truth=meta["ground_truth"] if with_ground_truth else None,
            labels=list(labels or []),
            info=meta.get("info", {}),
        )

    def load(self, episode_id: str, with_ground_truth: bool = True) -> Episode:
        for split in SPLITS:
            path = self.root / split / f"{episode_id}.npz"
            if path.exists():
                return self.read(path, self.labels().get(episode_id), with_ground_truth)
        raise KeyError(f"no episode {episode_id} in {self.root}")

    def iter(self, split: str | None = None, with_ground_truth: bool = False, skip_corrupt: bool = True) -> Iterator[Episode]:
        """All stored episodes with their labels. Ground truth is left out unless asked for (the learner never
        needs it). A damaged file is reported and skipped (``skip_corrupt``) or raised."""
        labels = self.labels()
        for path in self.paths(split):
            try:
                yield self.read(path, labels.get(path.stem), with_ground_truth)
            except CorruptEpisodeError as e:
                if not skip_corrupt:
                    raise
                log.warning("%s", e)

    def verify(self) -> dict:
        """Read every stored episode in full, as after a crash: ``episodes`` (files), ``unique_ids``, ``duplicates``
        (ids stored more than once), ``unreadable`` (each file with what was wrong), ``lineage_missing`` (how many
        readable files lack each lineage field), ``labels`` and ``labels_unreadable`` (lines of labels.jsonl), and
        ``ok``. Reads only; moves nothing."""
        paths = self.paths()
        seen: dict[str, int] = {}
        unreadable, lineage_missing = [], {k: 0 for k in LINEAGE}
        for path in paths:
            seen[path.stem] = seen.get(path.stem, 0) + 1  # a file is named by its episode's id
            try:
                meta = self._arrays(path)[0]
            except CorruptEpisodeError as e:
                cause = e.__cause__ or e
                unreadable.append({"path": str(path), "error": f"{type(cause).__name__}: {cause}"})
                continue
            for k in LINEAGE:
                lineage_missing[k] += k not in meta
            if meta.get("id", path.stem) != path.stem:
                unreadable.append({"path": str(path), "error": f"its lineage names another id, {meta['id']!r}"})
        label_lines = [label for _, _, label in self._label_lines()]
        bad_lines = sum(isinstance(label, Exception) for label in label_lines)
        lineage_missing = {k: n for k, n in lineage_missing.items() if n}
        duplicates = sorted(i for i, n in seen.items() if n > 1)
        return {"store": str(self.root), "episodes": len(paths), "unique_ids": len(seen), "duplicates": duplicates,
                "unreadable": unreadable, "lineage_missing": lineage_missing, "labels": len(label_lines),
                "labels_unreadable": bad_lines,
                "ok": not (unreadable or lineage_missing or duplicates or bad_lines)}

    def check(self, repair: bool = False) -> list[Path]:
        """Find unreadable episode files; with ``repair`` move them to quarantine/. Returns the bad paths."""
        bad = []
        for path in self.paths():
            try:
                self.read(path)
            except CorruptEpisodeError:
                bad.append(path)
                if repair:
                    dest = self.root / "quarantine" / path.parent.name / path.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, dest)
        return bad
