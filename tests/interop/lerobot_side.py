"""The LeRobot side of `make test-interop`, run in .venv-lerobot (lerobot 0.4.4, its own torch).

    python lerobot_side.py read DATASET OUT.npz     LeRobot's own reader over a flywheel export: every frame, as loaded
    python lerobot_side.py write DEMOS.npz DATASET [video|images]   LeRobot's own writer: create, add_frame,
                                                    save_episode, finalize; the camera as video (LeRobot's default
                                                    encoding) or as images (PNG in the parquet rows)

It imports nothing of flywheel: what crosses between the two venvs is a LeRobot dataset one way and plain .npz
arrays the other.
"""

import json
import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset


def read(root: str, out: str) -> None:
    ds = LeRobotDataset("flywheel/export", root=root, video_backend="pyav")
    cameras = ds.meta.camera_keys
    rows = {k: [] for k in ("episode_index", "frame_index", "index", "state", "action", "environment_state",
                            "intervention", "final")}
    images = {k: [] for k in cameras}
    tasks = []
    for i in range(len(ds)):
        item = ds[i]
        for k in cameras:  # (C, H, W) float in [0, 1] -> (H, W, C) bytes
            images[k].append(np.round(item[k].numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
        rows["episode_index"].append(int(item["episode_index"]))
        rows["frame_index"].append(int(item["frame_index"]))
        rows["index"].append(int(item["index"]))
        rows["state"].append(item["observation.state"].numpy())
        rows["action"].append(item["action"].numpy())
        rows["environment_state"].append(item["observation.environment_state"].numpy())
        rows["intervention"].append(bool(item["flywheel.intervention"]))
        rows["final"].append(bool(item["flywheel.final"]))
        tasks.append(item["task"])
    episodes = ds.meta.episodes
    lineage = {k: list(episodes[k]) for k in episodes.column_names if k.startswith("flywheel/")}
    stats = {k: {s: np.asarray(v).tolist() for s, v in d.items()} for k, d in (ds.meta.stats or {}).items()}
    np.savez(out, **{k: np.asarray(v) for k, v in rows.items()},
             **{f"image/{k}": np.stack(v) for k, v in images.items()},
             tasks=np.asarray(tasks), meta=np.frombuffer(json.dumps({
                 "fps": ds.fps, "num_episodes": ds.num_episodes, "num_frames": ds.num_frames, "cameras": cameras,
                 "lineage": lineage, "stats": stats, "features": ds.meta.features}, default=str).encode(), np.uint8))


def write(demos: str, root: str, camera: str = "video") -> None:
    z = np.load(demos)
    image, state, action = z["image"], z["state"], z["action"]  # (N, H, W, 3), (N, P), (N, A): every frame
    episode, instruction = z["episode"], z["instruction"]
    features = {
        "observation.images.top": {"dtype": "video" if camera == "video" else "image", "shape": tuple(image.shape[1:]),
                                   "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (state.shape[1],), "names": None},
        "action": {"dtype": "float32", "shape": (action.shape[1],), "names": None},
    }
    if "environment_state" in z:  # a simulator's privileged state, under LeRobot's own key for it
        features["observation.environment_state"] = {"dtype": "float32", "shape": (z["environment_state"].shape[1],),
                                                     "names": None}
    ds = LeRobotDataset.create("lab/scripted-demos", fps=int(z["fps"]), root=Path(root), features=features,
                               robot_type="tabletop", use_videos=camera == "video")
    for e in np.unique(episode):
        for i in np.flatnonzero(episode == e):
            frame = {"observation.images.top": image[i], "observation.state": state[i], "action": action[i],
                     "task": str(instruction[i])}
            if "environment_state" in z:
                frame["observation.environment_state"] = z["environment_state"][i]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    print(json.dumps({"episodes": ds.num_episodes, "frames": ds.num_frames, "root": str(root)}))


if __name__ == "__main__":
    {"read": read, "write": write}[sys.argv[1]](*sys.argv[2:])
