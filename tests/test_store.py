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
