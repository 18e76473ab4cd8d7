"""A base pretrained from a LeRobot-written dataset against one pretrained from the same demonstrations in flywheel's
own store (issue 35): the same held-out success, within their intervals?

1. ``flywheel pretrain`` as the shipped base was made (100 demonstrations of the standard and carrier operators,
   6,000 steps): the scripted expert's demonstrations go into OUT/store/demos.
2. Those same episodes, frame by frame, are written by LeRobot 0.4.4 itself (.venv-lerobot, `make lerobot-venv`):
   ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize``, with LeRobot's default video encoding
   (AV1, 4:2:0) and its camera named observation.images.top, as a team's dataset would come.
3. ``flywheel pretrain demos_from=OUT/dataset demo_keys.image=observation.images.top`` trains the second base from it.

Both bases are evaluated on the same 500 held-out seeds. Resumable: a finished step is not run again.

    PYTHONPATH=. .venv/bin/python bench/lerobot_base.py [OUT]      (~20 min on 2 cores)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.common import write_result
from flywheel.store import EpisodeStore

ROOT = Path(__file__).resolve().parent.parent
LEROBOT = ROOT / ".venv-lerobot" / "bin" / "python"
SAME = ["demos=100", "steps=6000", "eval_every=3000", "eval_episodes=500"]


def pretrain(out: Path, *extra: str) -> dict:
    if not (out / "base_vla.json").is_file():
        subprocess.run([str(ROOT / ".venv/bin/flywheel"), "pretrain", f"out_dir={out}", *SAME, *extra], check=True)
    return json.loads((out / "base_vla.json").read_text())


def write_with_lerobot(demos: EpisodeStore, dataset: Path, fps: int = 10) -> None:
    """Each demonstration's T steps as T frames (observation t, action t), written by LeRobot's own writer."""
    if (dataset / "meta" / "info.json").is_file():
        return
    episodes = sorted(demos.iter("train"), key=lambda ep: ep.seed)  # the order flywheel pretrain reads them in
    arrays = {"image": [], "state": [], "action": [], "episode": [], "instruction": []}
    for i, ep in enumerate(episodes):
        t = ep.num_steps
        arrays["image"].append(ep.observations["image"][:t])
        arrays["state"].append(ep.observations["proprio"][:t])
        arrays["action"].append(ep.actions)
        arrays["episode"].append(np.full(t, i))
        arrays["instruction"].append(np.array([ep.instruction] * t))
    npz, partial = dataset.with_suffix(".npz"), dataset.with_name(dataset.name + ".partial")
    np.savez(npz, fps=fps, **{k: np.concatenate(v) for k, v in arrays.items()})
    shutil.rmtree(partial, ignore_errors=True)  # LeRobot writes meta/info.json first: only a finished one is kept
    subprocess.run([str(LEROBOT), str(ROOT / "tests/interop/lerobot_side.py"), "write", str(npz), str(partial)],
                   check=True)
    partial.rename(dataset)


def main(out: Path) -> None:
    if not LEROBOT.is_file():
        sys.exit("LeRobot's venv is missing: make lerobot-venv")
    own = pretrain(out / "store", "operators=[standard,carrier]")
    write_with_lerobot(EpisodeStore(out / "store" / "demos"), out / "dataset")
    theirs = pretrain(out / "lerobot", f"demos_from={out / 'dataset'}", "demo_keys.image=observation.images.top")
    a, b = own["final"], theirs["final"]
    overlap = a["ci95"][0] <= b["ci95"][1] and b["ci95"][0] <= a["ci95"][1]
    write_result("lerobot_base", b["success"] / a["success"], 1.0, overlap,
                 args=[str(out)] if len(sys.argv) > 1 else [],
                 from_store={k: a[k] for k in ("success", "ci95", "episodes", "per_task")},
                 from_lerobot_dataset={k: b[k] for k in ("success", "ci95", "episodes", "per_task")},
                 demos=100, steps=6000, note="ratio: held-out success of the base from the LeRobot-written dataset over "
                                             "the base from flywheel's store; met: their 95% intervals overlap")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "lerobot-base")
