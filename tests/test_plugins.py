"""A team's own parts plug in without editing flywheel: a policy, an environment and a detector defined only in
tests/byo.py, and a learner defined only here, chosen by config and from the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flywheel import plugins
from flywheel.config import ConfigError, load_config
from flywheel.contracts import Learner, PolicySnapshot, TrainablePolicy
from flywheel.run import run

HERE = Path(__file__).resolve().parent
BYO = ["policy=byo:make_policy", "env=byo:make_env", "env.sensors=[overhead]", "env.max_steps=24",
       "rollout.use_ray=false", "wandb.mode=disabled", "gate.episodes=0", "eval.episodes=100"]


def _run(tmp_path, *overrides):
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'run'}", *BYO, *overrides])
    return run(cfg, say=lambda m: None)


def test_the_teams_policy_is_a_trainable_policy_and_its_actor_a_policy():
    import byo

    assert isinstance(byo.GaussianMLP(), TrainablePolicy)
    from flywheel.contracts import Policy

    assert isinstance(byo.GaussianActor(), Policy)


def test_filtered_bc_improves_a_teams_policy_judged_by_its_own_detector(tmp_path):
    """No demonstrations: the policy improves from its own practice alone, as the team's detector judges it (audited
    against the environment's own verdict)."""
    summary = _run(tmp_path, "detector=byo:make_detector", "learner.demos=0", "learner.practice_noise=1",
                   "rollout.group_size=1", "learner.steps_per_update=200", "learner.lr=3e-3", "learner.ema=0",
                   "audit.sample=32", "budget.iterations=6")
    first, last = summary["evaluations"][0], summary["evaluations"][-1]
    assert summary["status"] == "completed" and summary["policy_version_final"] == 6
    assert last["ci95"][0] > first["ci95"][1], (first, last)  # a gain beyond both intervals
    assert summary["detector"]["version"] == "byo-judge" and len(summary["audit"]["per_iteration"]) == 6


def test_ppo_trains_a_teams_policy_through_its_exact_log_probabilities(tmp_path):
    summary = _run(tmp_path, "detector=ground_truth", "learner=ppo", "rollout.group_size=8", "learner.anchor=0",
                   "learner.ppo_lr=3e-3", "learner.flow_noise=0.4", "learner.demos=0",
                   "rollout.episodes_per_iteration=128", "budget.iterations=2")
    assert summary["status"] == "completed" and summary["policy_version_final"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in rows if "learner/decisions" in r]
    assert len(updates) == 2 and all(r["learner/decisions"] > 0 and r["learner/approx_kl"] != 0 for r in updates)


def test_recap_refuses_a_policy_without_the_indicator_it_conditions_on(tmp_path):
    with pytest.raises(ValueError, match="recap conditions the policy on an advantage indicator.*GaussianMLP"):
        _run(tmp_path, "detector=ground_truth", "learner=recap", "rollout.group_size=1", "budget.iterations=1")


def test_a_teams_parts_plug_in_from_the_command_line(tmp_path):
    """`flywheel run policy=byo:make_policy env=byo:make_env`, the module on PYTHONPATH, with Ray: the rollout
    actors, in processes of their own, build the team's policy and environment too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "RAY_AUTH_MODE": "disabled"}
    given = [a for a in BYO if a != "rollout.use_ray=false"]
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "experiment=tiny", f"run_dir={tmp_path / 'r'}",
                           *given, "detector=ground_truth", "budget.iterations=1", "rollout.group_size=1",
                           "learner.practice_noise=0"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["policy_version_final"] == 1
    assert {w["pid"] for w in summary["rollout_workers"]} - {os.getpid()}  # other processes made the episodes
    assert summary["evaluations"][0]["per_task"].keys() == {"reach"}


def test_a_sweep_has_one_run_per_combination_of_its_axes():
    from flywheel.sweep import combinations

    assert combinations(["learner=ppo,recap", "seed=1,2", "budget.iterations=3"]) == [
        ["learner=ppo", "seed=1", "budget.iterations=3"], ["learner=ppo", "seed=2", "budget.iterations=3"],
        ["learner=recap", "seed=1", "budget.iterations=3"], ["learner=recap", "seed=2", "budget.iterations=3"]]
    assert combinations(["env.sensors=[overhead,wrist]"]) == [["env.sensors=[overhead,wrist]"]]  # a list, not an axis


@pytest.mark.slow  # CI runs it (make test-slow in .ci/run); the default suite keeps to 10 min
def test_a_sweep_makes_its_runs_each_in_its_own_directory_and_a_summary(tmp_path):
    """`flywheel run -m learner=filtered_bc,imitation seed=3`: a run per algorithm, each in its own directory, and
    sweep.json with how each ended."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "-m", "learner=filtered_bc,imitation",
                           "seed=3", f"run_dir={tmp_path}", "experiment=tiny", *BYO, "detector=ground_truth",
                           "budget.iterations=1", "rollout.group_size=1", "learner.steps_per_update=20"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["varied"] == ["learner"] and sweep["completed"] == 2
    made = {tuple(r["overrides"]): Path(r["run_dir"]) for r in sweep["runs"]}
    assert set(made) == {("learner=filtered_bc",), ("learner=imitation",)} and len(set(made.values())) == 2
    for (algorithm,), run_dir in made.items():
        config = (run_dir / "config.yaml").read_text()  # what each run was given
        assert f"algorithm: {algorithm.split('=')[1]}" in config and "seed: 3" in config
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


