"""Writing episodes to the store: how long ``EpisodeStore.add`` takes per episode, against the same episodes written
with ``np.savez_compressed`` (zlib level 6, what the store used before session 11), in the same run.

    PYTHONPATH=. .venv/bin/python bench/store_write.py [episodes]      # default 256

The episodes are the shipped base's own practice on the built-in tasks (both cameras, as a run records them),
written to a temporary folder: each with its fsyncs, as in a run. Sizes on disk are reported beside the times.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

import flywheel.store as store_module
from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import best_of, write_result
from flywheel.store import EpisodeStore
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import VLAPolicy


def savez_level6(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def main(n: int) -> None:
    model, _ = load_policy_checkpoint("base", as_model=True)
    episodes = run_episodes([split_seed("train", i) for i in range(n)], "train", VLAPolicy(model=model),
                            policy_version=0, sensors=("overhead", "wrist"))
    with tempfile.TemporaryDirectory() as tmp:
        rounds = iter(range(100))

        def write_all() -> float:
            store = EpisodeStore(Path(tmp) / str(next(rounds)))
            for ep in episodes:
                store.add(ep)
            return sum(p.stat().st_size for p in store.paths())

        now = best_of(write_all) / n
        now_bytes = write_all() / n
        ours = store_module.npz_bytes
        store_module.npz_bytes = savez_level6
        try:
            before = best_of(write_all) / n
            before_bytes = write_all() / n
        finally:
            store_module.npz_bytes = ours
    write_result("store_write", before / now, None, None,
                 what="seconds per episode written by EpisodeStore.add with np.savez_compressed (zlib 6) / with "
                      "npz_bytes (zlib 1), the same episodes, fsyncs included",
                 ms_per_episode=now * 1e3, ms_per_episode_level6=before * 1e3, kb_per_episode=now_bytes / 1e3,
                 kb_per_episode_level6=before_bytes / 1e3, episodes=n)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
