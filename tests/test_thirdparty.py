"""Meta-World and Fetch through the adapter contract and a rollout actor (actors/thirdparty.py).

They need the `sims` extra, which `make test` installs; without it they fail with the install line."""

import functools

import numpy as np
import pytest

from actors.rollout import RolloutWorker
from actors.thirdparty import make_sim_env
from flywheel.contracts import PolicySnapshot
from flywheel.vla.model import VLAConfig, VLAPolicy

SIMS = ["metaworld:reach-v3", "fetch:FetchReach-v4"]


@pytest.mark.parametrize("family", SIMS)
def test_adapter_observations_are_the_contract_and_resets_are_deterministic(family):
    env = make_sim_env(family, image_size=64, max_steps=10)
    obs, info = env.reset(seed=3)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert len(np.unique(obs["image"].reshape(-1, 3), axis=0)) > 20  # a rendered scene, not a blank frame
    assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
    assert info["instruction"] and info["success"] is False and info["family"] == family
    again, _ = make_sim_env(family, image_size=64, max_steps=10).reset(seed=3)
    assert np.array_equal(again["image"], obs["image"]) and np.allclose(again["proprio"], obs["proprio"])
    other, _ = make_sim_env(family, image_size=64, max_steps=10).reset(seed=4)
    assert not np.allclose(other["proprio"], obs["proprio"]) or not np.array_equal(other["image"], obs["image"])
    obs, _, term, trunc, info = env.step(env.action_space.sample())
    assert obs["image"].shape == (64, 64, 3) and isinstance(info["success"], bool)
    env.close()


@pytest.mark.parametrize("family", SIMS)
def test_an_episode_through_a_rollout_actor(family):
    cfg = VLAConfig(action_dim=4, proprio_dim=4)
    worker = RolloutWorker(functools.partial(VLAPolicy, cfg), {"family": family, "max_steps": 8,
                                                              "make_env": make_sim_env})
    worker.set_weights(PolicySnapshot(version=1, weights=VLAPolicy(cfg).get_weights()))
    (ep,) = worker.collect([5], "train", sample_seed=0)
    assert ep.policy_version == 1 and ep.task == family and ep.env_id == family
    assert ep.observations["image"].shape[1:] == (64, 64, 3) and ep.actions.shape[1] == 4
    assert len(ep.observations["image"]) == ep.num_steps + 1 and "aux_positions" not in ep.extras
    assert "success" in ep.ground_truth
