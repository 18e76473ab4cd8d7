"""DSRL on a served policy (flywheel/dsrl.py): a noise policy trained by PPO steers the small VLA served by
`flywheel serve` over loopback, whose weights never change."""

import numpy as np
import pytest
import torch

from actors.rollout import RolloutWorker
from flywheel import plugins
from learning import ppo_rewarding_right_first_moves
from flywheel.contracts import PolicySnapshot
from flywheel.serve import PolicyServer, ServedPolicy, expected_inputs
from flywheel.vla.bundle import small_vla


@pytest.fixture(scope="module")
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server and the actors share the cores
    base = small_vla("base", eval_noise=0.0)
    policy = base.make_actor()
    policy.load_weights(base.weights)
    image, state = expected_inputs(base)
    served = ServedPolicy(policy, name="small_vla", checkpoint="base", image_shape=image, state_dim=state,
                          meta=base.meta)
    with PolicyServer(served, port=0) as s:
        yield s
    torch.set_num_threads(threads)


def test_an_untrained_noise_policy_acts_as_the_served_policy_does(server):
    bundle = plugins.resolve("policy", "dsrl")(server.url, None)
    steered = RolloutWorker(bundle.make_actor, {"max_steps": 12})
    served = RolloutWorker(plugins.resolve("policy", "remote")(server.url, None).make_actor, {"max_steps": 12})
    steered.set_weights(PolicySnapshot(version=0, weights=bundle.weights))
    served.set_weights(PolicySnapshot(version=0, weights={}))
    seeds = list(range(900, 906))
    for a, b in zip(steered.collect(seeds, "eval"), served.collect(seeds, "eval")):
        np.testing.assert_array_equal(a.actions, b.actions)  # its mean starts at zero: the served policy's own mean


def test_ppo_on_the_noise_steers_the_served_policy_toward_what_the_detector_approves(server):
    """The detector approves the attempts whose first move went right more than the others' at the same layout;
    PPO on the noise policy alone (the served VLA is frozen) shifts where the served policy goes."""
    from learner.ppo import PPOLearner

    bundle = plugins.resolve("policy", "dsrl")(server.url, None)
    model = bundle.make_model()
    model.load_weights(bundle.weights)
    learner = PPOLearner(model, seed=0, ppo_lr=3e-3, ppo_epochs=8, ppo_minibatch=16, anchor=0.0, flow_noise=1.0,
                         noise_at="output")
    worker = RolloutWorker(bundle.make_actor, {"max_steps": 4})  # one chunk an episode
    before, after = ppo_rewarding_right_first_moves(learner, worker, drawn_shape=(1, 8, 3))
    episodes = worker.collect(list(range(900, 916)), "eval")
    ep = episodes[0]
    images, proprio = ep.observations["image"][:1], ep.observations["proprio"][:1]
    steer = model.noise_mean(model.context(torch.from_numpy(images), torch.from_numpy(model.token_ids([ep.instruction])),
                                           torch.from_numpy(proprio)))
    # the noise policy learned to push the x noise up (the base's first move answers about +0.035 per unit), and
    # the served policy, unchanged, moves right more (checked on three learner seeds: +0.05 to +0.07)
    x, rest = steer[..., 0].mean().item(), steer[..., 1:].abs().mean().item()
    assert x > 0.2 and x > 2 * rest, (x, rest)
    assert after > before + 0.04, (before, after)


def test_a_run_acts_through_the_served_policy(server, tmp_path):
    """flywheel run with policy=dsrl: the loop collects through the server over loopback, PPO trains the noise
    policy, and the stored episodes carry the draws it made."""
    from flywheel.config import load_config
    from flywheel.run import run
    from flywheel.store import EpisodeStore

    summary = run(load_config("run", [
        "experiment=tiny", "rollout.use_ray=false", "wandb.mode=disabled", f"run_dir={tmp_path}", "policy=dsrl",
        f"policy.checkpoint={server.url}", "learner=ppo", "learner.flow_noise=1.0", "learner.anchor=0",
        "detector=ground_truth", "budget.iterations=1", "eval.episodes=8", "gate.episodes=8",
        "rollout.episodes_per_iteration=16", "rollout.group_size=4"]), say=lambda m: None)
    assert summary["policy_version_final"] >= 0 and summary["episodes"] == 16
    practice = list(EpisodeStore(tmp_path / "episodes").iter("train"))
    assert len(practice) == 16 and all(ep.extras["drawn"].shape[1:] == (8, 3) for ep in practice)
