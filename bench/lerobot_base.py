"""A base pretrained from a LeRobot-written dataset against one pretrained from the same demonstrations in flywheel's
own store (issue 35): the same held-out success, within their intervals?

1. ``flywheel pretrain`` as the shipped base was made (100 demonstrations of the standard and carrier operators,
   6,000 steps): the scripted expert's demonstrations go into OUT/store/demos.
2. Those same episodes, frame by frame, are written by LeRobot 0.4.4 itself (.venv-lerobot, `make lerobot-venv`):
   ``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` / ``finalize``, the camera named
   observation.images.top, twice: as PNG images (``use_videos=False``, lossless) and as video with LeRobot's default
   encoding (AV1, 4:2:0, crf 30), as a team's dataset would come.
3. ``flywheel pretrain demos_from=OUT/dataset-X demo_keys.image=observation.images.top`` trains a base from each.

Every base is evaluated on the same 500 held-out seeds. ``met``: the base from LeRobot's lossless dataset lies within
the interval of the one from flywheel's store (the format carried the demonstrations whole); the video figure says
what LeRobot's default encoding costs on the tabletop's 64x64 frames. Resumable: a finished step is not run again.

    PYTHONPATH=. .venv/bin/python bench/lerobot_base.py [OUT]      (~30 min on 2 cores)
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


def write_with_lerobot(demos: EpisodeStore, dataset: Path, camera: str, fps: int = 10) -> None:
    """Each demonstration's T steps as T frames (observation t, action t), written by LeRobot's own writer."""
    if (dataset / "meta" / "info.json").is_file():
        return
    episodes = sorted(demos.iter("train"), key=lambda ep: ep.seed)  # the order flywheel pretrain reads them in
    arrays = {"image": [], "state": [], "action": [], "environment_state": [], "episode": [], "instruction": []}
    for i, ep in enumerate(episodes):
        t = ep.num_steps
        arrays["image"].append(ep.observations["image"][:t])
        arrays["state"].append(ep.observations["proprio"][:t])
        arrays["action"].append(ep.actions)
        arrays["environment_state"].append(ep.extras["aux_positions"][:t])  # the simulator's privileged positions
        arrays["episode"].append(np.full(t, i))
        arrays["instruction"].append(np.array([ep.instruction] * t))
    npz, partial = dataset.with_suffix(".npz"), dataset.with_name(dataset.name + ".partial")
    np.savez(npz, fps=fps, **{k: np.concatenate(v) for k, v in arrays.items()})
    shutil.rmtree(partial, ignore_errors=True)  # LeRobot writes meta/info.json first: only a finished one is kept
    subprocess.run([str(LEROBOT), str(ROOT / "tests/interop/lerobot_side.py"), "write", str(npz), str(partial), camera],
                   check=True)
    partial.rename(dataset)


def main(out: Path) -> None:
    if not LEROBOT.is_file():
        sys.exit("LeRobot's venv is missing: make lerobot-venv")
    own = pretrain(out / "store", "operators=[standard,carrier]")["final"]
    theirs = {}
    for camera in ("images", "video"):
        write_with_lerobot(EpisodeStore(out / "store" / "demos"), out / f"dataset-{camera}", camera)
        theirs[camera] = pretrain(out / f"lerobot-{camera}", f"demos_from={out / f'dataset-{camera}'}",
                                  "demo_keys.image=observation.images.top")["final"]
    same = theirs["images"]
    overlap = own["ci95"][0] <= same["ci95"][1] and same["ci95"][0] <= own["ci95"][1]
    keep = ("success", "ci95", "episodes", "per_task")
    write_result("lerobot_base", same["success"] / own["success"], 1.0, overlap,
                 args=[str(out)] if len(sys.argv) > 1 else [],
                 from_store={k: own[k] for k in keep},
                 from_lerobot_images={k: same[k] for k in keep},
                 from_lerobot_video={k: theirs["video"][k] for k in keep},
                 demos=100, steps=6000,
                 what="held-out success (500 seeds) of a base pretrained from LeRobot 0.4.4's own writing (PNG "
                      "frames) of the shipped base's 100 demonstrations / of the base pretrained from the same "
                      "demonstrations in flywheel's store; met: their 95% intervals overlap",
                 note="ratio: held-out success of the base from LeRobot's lossless (PNG) dataset over the base from "
                      "flywheel's store; met: their 95% intervals overlap. from_lerobot_video: the same "
                      "demonstrations through LeRobot's default video encoding (AV1 4:2:0 crf 30)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "lerobot-base")
