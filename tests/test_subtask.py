"""The subtask head (issue 37): π0.5's high level on the small VLA. It names the next subtask in words from the
observation and the task instruction, learns that from the scripted expert's narration, and the low level acts on
its words; the learners condition on the words each chunk was drawn for."""

import numpy as np
import pytest
import torch

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from flywheel.contracts import Extras, Sampling, sensor_inputs
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import SmallVLA, VLAConfig, VLAPolicy
from learner.bc import BCTrainer, ChunkDataset, fit_subtask_head, prompt_ids


@pytest.fixture(scope="module")
def stow_demos():
    """Narrated demonstrations of "put the X block in the Y drawer and close it": three subtasks each."""
    return run_episodes([split_seed("train", i) for i in range(6)], "train", None, policy_version=-1,
                        family="stow")


def named(model: SmallVLA, ep, steps) -> list[str]:
    """What the model's subtask head says at ``steps`` of ``ep``."""
    return model.subtask_texts(*sensor_inputs(ep.observations, model.sensors, steps), ep.instruction)


def accuracy(model: SmallVLA, demos) -> float:
    """The fraction of the demonstrations' steps where the head names the subtask the expert narrated."""
    right = []
    for ep in demos:
        steps = np.arange(ep.num_steps)
        said = [ep.info["subtasks"][k] for k in ep.extras[Extras.NARRATION]]
        right += [a == b for a, b in zip(named(model, ep, steps), said)]
    return float(np.mean(right))


def valid(model: SmallVLA, episodes) -> float:
    """The fraction of the episodes' steps where the head names one of the episode's own subtasks."""
    return float(np.mean([text in ep.info["subtasks"] for ep in episodes
                          for text in named(model, ep, np.arange(ep.num_steps))]))


def test_the_subtask_head_learns_the_narration_and_the_actions_follow_its_words(stow_demos):
    torch.manual_seed(0)
    model, _ = load_policy_checkpoint("base:suite", as_model=True, subtask_head=True)
    assert "subtask" in model.capabilities and "subtask" not in SmallVLA().capabilities
    data = ChunkDataset(model)
    data.add(stow_demos, pinned=True)
    batch = data._tensors()
    # the low level learns to act on the narrated subtask, the head to name it from the task instruction
    first = model.tokenizer.decode(batch["ids"][0].tolist())
    assert first == stow_demos[0].info["subtasks"][0] and first.startswith("open the")
    assert model.tokenizer.decode(batch["task_ids"][0].tolist()) == " ".join(model.tokenizer.words(
        stow_demos[0].instruction))
    assert bool((batch["subtask_mask"] == 1).all())
    head = [p.detach().clone() for p in model.subtasker.parameters()]
    BCTrainer(model, lr=1e-3).step(data.sample(16, torch.Generator().manual_seed(0)))
    assert all(not torch.equal(a, b) for a, b in zip(head, model.subtasker.parameters()))  # trained beside the rest

    # trained alone on the demonstrations' narration, the head names what the expert said it was doing, and on
    # held-out layouts with other colour pairs it names one of their subtasks, its colours copied from the
    # instruction (which subtask is under way, in scenes it never saw, needs more than 6 demonstrations)
    held_out = run_episodes([split_seed("holdout", i) for i in range(4)], "holdout", None, policy_version=-1,
                            family="stow")
    assert {ep.info["named"][1] for ep in held_out} - {ep.info["named"][1] for ep in stow_demos}  # unseen drawers
    before = accuracy(model, stow_demos), valid(model, held_out)
    losses = fit_subtask_head(model, stow_demos, 300, batch_size=64, generator=torch.Generator().manual_seed(0))
    assert losses[-1] < 0.1 * losses[0]
    after = accuracy(model, stow_demos), valid(model, held_out)
    assert max(before) < 0.05 and after[0] > 0.85 and after[1] > 0.95, (before, after)

    # acting: the chunk is drawn for the words the head named, and they are recorded
    ep = stow_demos[0]
    images, proprio = (torch.from_numpy(x) for x in sensor_inputs(ep.observations, model.sensors, np.arange(3)))
    ids = model.tokenize([ep.instruction] * 3)
    extras: dict = {}
    chunk = model.sample(images, ids, proprio, noise=0.0, extras=extras)
    assert torch.equal(extras["prompt"], model.name_subtasks(images, ids, proprio))
    assert torch.allclose(chunk, model.sample(images, extras["prompt"], proprio, noise=0.0, subtask=False))
    assert not torch.allclose(chunk, model.sample(images, ids, proprio, noise=0.0, subtask=False))


