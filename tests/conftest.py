import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen, whichever test imports MuJoCo first


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the tests that need real actors; shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demos():
    """A small set of scripted demonstrations (successes), made once."""
    from actors.rollout import run_episodes
    from actors.tabletop import split_seed

    return run_episodes([split_seed("train", i) for i in range(24)], "train", None, policy_version=-1)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A tiny run of two iterations, and its resumable point after the first (as a crash in the second leaves it)."""
    import shutil

    from flywheel.config import load_config
    from flywheel.run import run

    root = tmp_path_factory.mktemp("finished")
    run_dir, kept = root / "run", root / "state-after-1.json"

    def after(state, row):
        if row.get("iteration") == 1:
            shutil.copy(run_dir / "run_state.json", kept)

    run(load_config("run", ["experiment=tiny", "rollout.use_ray=false", "wandb.mode=disabled", f"run_dir={run_dir}",
                            "budget.iterations=2"]), say=lambda m: None, on_iteration=after)
    return run_dir, kept


@pytest.fixture(scope="session")
def tiny_detector(finished_run):
    """The override that judges a run with the finished tiny run's detector, for the tests whose subject is not the
    detector: a run then trains none (~10 s of collection and training saved each)."""
    return f"detector.checkpoint={finished_run[0] / 'detector' / 'detector-1.safetensors'}"
