import gymnasium as gym
import numpy as np
from gymnasium.utils.env_checker import check_env

from actors.expert import expert_action
from actors.rollout import run_episodes
from actors.tabletop import COLORS, TabletopEnv, reference_image, split_seed


def test_registered_env_passes_gymnasium_checker():
    env = gym.make("flywheel/Tabletop-v0")
    check_env(env.unwrapped, skip_render_check=True)


def test_same_seed_same_episode():
    a, b = TabletopEnv(), TabletopEnv()
    oa, ia = a.reset(seed=123)
    ob, ib = b.reset(seed=123)
    assert ia["instruction"] == ib["instruction"]
    assert np.array_equal(oa["image"], ob["image"])
    rng = np.random.default_rng(0)
    for _ in range(15):
        act = rng.uniform(-1, 1, 3).astype(np.float32)
        oa, *_ = a.step(act)
        ob, *_ = b.step(act)
        assert np.array_equal(oa["image"], ob["image"]) and np.array_equal(oa["proprio"], ob["proprio"])
    _, ic = TabletopEnv().reset(seed=124)
    assert ic["instruction"] != ia["instruction"] or not np.array_equal(oa["image"], TabletopEnv().reset(seed=124)[0]["image"])


def test_observation_spec():
    obs, info = TabletopEnv().reset(seed=0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["proprio"].shape == (3,) and obs["proprio"].dtype == np.float32
    assert info["instruction"].split()[0] in ("push", "put")


def test_scripted_expert_succeeds_on_both_families():
    for family in ("push", "place"):
        eps = run_episodes([split_seed("train", i) for i in range(40)], "train", None, policy_version=-1, family=family)
        assert np.mean([e.ground_truth["success"] for e in eps]) >= 0.95, family
        assert all(e.task == family for e in eps)


def test_instruction_names_objects_in_the_scene():
    for seed in range(20):
        env = TabletopEnv()
        _, info = env.reset(seed=seed)
        words = info["instruction"].split()
        block_colour = words[2]
        assert block_colour == env.block_colors[env.target_block]
        assert words[-2] == env.target_colors[env.target_index]
        # the named block's colour is drawn in the image
        assert (env.render_image() == np.array(COLORS[block_colour], np.uint8)).all(-1).sum() > 10


def test_success_predicate_place_needs_release_in_the_named_bowl():
    env = TabletopEnv(family="place")
    env.reset(seed=5)
    s = env.state()
    # teleport the named block into its bowl while holding it: not yet a success
    env.holding = env.target_block
    env.blocks[env.target_block] = s["target"]
    assert not env.is_success()
    env.holding = None
    assert env.is_success()
    # the other block in the bowl does not count
    env.blocks[env.target_block] = np.array([0.05, 0.05])
    env.blocks[1 - env.target_block] = s["target"]
    assert not env.is_success()


def test_success_predicate_push_on_pad():
    env = TabletopEnv(family="push")
    env.reset(seed=3)
    target = env.state()["target"]
    env.blocks[env.target_block] = target + 0.05
    assert env.is_success()
    env.blocks[env.target_block] = target + 0.2
    assert not env.is_success()


def test_expert_episode_terminates_on_success():
    env = TabletopEnv()
    env.reset(seed=11)
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, _, term, trunc, info = env.step(expert_action(env, rng))
        if term or trunc:
            break
    assert term and info["success"]


def test_fast_renderer_draws_the_reference_picture():
    # The renderer draws only what moves, and the effector ring only inside its bounding box; every pixel must still
    # be the plain whole-grid drawing's, for both families, while holding, and at the table's edges.
    rng = np.random.default_rng(0)
    for seed in range(30):
        env = TabletopEnv()
        obs, _ = env.reset(seed=seed)
        assert np.array_equal(obs["image"], reference_image(env))
        for _ in range(40):
            obs, _, term, trunc, _ = env.step(rng.uniform(-1, 1, 3).astype(np.float32))
            assert np.array_equal(obs["image"], reference_image(env))
            if term or trunc:
                break
    env = TabletopEnv(family="place")
    env.reset(seed=3)
    env.effector[:] = env.blocks[env.target_block]
    env.step(np.array([0, 0, 1], np.float32))  # grasp: the held block is drawn last
    assert env.holding is not None
    env.effector[:] = [0.03, 0.97]
    env.blocks[env.holding] = env.effector
    assert np.array_equal(env.render_image(), reference_image(env))
