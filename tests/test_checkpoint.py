import numpy as np
import pytest

from flywheel.checkpoint import CheckpointDir, CheckpointError, load_weights, save_weights
from flywheel.vla.checkpoint import load_policy_checkpoint


def test_round_trip_keeps_metadata(tmp_path):
    w = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_weights(tmp_path / "x.safetensors", w, {"version": 3})
    back, meta = load_weights(tmp_path / "x.safetensors")
    assert np.array_equal(back["a"], w["a"]) and meta["version"] == 3


def test_missing_corrupt_and_nan_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    path = save_weights(tmp_path / "x.safetensors", {"a": np.ones(1000, np.float32)}, {})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="damaged or cut short"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="NaN"):
        save_weights(tmp_path / "n.safetensors", {"a": np.array([np.nan], np.float32)}, {})
    assert not (tmp_path / "n.safetensors").exists()


def test_keeps_last_k_and_skips_damaged(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for v in range(1, 5):
        ckpts.save(v, {"a": np.full(10, v, np.float32)}, {})
    assert ckpts.numbers() == [3, 4]
    ckpts.path(4).write_bytes(b"garbage")
    number, weights, _, _ = ckpts.latest_good()
    assert number == 3 and weights["a"][0] == 3


def test_trainer_state_travels_with_its_checkpoint_and_an_incomplete_one_is_skipped(tmp_path):
    import torch

    ckpts = CheckpointDir(tmp_path, keep=3)
    for v in (1, 2):
        ckpts.save(v, {"a": np.full(4, v, np.float32)}, {}, state={"step": v, "moments": torch.full((3,), float(v))})
    ckpts.state_path(2).write_bytes(b"cut")  # the state of the newest is damaged: it cannot resume training
    number, weights, _, state = ckpts.latest_good(with_state=True)
    assert number == 1 and state["step"] == 1 and torch.equal(state["moments"], torch.ones(3))
    assert ckpts.latest_good()[0] == 2  # for its weights alone it is still good
    ckpts.save(3, {"a": np.zeros(4, np.float32)}, {}, keep_also=(1,))
    ckpts.save(4, {"a": np.zeros(4, np.float32)}, {}, keep_also=(1,))
    assert ckpts.numbers() == [1, 2, 3, 4] and ckpts.latest_good(at_most=2)[0] == 2
    ckpts.save(5, {"a": np.zeros(4, np.float32)}, {})
    assert ckpts.numbers() == [3, 4, 5] and not ckpts.state_path(1).exists()


def test_shipped_base_loads():
    model, meta = load_policy_checkpoint("base", as_model=True)
    assert meta["final"]["success"] > 0.1 and "command" in meta


def test_shipped_suite_base_loads_says_how_it_was_made_and_acts_on_the_suite():
    """base:suite (the six families: the detector's suite evaluation starts from it) succeeds well above chance on
    held-out suite layouts (0.547 on 300 when it was made)."""
    from actors.rollout import run_episodes
    from actors.tabletop import split_seed
    from flywheel.vla.model import VLAPolicy

    model, meta = load_policy_checkpoint("base:suite", as_model=True)
    assert "env.family=suite" in meta["command"] and meta["final"]["success"] > 0.4
    eps = run_episodes([split_seed("eval", i) for i in range(60)], "eval", VLAPolicy(model=model), policy_version=0,
                       family="suite")
    assert len({ep.task for ep in eps}) >= 5
    assert np.mean([ep.ground_truth["success"] for ep in eps]) > 0.3
