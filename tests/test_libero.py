"""LIBERO through its adapter (actors/libero.py): each environment is a process of LIBERO's own venv (`make
libero-venv`, which `make test-slow` builds). Slow: a LIBERO scene takes ~10 s to build and steps at a few per second
on 2 cores."""

import os
import signal

import numpy as np
import pytest

from actors.libero import LiberoAdapter, LiberoError, libero_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spatial0():
    if not libero_python().exists():
        pytest.fail(f"LIBERO's venv is missing ({libero_python()}): make libero-venv (make test-slow builds it)")
    env = LiberoAdapter("libero_spatial/0", image_size=64, max_steps=200)
    yield env
    env.close()


def test_a_libero_task_passes_check_env_and_a_seed_is_always_the_same_scene(spatial0):
    from gymnasium.utils.env_checker import check_env

    check_env(spatial0, skip_render_check=True)
    first, info = spatial0.reset(seed=7)
    assert info["instruction"] == "pick up the black bowl between the plate and the ramekin and place it on the plate"
    assert info["init"] == 7 and spatial0.inits == 50 and set(first) == {"image", "wrist", "proprio"}
    rng = np.random.default_rng(0)
    for _ in range(15):  # a different history before the same seed: the gripper and the controller start anew
        spatial0.step(rng.uniform(-1, 1, 7))
    again, _ = spatial0.reset(seed=7)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other, _ = spatial0.reset(seed=8)
    assert not np.array_equal(first["image"], other["image"])


def test_the_scripted_operator_solves_the_task(spatial0):
    solved = []
    for seed in range(4):
        spatial0.reset(seed=seed)
        for _ in range(spatial0.max_steps):
            _, _, terminated, truncated, info = spatial0.step(spatial0.expert_action())
            if terminated or truncated:
                break
        solved.append(info["success"])
    assert sum(solved) >= 3, solved


def test_a_libero_process_that_dies_is_an_error_naming_it(spatial0):
    env = LiberoAdapter("libero_spatial/1", image_size=32, max_steps=10, sensors=("overhead",))
    env.reset(seed=0)
    os.kill(env._proc.pid, signal.SIGKILL)
    env._proc.wait()
    with pytest.raises(LiberoError, match="LIBERO process for libero_spatial/1 is gone"):
        env.step(np.zeros(7))
    env.close()
    with pytest.raises(ValueError, match="<suite>/<task index>"):
        LiberoAdapter("libero_spatial")


@pytest.mark.timeout(1800)
def test_the_loop_runs_end_to_end_on_a_libero_task(spatial0, tmp_path):
    """experiment=smoke_libero: a detector trained on LIBERO episodes judges the shipped LIBERO base's practice, the
    learner updates it, and the new version is evaluated (a smoke budget: the loop working, not a gain)."""
    from flywheel.config import load_config
    from flywheel.run import run
    from flywheel.store import EpisodeStore

    run_dir = tmp_path / "run"
    summary = run(load_config("run", ["experiment=smoke_libero", f"run_dir={run_dir}", "wandb.mode=disabled"]),
                  say=lambda m: None)
    assert summary["status"] == "completed" and summary["iterations"] >= 1 and summary["policy_version_final"] >= 1
    assert [e["version"] for e in summary["evaluations"]] == [0, summary["policy_version_final"]]
    assert summary["robustness"] == {"measured": False, "why": "env.name=libero takes no randomize"}
    stored = list(EpisodeStore(run_dir / "episodes").iter("train"))
    practice = [ep for ep in stored if ep.latest_label("detector") is not None]  # judged: the loop's own
    assert len(practice) == summary["episodes"] and {ep.policy_version for ep in practice} >= {0}
    assert {ep.task for ep in stored} == {"libero:libero_spatial/0"}
    assert all(ep.instruction == spatial0.instruction for ep in stored)

