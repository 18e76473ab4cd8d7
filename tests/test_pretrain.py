"""`flywheel pretrain` is reproducible: the same command, seed and threads give the same weights; and it resumes."""

import numpy as np
import pytest

from flywheel.config import load_config
from flywheel.pretrain import pretrain
from flywheel.vla.checkpoint import load_policy_checkpoint


def _run(out, steps: int = 12):
    cfg = load_config("pretrain", [f"out_dir={out}", "demos=4", f"steps={steps}", "batch_size=8", "warmup=2",
                                   "eval_every=1000", "eval_episodes=4", "checkpoint_every=6", "env.max_steps=12"])
    record = pretrain(cfg, say=lambda m: None)
    _, weights, _ = load_policy_checkpoint(str(out / "base_vla.safetensors"))
    return record, weights


def test_the_same_command_gives_the_same_base(tmp_path):
    (record, a), (_, b) = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert record["code"] is None or len(record["code"].split("+")[0]) == 12  # the commit that made it, in git
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_resumed_pretraining_ends_where_an_uninterrupted_one_does(tmp_path):
    _, whole = _run(tmp_path / "whole")

    def interrupt(step, total, loss):
        if step == 8:  # after the checkpoint at step 6
            raise KeyboardInterrupt

    cfg = load_config("pretrain", [f"out_dir={tmp_path / 'split'}", "demos=4", "steps=12", "batch_size=8", "warmup=2",
                                   "eval_every=1000", "eval_episodes=4", "checkpoint_every=6", "env.max_steps=12"])
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, say=lambda m: None, progress=interrupt)
    _, resumed = _run(tmp_path / "split")
    assert all(np.array_equal(whole[k], resumed[k]) for k in whole)
