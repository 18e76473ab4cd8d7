"""Resuming a run, and the promotion gate: a run killed at any point continues where it stopped, with no completed
episode lost and none used twice; a version that regresses is held back and the run rolls back."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch

from flywheel.config import ConfigError, load_config
from flywheel.resume import resumed_config
from flywheel.parts import loop_seed_index
from flywheel.run import run
from flywheel.store import EpisodeStore

TINY = ["experiment=tiny", "rollout.use_ray=false", "wandb.mode=disabled"]


def _resume(run_dir, *extra):
    given = [f"run_dir={run_dir}", *extra]
    return run(resumed_config(load_config("run", given), given), say=lambda m: None)


def _practice(run_dir):
    """Stored practice episodes: {seed index: attempts}, and the store's own check."""
    store = EpisodeStore(run_dir / "episodes")
    counts = Counter(loop_seed_index(meta["seed"]) for _, meta in store.lineage("train")
                     if meta["policy_version"] >= 0 and loop_seed_index(meta["seed"]) is not None)
    return counts, store.verify()


def test_a_run_killed_with_sigkill_resumes_with_no_episode_lost_or_repeated(tmp_path, tiny_detector):
    # judged by the finished tiny run's detector (training one is not what is under test: tests/test_loop.py), and
    # evaluated on 16 seeds: what is counted is every seed's outcome kept through the resume, not the figure
    run_dir, evals = tmp_path / "run", 16
    cmd = [sys.executable, "-m", "flywheel.cli", "run", *TINY, f"run_dir={run_dir}", "budget.iterations=3",
           f"eval.episodes={evals}", tiny_detector]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        state_file, deadline = run_dir / "run_state.json", time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # until an iteration is done
            if state_file.exists() and json.loads(state_file.read_text())["loop"]["iteration"] >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, with no chance to clean up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = json.loads(state_file.read_text())["loop"]
    assert 1 <= before["iteration"] < 3 and not (run_dir / "summary.json").exists()  # it had no time to write one

    summary = _resume(run_dir)
    assert summary["status"] == "completed" and summary["attempt"] == 2 and summary["iterations"] == 3
    assert summary["initial_success"] * evals == before["evaluations"][0]["successes"]  # the same starting point
    assert len(summary["evaluations"]) == 4  # before, and after each of the 3 iterations: none repeated
    kept = before["evaluations"][0]["outcomes"]  # per seed, kept through the resume for a paired comparison
    assert len(kept) == evals and kept.count("1") == before["evaluations"][0]["successes"]
    final = summary["final_outcomes"]
    assert len(final) == evals and final.count("1") == summary["final_success"] * evals
    counts, verified = _practice(run_dir)
    assert verified["ok"] and verified["duplicates"] == []
    # 3 iterations of 16 layouts x 2 attempts: every attempt there exactly once
    assert sorted(counts) == list(range(3 * 16)) and set(counts.values()) == {2}
    assert summary["episodes"] == 3 * 32


