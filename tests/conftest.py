import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