def test_a_learner_conditions_each_decision_on_the_words_it_was_drawn_for(stow_demos):
    """A subtask policy's practice records the words of every decision; PPO's recomputed log-probability under them is
    the one recorded (under the task instruction it would not be), and a person's corrections are cloned under the
    subtask they narrated."""
    torch.manual_seed(0)
    model = SmallVLA(VLAConfig(subtask_head=True))
    policy = VLAPolicy(model=model)
    policy.load_weights(model.get_weights(), Sampling(flow_noise=0.05))
    policy.explore = True
    seeds = [split_seed("train", 100 + i) for i in range(4)]
    eps = run_episodes(seeds, "train", policy, policy_version=1, family="stow", max_steps=8,
                       people={"corrections": 1.0, "after": 8})
    ep = eps[0]
    steps = ep.extras[Extras.CHUNK_STEPS]
    ids = prompt_ids(model, ep, steps)
    assert np.array_equal(ids, ep.extras[Extras.PROMPT].astype(np.int64))
    images, proprio = (torch.from_numpy(x) for x in sensor_inputs(ep.observations, model.sensors, steps))
    recorded = {Extras.FLOW_CHAIN: torch.from_numpy(ep.extras[Extras.FLOW_CHAIN])}
    logp = ep.extras[Extras.LOGP]
    with torch.no_grad():
        again = model.log_prob(model.context(images, torch.from_numpy(ids), proprio), recorded, 0.05)
        task = model.log_prob(model.context(images, model.tokenize([ep.instruction] * len(steps)), proprio),
                              recorded, 0.05)
    assert np.allclose(again.numpy(), logp, atol=1e-4) and not np.allclose(task.numpy(), logp, atol=1e-2)
    # the person's steps (the expert, after the policy's 8) are cloned under what the person said they were doing
    taken = np.flatnonzero(ep.intervened())
    assert len(taken) and (ep.extras[Extras.NARRATION][taken] >= 0).all()
    said = [ep.info["subtasks"][k] for k in ep.extras[Extras.NARRATION][taken]]
    assert [model.tokenizer.decode(r.tolist()) for r in prompt_ids(model, ep, taken)] == said


def test_pretraining_from_a_checkpoint_refuses_one_that_does_not_fit(tmp_path):
    """``flywheel pretrain init=...``: a missing checkpoint, or one shaped for other sensors, is refused with the fix;
    a fitting one starts from its weights, with a new subtask head beside them."""
    from omegaconf import OmegaConf

    from flywheel.config import ConfigError, PretrainConfig, to_dict
    from flywheel.pretrain import initial_small_vla

    def start(sensors=("overhead",), **keys):
        cfg = OmegaConf.structured(PretrainConfig(**keys))
        cfg.env.sensors = list(sensors)
        return initial_small_vla(cfg, to_dict(cfg.env), lambda m: None)

    with pytest.raises(ConfigError, match="init=.*does not exist"):
        start(init=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ConfigError, match="does not fit the environment.*sensors"):
        start(init="base:suite", sensors=("overhead", "wrist"))
    model = start(init="base:suite", subtask_head=True)
    base, _ = load_policy_checkpoint("base:suite", as_model=True)
    assert torch.equal(model.head.inp.weight, base.head.inp.weight) and model.subtasker is not None


def test_a_run_practises_a_subtask_policy_with_ppo(tmp_path):
    """The whole loop from a base with a subtask head (~30 s): pretrained from base:suite on narrated sort
    demonstrations, then three PPO updates on sort. Every practice episode records the words each chunk was drawn
    for, texts the head wrote; the learner updates on them and the run completes."""
    from omegaconf import OmegaConf

    from flywheel.config import PretrainConfig, load_config
    from flywheel.pretrain import pretrain
    from flywheel.run import run
    from flywheel.store import EpisodeStore

    cfg = OmegaConf.structured(PretrainConfig(out_dir=str(tmp_path / "base"), init="base:suite", subtask_head=True,
                                              demos=8, steps=40, warmup=10, eval_every=40, eval_episodes=8,
                                              checkpoint_every=40))
    cfg.env.family = "sort"
    pretrain(cfg, say=lambda m: None)
    overrides = ["experiment=tiny", "learner=ppo", "env.family=sort", f"run_dir={tmp_path / 'run'}",
                 f"policy.checkpoint={tmp_path / 'base' / 'base_vla.safetensors'}", "rollout.use_ray=false",
                 "wandb.mode=disabled", "gate.episodes=0"]
    summary = run(load_config("run", overrides), say=lambda m: None)
    assert summary["status"] == "completed" and summary["policy_version_final"] == 3
    model, _ = load_policy_checkpoint(str(tmp_path / "base" / "base_vla.safetensors"), as_model=True)
    practised = [ep for ep in EpisodeStore(tmp_path / "run" / "episodes").iter("train") if Extras.CHUNKS in ep.extras]
    assert practised and all(len(ep.extras[Extras.PROMPT]) == len(ep.extras[Extras.CHUNK_STEPS]) for ep in practised)
    words = {model.tokenizer.decode(row.astype(np.int64).tolist())
             for ep in practised for row in ep.extras[Extras.PROMPT]}
    assert all(w and "<unk>" not in w for w in words), words