def test_sigterm_before_the_loop_stops_the_run_with_a_message_and_a_summary(tmp_path):
    """SIGTERM while the detector's episodes are collected, before the loop's graceful stop is in place: the command
    says it was interrupted and how to go on, writes its summary and exits 143, as a shell reports SIGTERM, rather
    than dying where it stood."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "flywheel.cli", "run", *TINY, f"run_dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "300"})
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("detector: collecting"):
                proc.send_signal(signal.SIGTERM)
                break
        out.extend(proc.stdout)
        assert proc.wait(60) == 128 + signal.SIGTERM, "".join(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = "".join(out)
    assert "run: interrupted (SIGTERM)" in said and f"flywheel run run_dir={run_dir}" in said, said
    assert "Traceback" not in said, said
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stop_reason"] == "SIGTERM"


def _copy(finished_run, tmp_path):
    shutil.copytree(finished_run[0], tmp_path / "run")
    return tmp_path / "run"


def test_the_iteration_in_flight_uses_what_it_stored_and_collects_only_the_rest(finished_run, tmp_path):
    """What an iteration in flight had stored when it was killed is used, never run again: its share, and the
    practice its actors went on with beyond it (rollout.keep_collecting), which the seed index then moves past."""
    import dataclasses
    import uuid

    from flywheel.parts import loop_seed

    run_dir = _copy(finished_run, tmp_path)
    shutil.copy(finished_run[1], run_dir / "run_state.json")  # back to the end of iteration 1
    store = EpisodeStore(run_dir / "episodes")
    second = [(p, m) for p, m in store.lineage("train") if (loop_seed_index(m["seed"]) or -1) >= 16]
    assert len(second) == 32
    lost = second[:10]  # iteration 2 had stored only 22 of its 32 when it was killed
    for path, _ in lost:
        path.unlink()
    beyond = [store.add(dataclasses.replace(store.read(p), id=uuid.uuid4().hex, seed=loop_seed(32 + k // 2)))
              for k, (p, _) in enumerate(second[10:26])]  # and 8 layouts (x 2 attempts) beyond its 16

    summary = _resume(run_dir, "budget.iterations=3")
    assert summary["iterations"] == 3 and summary["episodes"] == 32 + (32 + 16) + 32
    counts, verified = _practice(run_dir)
    assert verified["ok"] and sorted(counts) == list(range(16 + 24 + 16)) and set(counts.values()) == {2}
    ids = {p.stem for p in store.paths("train")}
    assert all(p.stem in ids for p, _ in second[10:]) and all(p.stem in ids for p in beyond)  # used, not run again
    assert not any(p.stem in ids for p, _ in lost)  # the 10 missing ones were run anew (new episodes)


def test_a_run_resumed_after_its_first_iteration_ends_as_the_uninterrupted_run(finished_run, tmp_path):
    """Back to the end of iteration 1 and resumed: iteration 2's update starts from the checkpoint's optimizer and
    generator (which also draws the flow's noise), with the replay buffer refilled in the order it was filled, and
    makes the same weights, bit for bit, as the run that was never stopped; its evaluations are the same too."""
    from flywheel.checkpoint import load_weights

    run_dir = _copy(finished_run, tmp_path)
    shutil.copy(finished_run[1], run_dir / "run_state.json")  # back to the end of iteration 1
    before = json.loads((finished_run[0] / "summary.json").read_text())
    summary = _resume(run_dir)
    assert summary["iterations"] == before["iterations"] == 2
    assert summary["evaluations"] == before["evaluations"]
    final = f"policy-{summary['policy_version_final']:06d}.safetensors"
    assert summary["policy_version_final"] == before["policy_version_final"] >= 2
    resumed, _ = load_weights(run_dir / "checkpoints" / final)
    uninterrupted, _ = load_weights(finished_run[0] / "checkpoints" / final)
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("learner", [
    ["learner=recap", "learner.value_steps=50", "learner.steps_per_update=20", "learner.practice_noise=1.0"],
    ["learner=ppo", "learner.self_imitation=0.5"]], ids=["recap", "ppo"])
def test_a_learner_with_a_replay_resumed_ends_as_the_uninterrupted_run(tmp_path, tiny_detector, learner):
    """RECAP keeps a value model whose fit labels the buffer; PPO replays its approved successes in its anchor.
    Stopped after iteration 1 and resumed, RECAP's refilled buffer is labelled under the value as the checkpoint
    kept it, not fitted again, and PPO's replay holds the same successes with the same weights: the updates after the
    resume make the uninterrupted run's weights, bit for bit. (RECAP's value fitted again: v3 differed.)"""
    from flywheel.checkpoint import load_weights

    given = [*TINY, "budget.iterations=3", *learner, "gate.episodes=0",
             "eval.every=100", "eval.episodes=8",  # the weights are compared, not the evaluations
             tiny_detector]
    whole = run(load_config("run", [*given, f"run_dir={tmp_path / 'whole'}"]), say=lambda m: None)

    sent = []

    def stop_after_the_first(state, row):
        if state.iteration == 1 and not sent:  # (called again after the final evaluation)
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's graceful stop: the run ends after iteration 1

    stopped = run(load_config("run", [*given, f"run_dir={tmp_path / 'stopped'}"]), say=lambda m: None,
                  on_iteration=stop_after_the_first)
    assert stopped["status"] == "stopped" and stopped["iterations"] == 1
    resumed = _resume(tmp_path / "stopped")
    assert resumed["policy_version_final"] == whole["policy_version_final"] == 3
    final = "checkpoints/policy-000003.safetensors"
    a, b = load_weights(tmp_path / "whole" / final)[0], load_weights(tmp_path / "stopped" / final)[0]
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_its_config_and_says_which_key_may_not_change(finished_run):
    run_dir = finished_run[0]
    given = [f"run_dir={run_dir}", "learner.demos=7"]  # (a key every learner takes)
    with pytest.raises(ConfigError, match=r"learner.demos: 40 -> 7"):
        resumed_config(load_config("run", given), given)
    given = [f"run_dir={run_dir}", "budget.iterations=5"]
    cfg = resumed_config(load_config("run", given), given)
    assert cfg.experiment == "tiny" and cfg.budget.iterations == 5 and cfg.rollout.use_ray is False


def test_a_run_whose_config_this_version_does_not_know_is_refused_untouched(finished_run, tmp_path):
    from flywheel.run import RunDirError

    run_dir = _copy(finished_run, tmp_path)
    recorded = run_dir / "config.yaml"
    recorded.write_text(recorded.read_text() + "retired_key: 1\n")
    given = [f"run_dir={run_dir}"]
    with pytest.raises(RunDirError, match="(?s)does not fit this version of flywheel.*start a new run_dir"):
        resumed_config(load_config("run", given), given)
    assert recorded.read_text().endswith("retired_key: 1\n")


def test_a_resumed_run_with_a_damaged_checkpoint_says_how_to_go_on(finished_run, tmp_path):
    from flywheel.checkpoint import CheckpointError

    run_dir = _copy(finished_run, tmp_path)
    wanted = json.loads((run_dir / "run_state.json").read_text())["policy_version"]
    damaged = run_dir / "checkpoints" / f"policy-{wanted:06d}.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    stored = len(EpisodeStore(run_dir / "episodes"))
    with pytest.raises(CheckpointError, match=r"cannot be resumed.*cut short.*policy.checkpoint=.*policy-\d+"):
        _resume(run_dir, "budget.iterations=3")
    assert len(EpisodeStore(run_dir / "episodes")) == stored


def _saboteur(monkeypatch):
    """A learner whose second update wrecks the action expert: a regression made on purpose."""
    from flywheel import plugins
    from learner.filtered_bc import FilteredBCLearner

    class Saboteur(FilteredBCLearner):
        def update(self, episodes):
            stats = super().update(episodes)
            if self.version == 2:
                with torch.no_grad():
                    for p in self.model.head.parameters():
                        p.add_(torch.randn_like(p) * 3.0)
            return stats

    monkeypatch.setitem(plugins.REGISTRY["learner"], "saboteur", Saboteur)
    return ["learner.algorithm=saboteur", "learner.ema=0"]  # (the wreck comes after the update's average)


def test_the_gate_holds_back_a_regressing_version_and_rolls_back(tmp_path, monkeypatch, tiny_detector):
    run_dir = tmp_path / "run"
    cfg = load_config("run", [*TINY, f"run_dir={run_dir}", "budget.iterations=2", *_saboteur(monkeypatch),
                              "gate.episodes=64", "gate.every=1", tiny_detector])
    summary = run(cfg, say=lambda m: None)
    decisions = summary["gate"]["decisions"]
    assert [d["promoted"] for d in decisions] == [True, False]
    held = decisions[1]
    assert held["candidate"] == 2 and held["deployed"] == 1 and held["upper"] < 0
    assert held["candidate_success"] < held["deployed_success"] - 0.15
    rollback = summary["rollbacks"][0]
    assert rollback == {**rollback, "from_version": 2, "to_weights_of": 1, "new_version": 3, "reason": "gate"}
    # the actors never practised with the wrecked v2; the run ends on v3, which is v1's weights
    store = EpisodeStore(run_dir / "episodes")
    versions = {m["policy_version"] for _, m in store.lineage("train") if loop_seed_index(m["seed"]) is not None}
    assert versions == {0, 1} and summary["policy_version_final"] == 3 and summary["gate"]["held_back"] == 1
    assert summary["evaluations"][-1]["success"] == summary["evaluations"][1]["success"]  # v3 acts as v1 did


def test_a_gate_every_second_update_rolls_back_the_untested_version_too(tmp_path, monkeypatch, tiny_detector):
    """gate.every=2: v1 goes to practice untested; the wrecked v2 is tested against v0, the last promoted, and held
    back, and the run returns to v0's weights, v1's update with it."""
    run_dir = tmp_path / "run"
    cfg = load_config("run", [*TINY, f"run_dir={run_dir}", "budget.iterations=2", *_saboteur(monkeypatch),
                              "gate.episodes=64", "gate.every=2", tiny_detector])
    summary = run(cfg, say=lambda m: None)
    (held,) = summary["gate"]["decisions"]
    assert not held["promoted"] and held["candidate"] == 2 and held["deployed"] == 0
    assert summary["rollbacks"][0] == {**summary["rollbacks"][0], "from_version": 2, "to_weights_of": 0,
                                       "new_version": 3}
    store = EpisodeStore(run_dir / "episodes")
    versions = {m["policy_version"] for _, m in store.lineage("train") if loop_seed_index(m["seed"]) is not None}
    assert versions == {0, 1}  # v1 practised, untested
    assert summary["evaluations"][-1]["success"] == summary["evaluations"][0]["success"]  # v3 acts as v0 did
