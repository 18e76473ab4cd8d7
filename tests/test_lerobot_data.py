"""LeRobotDataset v3.0 export and import (flywheel/lerobot_export.py, flywheel/lerobot_import.py), relabelling
(reward/relabel.py) and pretraining from a dataset, checked through flywheel's own reader. LeRobot's own reader and
writer check the same files in tests/test_lerobot_interop.py (make test-interop)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flywheel.contracts import INTERVENTION, Label
from flywheel.lerobot_export import Selection, export_store
from flywheel.lerobot_format import DatasetError
from flywheel.lerobot_import import import_dataset, read_dataset
from flywheel.store import EpisodeStore

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess:
    """``flywheel ARGS`` in a process of its own (a command that sets torch's threads), its messages on one line
    each (a wide terminal)."""
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "COLUMNS": "1000"})


@pytest.fixture
def flywheel(capsys, monkeypatch):
    """``flywheel ARGS`` in this process (no interpreter to start) -> (exit status, what it printed, on wide lines)."""
    from flywheel import cli as command

    monkeypatch.setattr(command.console, "width", 1000)

    def call(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            status = command.main(list(args))
        except SystemExit as e:  # a config that does not compose exits 2
            status = e.code
        return status, capsys.readouterr().out

    return call


def printed_json(out: str) -> dict:
    return json.loads(out[out.index("{"):])


@pytest.fixture(scope="module")
def store(finished_run, tmp_path_factory):
    """A fifth of the finished tiny run's episodes (every split, policy versions, detector labels), with a person's
    verdict, a takeover and a safety record added to three of them, as a robot night leaves them."""
    root = tmp_path_factory.mktemp("lineage") / "episodes"
    source = EpisodeStore(finished_run[0] / "episodes")
    out = EpisodeStore(root)
    labels = source.labels()
    for i, path in enumerate(source.paths()[::5]):
        ep = source.read(path, labels.get(path.stem))
        if i == 1:
            ep.extras[INTERVENTION] = np.arange(ep.num_steps) < 3
            ep.info["interventions"] = 3
        if i == 2:
            ep.info["safety"] = {"estops": 1, "clamped": 4}
        out.add(ep)
    first = out.paths()[0].stem
    out.add_label(first, Label("human", False, version="ana"))
    return out


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_an_export_reads_back_whole(store, tmp_path):
    report = export_store(store, tmp_path / "ds")
    n = len(store.paths())
    assert report["exported"] == n and report["total_episodes"] == n
    info = json.loads((tmp_path / "ds/meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == n and info["fps"] == 10
    assert info["features"]["observation.images.overhead"]["info"]["video.codec"] == "h264"
    assert {"chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path", "splits"} <= \
        set(info)
    stats = json.loads((tmp_path / "ds/meta/stats.json").read_text())
    assert {"q01", "q10", "q50", "q90", "q99", "min", "max", "mean", "std", "count"} <= set(stats["action"])
    assert stats["action"]["count"] == [info["total_frames"]]
    tasks = pd.read_parquet(tmp_path / "ds/meta/tasks.parquet")
    assert set(tasks.index) == {ep.instruction for ep in store.iter()}  # the task strings are the index

    original = {ep.id: ep for ep in store.iter(with_ground_truth=True)}
    back = list(read_dataset(tmp_path / "ds"))
    assert sorted(ep.id for ep in back) == sorted(original)
    for ep in back:
        want = original[ep.id]
        assert np.array_equal(ep.actions, want.actions)
        assert np.array_equal(ep.observations["proprio"], want.observations["proprio"])
        error = np.abs(ep.observations["image"].astype(int) - want.observations["image"].astype(int))
        assert error.max() <= 1  # lossless in colour; RGB -> YUV -> RGB rounds by one level at most
        assert np.array_equal(ep.intervened(), want.intervened())
        assert ("aux_positions" in ep.extras) == ("aux_positions" in want.extras)  # the simulator's positions
        assert np.array_equal(ep.extras.get("aux_positions", 0), want.extras.get("aux_positions", 0))
        assert (ep.task, ep.instruction, ep.seed, ep.split, ep.policy_version, ep.env_id) == \
            (want.task, want.instruction, want.seed, want.split, want.policy_version, want.env_id)
        assert ep.labels == want.labels and ep.ground_truth == want.ground_truth
        assert ep.info.get("safety") == want.info.get("safety")
    assert any(ep.intervened().any() for ep in back) and any(lab.source == "human" for ep in back for lab in ep.labels)


def test_a_second_night_appends_without_rewriting_the_first(store, tmp_path):
    paths = store.paths()
    half = EpisodeStore(tmp_path / "half")
    labels = store.labels()
    for p in paths[: len(paths) // 2]:
        half.add(store.read(p, labels.get(p.stem)))
    export_store(half, tmp_path / "ds")
    first = files(tmp_path / "ds")
    report = export_store(store, tmp_path / "ds")
    assert report["exported"] == len(paths) - len(paths) // 2 and report["already_there"] == len(paths) // 2
    after = files(tmp_path / "ds")
    kept = {k: v for k, v in first.items() if not k.startswith("meta/") or "episodes" in k}
    assert all(after[k] == v for k, v in kept.items())  # data, videos and episode rows of the first night untouched
    assert len(after) > len(first)
    ids = [ep.id for ep in read_dataset(tmp_path / "ds")]
    assert sorted(ids) == sorted(p.stem for p in paths)
    assert export_store(store, tmp_path / "ds")["exported"] == 0  # nothing new: nothing written
    assert files(tmp_path / "ds") == after


def test_the_selection_chooses_what_is_exported(store, tmp_path):
    labels = store.labels()
    newest = {eid: max(ls, key=lambda lab: lab.created) for eid, ls in labels.items()}
    wins = export_store(store, tmp_path / "wins", Selection(label="success"))
    assert wins["exported"] == sum(lab.success for lab in newest.values())
    assert all(ep.latest_label().success for ep in read_dataset(tmp_path / "wins"))
    assert export_store(store, tmp_path / "human", Selection(human_only=True))["exported"] == 1
    assert export_store(store, tmp_path / "helped", Selection(corrected_only=True))["exported"] == 1
    versions = {m["policy_version"] for _, m in store.lineage()}
    newest_version = max(versions)
    only = export_store(store, tmp_path / "newest", Selection(versions=[newest_version], split="train"))
    assert only["exported"] == sum(m["policy_version"] == newest_version and m["split"] == "train"
                                   for _, m in store.lineage())


def test_damaged_files_are_named_and_nothing_exported_is_lost(store, tmp_path):
    ds = tmp_path / "ds"
    export_store(store, ds)
    data = ds / "data/chunk-000/file-000.parquet"
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # truncated: no footer
    before = files(ds)
    with pytest.raises(DatasetError, match="data/chunk-000/file-000.parquet"):
        list(read_dataset(ds))
    with pytest.raises(DatasetError, match="data/chunk-000/file-000.parquet"):
        export_store(store, ds)  # appending to a damaged dataset: refused before anything is written
    assert files(ds) == before
    data.write_bytes(good)

    video = ds / "videos/observation.images.overhead/chunk-000/file-000.mp4"
    video.rename(tmp_path / "aside.mp4")
    with pytest.raises(DatasetError, match="file-000.mp4 is missing"):
        list(read_dataset(ds))
    (tmp_path / "aside.mp4").rename(video)
    whole = video.read_bytes()
    video.write_bytes(whole[: len(whole) // 2])  # cut short: the later episodes' frames are gone
    with pytest.raises(DatasetError, match="file-000.mp4"):
        list(read_dataset(ds))
    video.write_bytes(whole)

    info = ds / "meta/info.json"
    original = info.read_text()
    info.write_text(original.replace('"v3.0"', '"v2.1"'))
    with pytest.raises(DatasetError, match=r"info.json says codebase_version 'v2.1'.*convert"):
        list(read_dataset(ds))
    with pytest.raises(DatasetError, match="info.json"):
        export_store(store, ds)
    info.write_text(original)
    assert len(list(read_dataset(ds))) == len(store.paths())  # all of it still there


def test_an_export_cut_short_is_cleared_by_the_next(store, tmp_path):
    ds = tmp_path / "ds"
    half = EpisodeStore(tmp_path / "half")
    for p in store.paths()[:3]:
        half.add(store.read(p))
    export_store(half, ds)
    committed = files(ds)
    # what a crash before the commit leaves: new files, info.json not yet updated
    leftover = ds / "data/chunk-000/file-001.parquet"
    leftover.write_bytes(b"half a file")
    (ds / "meta/episodes/chunk-000/file-001.parquet").write_bytes(b"half")
    assert len(list(read_dataset(ds))) == 3  # a reader goes by info.json's count
    report = export_store(store, ds)
    assert report["exported"] == len(store.paths()) - 3
    assert all(files(ds)[k] == v for k, v in committed.items() if not k.startswith("meta/") or "episodes" in k)
    assert len(list(read_dataset(ds))) == len(store.paths())


def test_import_into_a_store_then_a_new_detector_relabels_it(store, finished_run, tmp_path, flywheel):
    export_store(store, tmp_path / "ds")
    target = EpisodeStore(tmp_path / "imported")
    report = import_dataset(tmp_path / "ds", target)
    assert report["imported"] == len(store.paths())
    assert import_dataset(tmp_path / "ds", target)["imported"] == 0  # by id: a second import adds nothing
    assert target.verify()["ok"]
    episode_files = {k: v for k, v in files(target.root).items() if k != "labels.jsonl"}
    labels_before = sum(len(v) for v in target.labels().values())

    detector = finished_run[0] / "detector" / "detector-1.safetensors"
    status, out = flywheel("reward", "relabel", f"detector={detector}", f"store={target.root}")
    assert status == 0, out
    result = printed_json(out)
    n = len(target.paths())
    assert result["labelled"] == n and result["detector"].startswith("detector-1@")  # told apart from other runs'
    labels = target.labels()
    assert sum(len(v) for v in labels.values()) == labels_before + n
    assert all(any(lab.version == result["detector"] and lab.score is not None for lab in labels[p.stem])
               for p in target.paths())
    assert {k: v for k, v in files(target.root).items() if k != "labels.jsonl"} == episode_files  # none rewritten
    assert printed_json(flywheel("reward", "relabel", f"detector={detector}", f"store={target.root}")[1])[
        "labelled"] == 0


@pytest.mark.slow  # ~20 s: a detector's training in a process of its own
def test_an_imported_dataset_trains_a_detector(finished_run, tmp_path):
    export_store(EpisodeStore(finished_run[0] / "episodes"), tmp_path / "ds")
    import_dataset(tmp_path / "ds", EpisodeStore(tmp_path / "run" / "episodes"))
    out = cli("reward", "train", f"run_dir={tmp_path / 'run'}", "experiment=tiny")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "detector" / "metrics.json").read_text())
    assert metrics["n"] > 0 and metrics["auroc"] is not None  # trained on the imported labels, judged on its newest


def test_pretrain_reads_demonstrations_from_a_dataset_and_the_learner_replays_them(demos, tmp_path):
    from flywheel.parts import pretraining_demos

    source = EpisodeStore(tmp_path / "demos")
    for ep in demos[:6]:
        source.add(ep)
    export_store(source, tmp_path / "ds")
    out = tmp_path / "base"
    run = cli("pretrain", f"out_dir={out}", "demos=6", "steps=4", "eval_every=4", "eval_episodes=4",
              "checkpoint_every=4", f"demos_from={tmp_path / 'ds'}")
    assert run.returncode == 0, run.stderr
    record = json.loads((out / "base_vla.json").read_text())
    assert record["config"]["demos_from"] == str(tmp_path / "ds")
    env = {**record["config"]["env"], "name": "tabletop"}
    replayed = pretraining_demos(6, record, env)
    assert sorted(ep.id for ep in replayed) == sorted(ep.id for ep in demos[:6])
    assert all(np.array_equal(a.actions, b.actions) for a, b in
               zip(sorted(replayed, key=lambda e: e.id), sorted(demos[:6], key=lambda e: e.id)))

    # a policy flywheel did not pretrain (no record) replays a team's dataset given as learner.demos_from
    from flywheel.config import load_config

    cfg = load_config("run", [f"learner.demos_from={tmp_path / 'ds'}", "learner.demos=4"])
    theirs = pretraining_demos(cfg.learner.demos, {}, env, cfg.learner.demos_from, dict(cfg.learner.demo_keys))
    assert [ep.id for ep in theirs] == [ep.id for ep in replayed][:4]  # the dataset's first, in its order
    assert all(ep.info["lerobot"]["dataset"] == "ds" for ep in theirs)

    from flywheel.config import ConfigError
    from flywheel.pretrain import dataset_demos

    with pytest.raises(ConfigError, match="holds 6 episodes; 50 demonstrations were asked for"):
        dataset_demos(str(tmp_path / "ds"), {}, 50, env)


def test_cli_export_and_import(store, tmp_path, flywheel):
    status, out = flywheel("data", "export", f"run_dir={store.root.parent}", f"out={tmp_path / 'ds'}", "label=success")
    assert status == 0 and printed_json(out)["exported"] > 0, out
    status, out = flywheel("data", "export", f"run_dir={store.root.parent}", f"out={tmp_path / 'ds'}", "lable=success")
    assert status == 2 and "Did you mean label" in out
    status, out = flywheel("data", "import", f"dataset={tmp_path / 'nothing'}", f"store={tmp_path / 's'}")
    assert status == 1 and "meta/info.json is missing" in out
    status, out = flywheel("data", "import", f"dataset={tmp_path / 'ds'}", f"store={tmp_path / 's'}")
    assert status == 0 and EpisodeStore(tmp_path / "s").verify()["ok"]