class Minimal:
    """A learner written to the Learner protocol alone (no flywheel base class): it moves every weight toward the
    share of practice judged a success, and counts what it learned from (its training state)."""

    def __init__(self, model, demos, *, version: int = 0, seed: int = 0):
        self.weights, self.version, self.seen, self.refilled = model.get_weights(), version, 0, 0

    def update(self, episodes):
        judged = float(np.mean([ep.latest_label("detector").success for ep in episodes]))
        self.weights = {k: v + np.float32(0.01 * judged) if v.dtype.kind == "f" else v for k, v in self.weights.items()}
        self.seen += len(episodes)
        self.version += 1
        return {"judged": judged, "seen": float(self.seen)}

    def snapshot(self):
        return PolicySnapshot(self.version, dict(self.weights))

    def restore(self, weights):
        self.weights, self.version = dict(weights), self.version + 1

    def training_state(self):
        return {"version": self.version, "seen": self.seen}

    def resume_from(self, weights, training):
        self.weights, self.version, self.seen = dict(weights), int(training["version"]), int(training["seen"])

    def refill(self, episodes):
        self.refilled += len(episodes)


def test_a_minimal_learner_runs_through_a_checkpoint_and_a_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(plugins.REGISTRY["learner"], "minimal", Minimal)
    assert isinstance(Minimal(type("M", (), {"get_weights": lambda self: {}})(), []), Learner)
    first = _run(tmp_path, "learner=minimal", "detector=ground_truth", "budget.iterations=1")
    assert first["status"] == "completed" and first["policy_version_final"] == 1
    seen = []
    monkeypatch.setattr(Minimal, "refill", lambda self, episodes: seen.append(len(episodes)))
    again = run(load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'run'}", *BYO, "learner=minimal",
                                    "detector=ground_truth", "budget.iterations=2"]), say=lambda m: None)
    assert again["status"] == "completed" and again["attempt"] == 2 and again["policy_version_final"] == 2
    assert seen == [32]  # the first iteration's practice, put back without training on it again
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["learner/seen"] for r in rows if "learner/seen" in r] == [32.0, 64.0]  # it went on counting


def test_a_plug_in_that_cannot_be_imported_names_the_module_and_the_fix():
    with pytest.raises(plugins.PluginError, match="cannot import no_such_lab.*PYTHONPATH"):
        plugins.resolve("policy", "no_such_lab:make_policy")
    with pytest.raises(plugins.PluginError, match="byo has no 'nothing'"):
        plugins.resolve("env", "byo:nothing")
    with pytest.raises(ConfigError, match="policy.name='small-vla' is unknown: choose one of \\[.*'small_vla'.*\\]"):
        load_config("run", ["run_dir=x", "policy=small-vla"])


def test_a_missing_optional_dependency_names_the_extra_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def without_metaworld(name, *args, **kwargs):
        if name.split(".")[0] == "metaworld":
            raise ModuleNotFoundError("No module named 'metaworld'", name="metaworld")
        return real(name, *args, **kwargs)

    monkeypatch.setitem(plugins.REGISTRY["env"], "needs_metaworld", "metaworld.envs:make")
    monkeypatch.setattr(builtins, "__import__", without_metaworld)
    with pytest.raises(plugins.PluginError, match=r"needs metaworld, which is not installed: pip install -e "
                                                  r"'\.\[sims\]'"):
        plugins.resolve("env", "needs_metaworld")
