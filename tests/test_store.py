import json

import numpy as np
import pytest

from flywheel.contracts import Label
from flywheel.store import CorruptEpisodeError, EpisodeStore


def test_round_trip_with_lineage_and_labels(tmp_path, demos):
    store = EpisodeStore(tmp_path)
    ep = demos[0]
    store.add(ep)
    store.add_label(ep.id, Label(source="detector", success=True, version="detector-1", score=0.9, threshold=0.5))
    back = store.load(ep.id)
    assert back.instruction == ep.instruction and back.seed == ep.seed and back.split == "train"
    assert back.policy_version == -1 and back.ground_truth == ep.ground_truth
    assert np.array_equal(back.observations["image"], ep.observations["image"])
    assert np.array_equal(back.actions, ep.actions)
    assert np.array_equal(back.extras["aux_positions"], ep.extras["aux_positions"])
    assert back.latest_label("detector").score == 0.9
    assert not list(tmp_path.rglob("*.tmp-*"))  # atomic: no temporary left behind


def test_learner_view_hides_ground_truth(tmp_path, demos):
    store = EpisodeStore(tmp_path)
    store.add(demos[0])
    (ep,) = list(store.iter())
    assert ep.ground_truth is None
    (ep,) = list(store.iter(with_ground_truth=True))
    assert ep.ground_truth == {"success": True}


def test_relabelling_appends_and_never_overwrites(tmp_path, demos):
    store = EpisodeStore(tmp_path)
    store.add(demos[0])
    store.add_label(demos[0].id, Label(source="detector", success=False, version="detector-1"))
    store.add_label(demos[0].id, Label(source="detector", success=True, version="detector-2"))
    labels = store.labels()[demos[0].id]
    assert [lab.version for lab in labels] == ["detector-1", "detector-2"]
    with pytest.raises(FileExistsError):
        store.add(demos[0])


def test_episode_file_cut_short_is_reported_and_quarantined(tmp_path, demos):
    store = EpisodeStore(tmp_path)
    paths = [store.add(ep) for ep in demos[:3]]
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptEpisodeError, match="cut short or damaged.*store check --repair"):
        store.load(demos[1].id)
    assert len(list(store.iter())) == 2  # the others still read
    bad = store.check(repair=True)
    assert bad == [paths[1]]
    assert (tmp_path / "quarantine" / "train" / paths[1].name).exists()  # moved aside, not deleted
    assert len(store) == 2


def test_label_line_cut_short_is_skipped(tmp_path, demos):
    store = EpisodeStore(tmp_path)
    store.add(demos[0])
    store.add_label(demos[0].id, Label(source="human", success=True, version="ana"))
    with open(store.labels_path, "a") as f:
        f.write(json.dumps({"episode": demos[0].id, "source": "detector"})[:20])
    assert [lab.version for lab in store.labels()[demos[0].id]] == ["ana"]


def test_demos_command_appends_labelled_demonstrations_and_resumes(tmp_path):
    from flywheel.cli import main
    from flywheel.store import EpisodeStore

    out = tmp_path / "demos"
    assert main(["demos", f"out_dir={out}", "episodes=6", "env.family=suite"]) == 0
    eps = list(EpisodeStore(out).iter("train", with_ground_truth=True))
    assert len(eps) == 6 and all(ep.policy_version == -1 for ep in eps)
    assert all(ep.labels and ep.labels[-1].source == "demo" and ep.labels[-1].success for ep in eps)
    assert main(["demos", f"out_dir={out}", "episodes=8", "env.family=suite"]) == 0  # only the 2 missing seeds
    assert sorted(ep.seed for ep in EpisodeStore(out).iter("train")) == list(range(8))
    assert main(["demos", "episodes=2"]) == 2  # no store given


def test_store_verify_reports_every_kind_of_damage_as_json(tmp_path, demos, capsys):
    """`flywheel store verify run_dir=PATH`: counts, duplicate ids, each unreadable file with what was wrong, lineage
    fields missing, label lines cut short; exit 0 only for a whole store. It reads, it never moves anything."""
    import io
    import shutil

    from flywheel.cli import main

    store = EpisodeStore(tmp_path / "run" / "episodes")
    paths = [store.add(ep) for ep in demos[:4]]
    store.add_label(demos[0].id, Label(source="human", success=True, version="ana"))
    assert main(["store", "verify", f"run_dir={tmp_path / 'run'}"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {**report, "episodes": 4, "unique_ids": 4, "duplicates": [], "unreadable": [],
                      "lineage_missing": {}, "labels": 1, "labels_unreadable": 0, "ok": True}

    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])  # cut short
    (tmp_path / "run" / "episodes" / "holdout").mkdir(exist_ok=True)
    shutil.copy(paths[2], tmp_path / "run" / "episodes" / "holdout" / paths[2].name)  # the same id twice
    with np.load(paths[3]) as z:  # readable, but written without its seed
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    del meta["seed"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    paths[3].write_bytes(buf.getvalue())
    with open(store.labels_path, "a") as f:
        f.write('{"episode": "x", "sour')
    assert main(["store", "verify", f"run_dir={tmp_path / 'run'}"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 5 and report["unique_ids"] == 4 and report["duplicates"] == [demos[2].id]
    assert [u["path"] for u in report["unreadable"]] == [str(paths[1])]
    assert "BadZipFile" in report["unreadable"][0]["error"] or "EOF" in report["unreadable"][0]["error"]
    assert report["lineage_missing"] == {"seed": 1} and report["labels_unreadable"] == 1 and not report["ok"]
    assert paths[1].exists() and len(store) == 5  # nothing moved
    with pytest.raises(CorruptEpisodeError, match=r"lacks lineage \['seed'\]"):
        store.read(paths[3])
    assert main(["store", "verify", f"run_dir={tmp_path / 'nowhere'}"]) == 1
    assert main(["store", "verify"]) == 2
