"""Verbal coaching (issue 37): a coach corrects, in words, the subtask a policy with a subtask head is about to act
on; the episode records what it said, who and when; the learners take the words as the head's targets in
hindsight, and a coached episode as a hint of failure."""

import numpy as np
import pytest
import torch

from actors.coach import ScriptedCoach
from actors.rollout import make_env, run_episodes
from actors.tabletop import split_seed
from flywheel.contracts import Extras, Label, sensor_inputs
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import VLAPolicy
from learner.base import LearnerBase
from learner.bc import ChunkDataset, fit_subtask_head


@pytest.fixture(scope="module")
def policy():
    """base:suite, which puts a block in a bowl when told which, with a new subtask head: its words are noise."""
    torch.manual_seed(0)
    model, _ = load_policy_checkpoint("base:suite", as_model=True, subtask_head=True)
    return VLAPolicy(model=model, eval_noise=0.0)


def success(episodes) -> float:
    return float(np.mean([ep.ground_truth["success"] for ep in episodes]))


def test_a_coach_says_what_is_left_to_do_and_the_policy_acts_on_its_words(policy):
    seeds = [split_seed("eval", i) for i in range(12)]
    alone = run_episodes(seeds, "eval", policy, policy_version=0, family="sort")
    coached = run_episodes(seeds, "eval", policy, policy_version=0, family="sort", people={"coaching": 1.0})
    assert not any("coach" in ep.info or Extras.COACHING in ep.extras for ep in alone)
    # its own words name nothing it can do; told what is left, the low level chains the blocks into their bowls
    assert success(alone) == 0.0 and success(coached) >= 0.6, (success(alone), success(coached))
    for ep in coached:
        assert ep.info["coach"] == ScriptedCoach.who and ep.info["coaching"]
        said = ep.extras[Extras.COACHING]
        assert said.shape == (ep.num_steps,) and set(np.unique(said)) <= {-1, *range(len(ep.info["coaching"]))}
        prompts = [policy.words(row) for row in ep.extras[Extras.PROMPT]]
        for k, utterance in enumerate(ep.info["coaching"]):
            assert utterance["words"] in ep.info["subtasks"] and utterance["time"] > 0
            # said before the decision at its step was acted on: that chunk, and the rest while in force, were drawn
            # for its words, which hold from where it spoke until that subtask ended
            at = np.flatnonzero(said == k)
            assert at[0] == utterance["step"] and np.all(np.diff(at) == 1)
            decisions = np.flatnonzero(np.isin(ep.extras[Extras.CHUNK_STEPS], at))
            assert all(prompts[d] == utterance["words"] for d in decisions)
        # a subtask under way when the coach spoke ended by the time its words left force (or the episode did)
        ends = [np.flatnonzero(said == k)[-1] + 1 for k in range(len(ep.info["coaching"]))]
        for k, end in enumerate(ends):
            under_way = ep.info["subtasks"].index(ep.info["coaching"][k]["words"])
            assert end == ep.num_steps or ep.extras[Extras.SUBTASK][end] != under_way


def test_the_coach_lets_a_valid_order_be():
    env = make_env(family="sort")
    env.reset(seed=split_seed("eval", 3))
    names, coach = env.subtasks(), ScriptedCoach()
    assert len(env.subtasks_left()) == len(names) >= 2
    assert coach.correct(env, names[-1]) is None  # another block first is fine
    assert coach.correct(env, "open the red drawer") == names[env.subtask_index()]
    env.close()


def test_the_head_learns_the_coachs_words_in_hindsight(policy):
    model = policy.model
    policy.explore = True
    practice = run_episodes([split_seed("train", i) for i in range(16)], "train", policy, policy_version=0,
                            family="sort", people={"coaching": 1.0})
    policy.explore = False
    data = ChunkDataset(model)
    assert data.add_coaching(practice) == 16
    batch = data._tensors()
    assert float(batch["weights"].abs().sum()) == 0.0  # the low level learns nothing from a coach's words
    assert bool((batch["subtask_mask"] == 1).all())
    # where the coach spoke, the head's target is what it said, not what the policy had named
    ep = next(ep for ep in practice if ep.coached().any())
    first = ep.info["coaching"][0]
    row = int(np.flatnonzero(ep.extras[Extras.CHUNK_STEPS] == first["step"])[0])
    assert model.tokenizer.decode(batch["subtask_ids"][row].tolist()) == first["words"]

    # trained on 16 episodes of coached practice alone, the head names the coach's subtasks on held-out layouts
    # where it named none before (2,000 narrated demonstrations took it further: bench/RESULTS.md)
    held_out = run_episodes([split_seed("eval", 100 + i) for i in range(8)], "eval", policy, policy_version=0,
                            family="sort", people={"coaching": 1.0})
    before = spoken(held_out, policy)
    fit_subtask_head(model, practice, 200, generator=torch.Generator().manual_seed(0))
    after = spoken(held_out, policy)
    assert max(before) < 0.1 and after[0] > 0.2 and after[1] > 0.4, (before, after)


def spoken(episodes, policy) -> float:
    """Where the coach spoke: how often the head names what the coach said there, and how often one of the
    episode's subtasks at all."""
    right, valid = [], []
    for ep in episodes:
        steps = np.array([u["step"] for u in ep.info["coaching"]])
        words = policy.model.subtask_texts(*sensor_inputs(ep.observations, policy.sensors, steps), ep.instruction)
        right += [w == u["words"] for w, u in zip(words, ep.info["coaching"])]
        valid += [w in ep.info["subtasks"] for w in words]
    return float(np.mean(right)), float(np.mean(valid))


def test_a_coached_episode_is_not_the_policys_success_and_ppo_credits_it_up_to_the_words(policy):
    from learner.ppo import PPOLearner

    learner = PPOLearner(policy.model, [], version=0, seed=0, anchor=0.0)
    policy.sampling, policy.explore = learner.snapshot().sampling, True  # practice as PPO asks: log-probabilities
    practice = run_episodes([split_seed("train", 50 + i) for i in range(8)], "train", policy, policy_version=0,
                            family="sort", people={"coaching": 1.0})
    policy.explore = False
    ep = next(ep for ep in practice if ep.coached().any() and ep.info["coaching"][0]["step"] > 0)
    ep.labels.append(Label(source="detector", success=True, score=0.99))
    assert not LearnerBase.judged_success(ep)  # the coach's words are a hint of failure, whatever the verdict
    data = learner._decisions([ep], [np.array(-1.0)])
    own = int((ep.extras[Extras.CHUNK_STEPS] < ep.info["coaching"][0]["step"]).sum())
    assert len(data["adv"]) == own  # the policy's own attempt, up to where the coach judged it going wrong


def test_coaching_a_policy_that_names_no_subtasks_is_a_config_error_before_anything_starts(tmp_path):
    from flywheel.config import ConfigError, load_config
    from flywheel.run import run

    cfg = load_config("run", ["experiment=tiny", "env.family=sort", "rollout.coaching=0.5", "rollout.use_ray=false",
                              f"run_dir={tmp_path / 'run'}", "wandb.mode=disabled"])
    with pytest.raises(ConfigError, match=r"rollout.coaching=0.5: .*names none.*subtask_head=true"):
        run(cfg, say=lambda m: None)
    assert not (tmp_path / "run" / "episodes").exists()  # nothing started
