"""LeRobot 0.4.4 itself reads flywheel's export and writes a dataset flywheel imports and trains from (issue 35).

LeRobot needs its own torch, so it runs in .venv-lerobot (`make test-interop` builds it) as a separate process:
tests/interop/lerobot_side.py. Marked ``interop``: `make test-interop` runs these, and CI runs that.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flywheel.config import DatasetKeys
from flywheel.contracts import INTERVENTION, Label
from flywheel.lerobot_export import export_store
from flywheel.lerobot_import import read_dataset
from flywheel.store import EpisodeStore

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parent.parent
LEROBOT = ROOT / ".venv-lerobot" / "bin" / "python"
SIDE = ROOT / "tests" / "interop" / "lerobot_side.py"


def lerobot(*args: str) -> str:
    assert LEROBOT.is_file(), "LeRobot's venv is missing: `make test-interop` builds it (make lerobot-venv)"
    out = subprocess.run([str(LEROBOT), str(SIDE), *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def store(demos, tmp_path_factory):
    """Scripted episodes with flywheel's lineage on them: a detector's and a person's labels, a takeover."""
    out = EpisodeStore(tmp_path_factory.mktemp("interop") / "episodes")
    for i, ep in enumerate(demos[:12]):
        if i == 3:
            ep = type(ep)(**{**ep.__dict__, "extras": {**ep.extras, INTERVENTION: np.arange(ep.num_steps) % 2 == 0},
                             "info": {**ep.info, "interventions": (ep.num_steps + 1) // 2}})
        out.add(ep)
    ids = [p.stem for p in out.paths()]
    out.add_labels([(ids[0], Label("detector", True, version="detector-3", score=0.91, threshold=0.5)),
                    (ids[1], Label("human", False, version="ana"))])
    return out


def test_lerobot_reads_every_frame_of_an_export(store, tmp_path):
    export_store(store, tmp_path / "ds")
    lerobot("read", str(tmp_path / "ds"), str(tmp_path / "read.npz"))
    z = np.load(tmp_path / "read.npz")
    meta = json.loads(bytes(z["meta"]))
    episodes = {ep.id: ep for ep in store.iter(with_ground_truth=True)}
    ids = meta["lineage"]["flywheel/id"]  # by episode_index, as LeRobot's metadata gives them
    assert sorted(ids) == sorted(episodes) and meta["num_episodes"] == len(episodes)
    assert meta["num_frames"] == sum(ep.num_steps + 1 for ep in episodes.values()) == len(z["index"])
    assert set(meta["stats"]["action"]) >= {"q01", "q10", "q50", "q90", "q99"}
    for e, eid in enumerate(ids):
        ep, rows = episodes[eid], z["episode_index"] == e
        n = ep.num_steps
        assert np.array_equal(z["frame_index"][rows], np.arange(n + 1))
        assert np.array_equal(z["state"][rows], ep.observations["proprio"])
        assert np.array_equal(z["environment_state"][rows], ep.extras["aux_positions"])
        assert np.array_equal(z["action"][rows][:n], ep.actions) and not z["action"][rows][n].any()
        assert np.array_equal(z["final"][rows], np.arange(n + 1) == n)
        assert np.array_equal(z["intervention"][rows][:n], ep.intervened())
        assert set(z["tasks"][rows]) == {ep.instruction}
        image = z["image/observation.images.overhead"][rows].astype(int)
        assert np.abs(image - ep.observations["image"].astype(int)).max() <= 1  # codec tolerance: lossless in colour
        labels = json.loads(meta["lineage"]["flywheel/labels"][e])
        assert [Label(**lab) for lab in labels] == ep.labels
        assert meta["lineage"]["flywheel/policy_version"][e] == ep.policy_version
    assert sum(z["intervention"]) > 0


@pytest.mark.parametrize("camera", ["video", "images"])
def test_flywheel_imports_and_trains_from_what_lerobot_writes(demos, tmp_path, camera):
    arrays = {"image": [], "state": [], "action": [], "environment_state": [], "episode": [], "instruction": []}
    for i, ep in enumerate(demos):  # a team's recording: observation t and action t at every step
        t = ep.num_steps
        arrays["image"].append(ep.observations["image"][:t])
        arrays["state"].append(ep.observations["proprio"][:t])
        arrays["action"].append(ep.actions)
        arrays["environment_state"].append(ep.extras["aux_positions"][:t])
        arrays["episode"].append(np.full(t, i))
        arrays["instruction"].append(np.array([ep.instruction] * t))
    np.savez(tmp_path / "demos.npz", fps=10, **{k: np.concatenate(v) for k, v in arrays.items()})
    lerobot("write", str(tmp_path / "demos.npz"), str(tmp_path / "ds"), camera)

    keys = DatasetKeys(image="observation.images.top")
    back = list(read_dataset(tmp_path / "ds", keys))
    assert len(back) == len(demos)
    for ep, want in zip(back, demos):
        t = want.num_steps
        assert ep.instruction == want.instruction and ep.info["final_observation"] == "last frame"
        assert np.array_equal(ep.actions, want.actions)
        assert np.array_equal(ep.observations["proprio"][:t], want.observations["proprio"][:t])
        assert np.array_equal(ep.extras["aux_positions"][:t], want.extras["aux_positions"][:t])
        error = np.abs(ep.observations["image"][:t].astype(int) - want.observations["image"][:t].astype(int))
        if camera == "images":
            assert error.max() == 0  # PNG
        else:
            assert error.mean() < 6  # LeRobot's own encoding (AV1, 4:2:0, crf 30): lossy at colour edges

    out = tmp_path / "base"
    run = subprocess.run([sys.executable, "-m", "flywheel.cli", "pretrain", f"out_dir={out}", f"demos={len(demos)}",
                          "steps=150", "eval_every=50", "eval_episodes=10", "checkpoint_every=150", "warmup=20",
                          f"demos_from={tmp_path / 'ds'}", "demo_keys.image=observation.images.top"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "COLUMNS": "1000"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    history = json.loads((out / "base_vla.json").read_text())["history"]
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]  # it learns from LeRobot's frames
