"""Meta-World and Fetch through the adapter contract and a rollout actor (actors/thirdparty.py).

They need the `sims` extra, which `make test` installs; without it they fail with the install line."""

import functools
import json

import numpy as np
import pytest

from actors.rollout import RolloutWorker, run_episodes
from actors.rollout import make_env
from flywheel.config import load_config
from flywheel.contracts import PolicySnapshot
from flywheel.pretrain import vla_config_for
from flywheel.run import run
from flywheel.vla.checkpoint import save_policy
from flywheel.vla.model import SmallVLA, VLAConfig, VLAPolicy

SIMS = [("metaworld", "button-press-topdown-v3"), ("fetch", "FetchReach-v4")]


@pytest.mark.parametrize("name,family", SIMS)
def test_adapter_observations_are_the_contract_and_resets_are_deterministic(name, family):
    env = make_env(name, family=family, image_size=64, max_steps=10)
    obs, info = env.reset(seed=3)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert len(np.unique(obs["image"].reshape(-1, 3), axis=0)) > 20  # a rendered scene, not a blank frame
    assert obs["proprio"].shape == (4,) and obs["proprio"].dtype == np.float32
    assert info["instruction"] and info["success"] is False and info["family"] == f"{name}:{family}"
    again, _ = make_env(name, family=family, image_size=64, max_steps=10).reset(seed=3)
    assert np.array_equal(again["image"], obs["image"]) and np.allclose(again["proprio"], obs["proprio"])
    other, _ = make_env(name, family=family, image_size=64, max_steps=10).reset(seed=4)
    assert not np.allclose(other["proprio"], obs["proprio"]) or not np.array_equal(other["image"], obs["image"])
    obs, _, term, trunc, info = env.step(env.action_space.sample())
    assert obs["image"].shape == (64, 64, 3) and isinstance(info["success"], bool)
    env.close()


@pytest.mark.parametrize("name,family", SIMS)
def test_an_episode_through_a_rollout_actor(name, family):
    cfg = VLAConfig(action_dim=4, proprio_dim=4)
    worker = RolloutWorker(functools.partial(VLAPolicy, cfg), {"name": name, "family": family, "max_steps": 8})
    worker.set_weights(PolicySnapshot(version=1, weights=VLAPolicy(cfg).get_weights()))
    (ep,) = worker.collect([5], "train", sample_seed=0)
    assert ep.policy_version == 1 and ep.task == ep.env_id == f"{name}:{family}"
    assert ep.observations["image"].shape[1:] == (64, 64, 3) and ep.actions.shape[1] == 4
    assert len(ep.observations["image"]) == ep.num_steps + 1 and "aux_positions" not in ep.extras
    assert "success" in ep.ground_truth


def test_one_adapter_gives_each_seed_its_own_layout_again_and_again():
    env = make_env("metaworld", family="button-press-topdown-v3", max_steps=5)
    first = env.reset(seed=3)[0]["image"]
    other = env.reset(seed=4)[0]["image"]
    assert not np.array_equal(first, other)
    env.step(env.action_space.sample())
    assert np.array_equal(env.reset(seed=3)[0]["image"], first)


@pytest.mark.parametrize("name,family", SIMS)
def test_the_scripted_expert_succeeds_and_the_vla_is_shaped_for_the_adapter(name, family):
    eps = run_episodes(list(range(100, 106)), "train", None, policy_version=-1, name=name, family=family,
                       max_steps=100)
    assert all(ep.ground_truth["success"] for ep in eps) and all(ep.actions.shape[1] == 4 for ep in eps)
    cfg = vla_config_for({"name": name, "family": family, "image_size": 64, "sensors": ["overhead"], "max_steps": 10,
                          "execute": 4})
    assert (cfg.action_dim, cfg.proprio_dim) == (4, 4)


@pytest.mark.slow  # CI runs it (make test-slow in .ci/run); the default suite keeps to 10 min
def test_the_loop_runs_end_to_end_on_meta_world(tmp_path):
    """Every stage on a Meta-World task, from an untrained VLA, on tiny numbers: detector data from Meta-World's
    scripted policy and the policy's rollouts, a detector, one learner update, evaluations before and after. The
    promotion gate (tested on the tabletop) is off: its 32 Meta-World episodes, twice, cost ~30 s of the suite."""
    env = {"name": "metaworld", "family": "button-press-topdown-v3", "image_size": 64, "sensors": ["overhead"]}
    checkpoint = save_policy(tmp_path / "mw.safetensors", SmallVLA(vla_config_for(env)),
                             {"config": {"env": {"family": env["family"]}}})
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path / 'run'}", "env=metaworld",
                              f"env.family={env['family']}",
                              "env.max_steps=60", f"policy.checkpoint={checkpoint}", "rollout.use_ray=false",
                              "detector.demo_episodes=6", "detector.policy_episodes=6", "detector.steps=12",
                              "learner.demos=4", "learner.steps_per_update=5", "rollout.episodes_per_iteration=4",
                              "eval.episodes=2", "budget.iterations=1", "gate.episodes=0", "wandb.mode=disabled"])
    summary = run(cfg, say=lambda m: None)
    assert summary["status"] == "completed" and summary["policy_version_final"] == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["evaluations"][0]["per_task"] == {
        "metaworld:button-press-topdown-v3": summary["initial_success"]}


def test_the_shipped_meta_world_base_loads_and_says_how_it_was_made():
    from flywheel.vla.checkpoint import load_policy_checkpoint

    cfg, weights, meta = load_policy_checkpoint("base:metaworld_button")
    assert (cfg.action_dim, cfg.proprio_dim) == (4, 4) and weights
    assert "env.family=metaworld:button-press-topdown-v3" in meta["command"]
    with pytest.raises(Exception, match="rebuild it with the command recorded"):
        load_policy_checkpoint("base:no_such_task")


def test_the_meta_world_base_with_room_to_improve_starts_between_a_fifth_and_three_fifths():
    """Issue 36's Meta-World base: a loop on it can show a gain (the other starts at 1.00)."""
    from flywheel.vla.checkpoint import load_policy_checkpoint

    cfg, weights, meta = load_policy_checkpoint("base:metaworld_button_early")
    assert (cfg.action_dim, cfg.proprio_dim) == (4, 4) and weights
    assert "env.name=metaworld env.family=button-press-topdown-v3" in meta["command"]
    final = meta["final"]
    assert 0.2 <= final["success"] <= 0.6 and final["episodes"] == 200


def test_the_libero_base_is_shaped_for_libero_and_records_how_it_was_made():
    """base:libero_spatial0 (experiment=smoke_libero's): LIBERO's 7-d actions and 8-d state, the agent-view camera."""
    from flywheel.vla.checkpoint import load_policy_checkpoint

    cfg, weights, meta = load_policy_checkpoint("base:libero_spatial0")
    assert (cfg.action_dim, cfg.proprio_dim, tuple(cfg.sensors)) == (7, 8, ("overhead",)) and weights
    assert "env.name=libero env.family=libero_spatial/0" in meta["command"]
    assert meta["final"]["episodes"] == 20 and meta["final"]["per_task"] == {"libero:libero_spatial/0": 0.05}
