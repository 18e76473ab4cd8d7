import dataclasses

import numpy as np
import pytest
import torch

from flywheel.contracts import INTERVENTION, Label, Sampling
from flywheel.vla.model import SmallVLA, VLAPolicy
from learner.filtered_bc import FilteredBCLearner
from learning import episodes_moving, mean_dx


def test_filtered_bc_moves_the_policy_toward_what_the_detector_approves(demos):
    for direction in (+1.0, -1.0):
        torch.manual_seed(0)
        model = SmallVLA()
        learner = FilteredBCLearner(model, demos=[], steps_per_update=60, batch_size=32, lr=1e-3)
        labelled = episodes_moving(demos, 0.8 * direction, True) + episodes_moving(demos, -0.8 * direction, False)
        stats = learner.update(labelled)
        assert stats["kept_episodes"] == len(demos) and learner.version == 1
        assert mean_dx(model, demos[:8]) * direction > 0.4
        assert learner.snapshot().version == 1


def test_frozen_backbone_trains_the_action_expert_alone(demos):
    torch.manual_seed(0)
    model = SmallVLA()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    learner = FilteredBCLearner(model, demos=[], steps_per_update=60, batch_size=32, lr=1e-3, freeze_backbone=True)
    learner.update(episodes_moving(demos, 0.8, True) + episodes_moving(demos, -0.8, False))
    assert "ctx" in learner.data.sample(4, torch.Generator().manual_seed(0))  # contexts cached, not images
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert mean_dx(model, demos[:8]) > 0.4


def test_group_advantage_credits_rare_successes_most(demos):
    def judged(ep, seed, ok):
        return dataclasses.replace(ep, seed=seed, labels=[Label(source="detector", success=ok, version="d")])

    ep = demos[0]
    batch = [judged(ep, 1, True), judged(ep, 1, False), judged(ep, 1, False), judged(ep, 1, False),
             judged(ep, 2, True), judged(ep, 2, True), judged(ep, 2, True), judged(ep, 2, True)]
    adv = FilteredBCLearner.advantages(batch)
    assert np.allclose(adv, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_ppo_leaves_out_the_attempts_its_detector_was_unsure_of(demos):
    """learner.unsure=[0.3, 0.9]: a lone approval at P(success) 0.6 (where the detector's false positives gather)
    gets no advantage and does not count in its layout's baseline; a sure one, and a verdict without a score (the
    simulator's, a person's), do."""
    from flywheel.vla.model import VLAConfig
    from learner.ppo import PPOLearner

    def judged(seed, score=None, ok=None):
        ok = score >= 0.5 if ok is None else ok
        return dataclasses.replace(demos[0], seed=seed, labels=[Label(source="detector", success=ok, version="d",
                                                                      score=score)])

    batch = [judged(1, 0.6), judged(1, 0.1), judged(1, 0.05), judged(1, 0.2),  # unsure lone approval
             judged(2, 0.97), judged(2, 0.1), judged(2, 0.4), judged(2, 0.02),  # a sure one; one unsure failure
             judged(3, ok=True), judged(3, 0.1), judged(3, 0.1), judged(3, 0.1)]
    learner = PPOLearner(SmallVLA(VLAConfig()), demos, unsure=[0.3, 0.9])
    adv = learner.group_advantages(batch)
    assert np.allclose(adv[:4], 0)  # one sure verdict left in layout 1: nothing to compare
    assert adv[6] == 0 and np.allclose(adv[[4, 5, 7]], [2 ** 0.5, -(2 ** -0.5), -(2 ** -0.5)])
    assert np.allclose(adv[8:], [3 ** 0.5] + [-(3 ** -0.5)] * 3)
    assert np.allclose(PPOLearner(SmallVLA(VLAConfig()), demos).group_advantages(batch)[:4],
                       [3 ** 0.5] + [-(3 ** -0.5)] * 3)  # by default every verdict counts
    with pytest.raises(ValueError, match=r"learner.unsure=\[0.9, 0.3\]"):
        PPOLearner(SmallVLA(VLAConfig()), demos, unsure=[0.9, 0.3])


def _with_chunks(episodes, execute: int = 4, chunk: int = 8):
    """Give constructed episodes the extras a policy's own episode carries: the chunks it sampled and when."""
    from learner.bc import action_chunks

    out = []
    for ep in episodes:
        steps = np.arange(0, ep.num_steps, execute)
        out.append(dataclasses.replace(ep, extras={"chunks": action_chunks(ep.actions, chunk)[steps],
                                                   "chunk_steps": steps}))
    return out


def test_returns_to_go_and_chunk_advantages():
    from learner.value import chunk_advantages, returns_to_go

    assert np.allclose(returns_to_go(4, True, 40), np.array([-4, -3, -2, -1, 0]) / 40)
    assert np.allclose(returns_to_go(4, False, 40), np.array([-4, -3, -2, -1, 0]) / 40 - 1)
    steps = np.array([0, 4, 8])  # three chunks of an episode of 10 steps
    exact = returns_to_go(10, True, 40)[np.append(steps, 10)]
    # A value that knows the return exactly leaves nothing to credit...
    assert np.allclose(chunk_advantages(exact, steps, 10, True, 40, lookahead=1), 0, atol=1e-6)
    # ...and one that expected failure credits the chunk that reached success with the whole surprise.
    adv = chunk_advantages(exact - 1.0, steps, 10, True, 40, lookahead=1)
    assert np.allclose(adv, [0, 0, 1], atol=1e-6)
    assert np.allclose(chunk_advantages(exact, steps, 10, False, 40, lookahead=1), [0, 0, -1], atol=1e-6)


def test_value_separates_states_that_succeed_from_states_that_fail(demos):
    from learner.value import ValueModel, returns_to_go

    torch.manual_seed(0)
    value = ValueModel(SmallVLA(), horizon=40)
    flipped = [dataclasses.replace(ep, observations={**ep.observations,
                                                     "image": ep.observations["image"][:, :, ::-1].copy()})
               for ep in demos]
    feats, returns = {}, []
    for name, eps, ok in (("success", demos, True), ("failure", flipped, False)):
        feats[name] = [value.features(ep, np.arange(ep.num_steps + 1)) for ep in eps]
        returns += [returns_to_go(ep.num_steps, ok, 40) for ep in eps]
    value.fit(torch.cat(feats["success"] + feats["failure"]), np.concatenate(returns), 400)
    v_ok, v_bad = (value.value(torch.cat(feats[k])) for k in ("success", "failure"))
    assert v_ok.mean() > -0.6 and v_bad.mean() < -1.0, (v_ok.mean(), v_bad.mean())


def test_recap_conditions_on_advantage_and_guides_toward_success(demos):
    from learner.recap import RecapLearner

    torch.manual_seed(0)
    model = SmallVLA()
    learner = RecapLearner(model, demos=[], steps_per_update=200, batch_size=32, lr=1e-3, indicator_dropout=0.3,
                           guidance=2.0, value_steps=200)
    stats = learner.update(_with_chunks(episodes_moving(demos, 0.8, True) + episodes_moving(demos, -0.8, False)))
    # Episode credit: from the same starts half the attempts succeed, so the value expects less than a success and
    # more than a failure there: every success is positive and no failure is.
    assert stats["positive_of_successes"] > 0.9 and stats["positive_of_failures"] == 0, stats
    snap = learner.snapshot()
    assert (snap.sampling.indicator, snap.sampling.guidance) == (1, 2.0)
    policy = VLAPolicy(model=model)
    ep = demos[0]
    obs = (ep.observations["image"][:1], ep.observations["proprio"][:1], [ep.instruction])
    policy.sampling = Sampling(indicator=1, guidance=2.0)
    positive = policy.act(*obs, seed=0)[..., 0].mean()
    policy.sampling = Sampling(indicator=2, guidance=1.0)
    negative = policy.act(*obs, seed=0)[..., 0].mean()
    # The successful direction is +x: guided toward "positive", the chunk moves that way, and well apart from the
    # "negative" condition (margins checked over three initialisations: gaps 0.39 / 0.38 / 0.72, positive > 0.06).
    assert positive > 0 and positive - negative > 0.3, (positive, negative)


def test_shrink_and_perturb_shrinks_weight_matrices_only(demos):
    torch.manual_seed(0)
    model = SmallVLA()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = FilteredBCLearner(model, demos=[], shrink=0.5, perturb=0.0)
    learner.shrink_and_perturb()
    after = model.state_dict()
    w = "head.out.weight"
    assert torch.allclose(after[w], 0.5 * before[w])
    assert torch.equal(after["head.out.bias"], before["head.out.bias"])


def test_residual_ppo_moves_its_corrections_toward_what_the_detector_approves(demos):
    """Episodes acted with exploring residual corrections; a detector that approves those whose corrections pushed
    right (+x). PPO must shift the residual's mean that way, and leave the VLA itself untouched."""
    from actors.rollout import RolloutWorker
    from learner.residual_ppo import ResidualPPOLearner

    torch.manual_seed(0)
    model = SmallVLA()
    frozen = {k: v.copy() for k, v in model.get_weights().items() if not k.startswith("residual.")}
    learner = ResidualPPOLearner(model, seed=0, ppo_lr=3e-3)
    worker = RolloutWorker(lambda: VLAPolicy(model.cfg), {"max_steps": 12})

    def mean_x_offset(seeds):
        episodes = worker.collect(seeds, "eval")  # evaluation: the residual's mean, no exploration
        return float(np.mean([ep.extras["residuals"][:, 1].mean() for ep in episodes]))

    worker.set_weights(learner.snapshot())
    before = mean_x_offset(list(range(900, 916)))
    for it in range(3):
        episodes = worker.collect(list(range(100 * it, 100 * it + 48)), "train", sample_seed=it)
        for ep in episodes:
            ep.labels.append(Label(source="detector", success=bool(ep.extras["residuals"][:, 1].mean() > 0),
                                   version="d", score=0.0, threshold=0.5))
        stats = learner.update(episodes)
        worker.set_weights(learner.snapshot())
    assert before == 0.0 and learner.version == 3 and stats["decisions"] == 48 * 3
    assert mean_x_offset(list(range(900, 916))) > 0.05  # exploration std 0.1: half a standard deviation or more
    assert all(np.array_equal(v, model.get_weights()[k]) for k, v in frozen.items())


def test_filtered_bc_with_nothing_to_clone_keeps_the_policy():
    """No demonstrations and no judged success: the update makes no step (and does not crash), the weights stay."""
    model = SmallVLA()
    before = model.get_weights()
    learner = FilteredBCLearner(model, demos=[], steps_per_update=5)
    stats = learner.update([])
    assert learner.version == 1 and np.isnan(stats["loss"]) and stats["kept_episodes"] == 0
    assert all(np.array_equal(v, model.get_weights()[k]) for k, v in before.items())


# Measured gains on three initialisations: tokens 0.60-0.75; the flow with noise at its steps 0.06-0.11 (a chunk's
# 240 draws credited, 12 executed), at its output 0.24-0.60
@pytest.mark.parametrize("head,lr,epochs,gain,advantage,noise_at,flow_noise", [
    ("tokens", 1e-3, 4, 0.2, "group", "output", 0.2),
    ("flow", 3e-4, 8, 0.03, "group", "steps", 0.05),
    ("flow", 3e-4, 8, 0.1, "group", "output", 0.2),
    ("flow", 3e-4, 8, 0.1, "gae", "output", 0.2)])
def test_ppo_moves_either_vla_toward_what_the_detector_approves(head, lr, epochs, gain, advantage, noise_at,
                                                                 flow_noise):
    """A VLA acting in action tokens, or a flow VLA with noise at its steps or its output, 4 attempts per layout;
    the detector approves the attempts that moved right (+x) more than the others at the same layout. PPO,
    with the exact log-probabilities the rollout recorded, must shift the policy that way; stale episodes are
    dropped; a flow VLA without noise is refused with the fix."""
    from actors.rollout import RolloutWorker
    from flywheel.vla.model import VLAConfig
    from learner.ppo import PPOLearner

    torch.manual_seed(0)
    cfg = VLAConfig(action_head=head, bins=16)
    model = SmallVLA(cfg)
    with torch.no_grad():
        model.indicator.weight[0] = 0.3 * torch.randn(model.encoder.out_dim)  # as a pretrained base has it
    learner = PPOLearner(model, seed=0, ppo_lr=lr, ppo_epochs=epochs, anchor=0.0, flow_noise=flow_noise,
                         noise_at=noise_at, advantage=advantage)
    worker = RolloutWorker(lambda: VLAPolicy(cfg), {"max_steps": 8})

    def mean_x(seeds):
        return float(np.mean([ep.actions[:, 0].mean() for ep in worker.collect(seeds, "eval")]))

    worker.set_weights(learner.snapshot())
    before = mean_x(list(range(900, 932)))
    drawn = (cfg.flow_steps, 8, 3) if head == "flow" and noise_at == "steps" else (8, 3)
    for it in range(3):
        seeds = [100 * it + i // 4 for i in range(48)]
        episodes = worker.collect(seeds, "train", sample_seed=it)
        assert all(ep.extras["logp"].shape == (len(ep.extras["chunk_steps"]), *drawn) for ep in episodes)
        for i in range(0, 48, 4):
            group = episodes[i:i + 4]
            xs = [ep.actions[:, 0].mean() for ep in group]  # what the robot did, as a detector sees it
            for ep, x in zip(group, xs):
                ep.labels.append(Label(source="detector", success=bool(x > np.median(xs)), version="d"))
        stats = learner.update(episodes)
        worker.set_weights(learner.snapshot())
    assert learner.version == 3 and stats["informative_episodes"] == 48 and stats["stale_dropped"] == 0
    after = mean_x(list(range(900, 932)))
    assert after > before + gain, (before, after)
    stale = dataclasses.replace(episodes[0], policy_version=0)
    assert learner.update([stale])["stale_dropped"] == 1
    with pytest.raises(ValueError, match="flow_noise"):
        PPOLearner(SmallVLA(), flow_noise=0.0)


def test_flow_noise_log_probability_is_that_of_the_draws(demos):
    """What sample() records with flow-noise is recomputed exactly by log_prob, and it is the Gaussian
    density of the steps actually drawn; without flow-noise nothing is recorded and the chunk is as before."""
    torch.manual_seed(0)
    model = SmallVLA().eval()
    with torch.no_grad():
        model.indicator.weight[0] = torch.randn(model.encoder.out_dim)  # what pretraining leaves (the shipped base)
    ep = demos[0]
    images, proprio = torch.from_numpy(ep.observations["image"][:3]), torch.from_numpy(ep.observations["proprio"][:3])
    ids = model.tokenize([ep.instruction] * 3)
    extras: dict = {}
    chunk = model.sample(images, ids, proprio, torch.Generator().manual_seed(0), extras=extras, noise=0.0,
                         flow_noise=0.05)
    chain = extras["flow_chain"]
    assert chain.shape == (3, model.cfg.flow_steps + 1, 8, 3) and torch.equal(chunk, chain[:, -1].clamp(-1, 1))
    with torch.no_grad():
        again = model.log_prob(model.encoder(images, ids, proprio), {"flow_chain": chain}, 0.05)
    assert torch.allclose(again, extras["logp"], atol=1e-5)
    steps = (extras["logp"] - torch.distributions.Normal(0.0, 0.05).log_prob(torch.zeros(()))) * -2 * 0.05 ** 2
    assert 0.5 < float(steps.mean().sqrt() / 0.05) < 1.5  # the draws' own spread: about one std from each mean
    quiet: dict = {}
    plain = model.sample(images, ids, proprio, torch.Generator().manual_seed(0), extras=quiet, noise=0.0)
    assert "logp" not in quiet and not torch.equal(plain, chunk)


def test_output_noise_is_a_gaussian_around_the_flow_and_its_log_probability_is_recomputed(demos):
    """noise_at="output": the flow runs from its mean untouched and only the chunk draws around it; the draw and its
    per-number density are recorded, and log_prob recomputes them, with a gradient through the flow."""
    torch.manual_seed(0)
    model = SmallVLA().eval()
    ep = demos[0]
    images, proprio = torch.from_numpy(ep.observations["image"][:3]), torch.from_numpy(ep.observations["proprio"][:3])
    ids = model.tokenize([ep.instruction] * 3)
    extras: dict = {}
    chunk = model.sample(images, ids, proprio, torch.Generator().manual_seed(0), extras=extras, noise=0.0,
                         flow_noise=0.1, noise_at="output")
    mean = model.sample(images, ids, proprio, noise=0.0)  # the deterministic flow
    drawn = extras["drawn"]
    assert drawn.shape == (3, 8, 3) and extras["logp"].shape == (3, 8, 3) and "flow_chain" not in extras
    assert torch.equal(chunk, drawn.clamp(-1, 1))
    spread = float(((drawn - mean)[mean.abs() < 0.9]).std())  # away from the clamp, the draw's std is the noise's
    assert 0.07 < spread < 0.13
    ctx = model.encoder(images, ids, proprio)
    again = model.log_prob(ctx, {"drawn": drawn}, 0.1)
    assert torch.allclose(again, extras["logp"], atol=1e-4)
    again.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="noise_at"):
        model.sample(images, ids, proprio, noise=0.0, flow_noise=0.1, noise_at="middle")


def test_ppo_credits_the_actions_each_decision_executed():
    """A chunk of 8 decided at steps 0, 4 and 8 of a 10-step episode: 4, 4 and 2 of its actions ran."""
    from learner.ppo import executed

    mask = executed(np.array([0, 4, 8]), 10, 8)
    assert mask.shape == (3, 8) and mask.sum(1).tolist() == [4, 4, 2] and mask[:, 0].all() and not mask[:, 4:].any()


def test_ppo_credits_a_decision_only_with_the_actions_it_ran_before_a_person_took_over():
    from learner.ppo import executed

    taken = np.arange(20) >= 6  # a person took over at step 6, inside the second decision's chunk
    assert executed(np.array([0, 4]), 20, 8, taken).sum(1).tolist() == [4, 2]


def _corrected(episodes, at: int = 4):
    """The policy acted until step ``at`` (one chunk), then a person took over and moved the other way to the end."""
    out = []
    for ep in _with_chunks(episodes):
        actions = ep.actions.copy()
        actions[at:, 0] *= -1
        keep = ep.extras["chunk_steps"] < at
        out.append(dataclasses.replace(ep, actions=actions, extras={
            "chunks": ep.extras["chunks"][keep], "chunk_steps": ep.extras["chunk_steps"][keep],
            INTERVENTION: np.arange(ep.num_steps) >= at}))
    return out


@pytest.mark.parametrize("algorithm", ["filtered_bc", "recap", "imitation"])
def test_a_persons_corrections_are_cloned_and_the_policy_is_not_credited_for_them(demos, algorithm):
    """Practice that moved +x until a person took over and moved -x to a success: the person's steps are cloned as
    demonstrations ("positive" for RECAP), the policy's own are not credited with the success (RECAP: "negative";
    filtered BC keeps none), and the policy now acts as the person did. Imitation learns nothing from practice."""
    from learner.registry import make_learner

    torch.manual_seed(0)
    own = _corrected(episodes_moving(demos[:12], 0.8, True))
    learner = make_learner(algorithm, SmallVLA(), [], steps_per_update=150, batch_size=32, lr=1e-3,
                           indicator_dropout=0.3, guidance=2.0, value_steps=50)
    stats = learner.update(own)
    if algorithm == "imitation":
        assert len(learner.data) == 0
        return
    corrections = [e for e in learner.data._eps if e.key.endswith("/corrections")]
    assert stats["corrected_episodes"] == len(own) == len(corrections)
    assert [len(e.actions) for e in corrections] == [ep.num_steps - 4 for ep in own]
    assert all((e.indicators == learner.demo_indicator).all() for e in corrections)
    acted = [e for e in learner.data._eps if not e.key.endswith("/corrections")]
    assert (all((e.indicators == 2).all() for e in acted) and stats["positive_of_successes"] == 0
            if algorithm == "recap" else not acted and stats["kept_episodes"] == 0)
    policy = VLAPolicy(model=learner.model)
    snap = learner.snapshot()
    policy.sampling = snap.sampling
    later = [(ep.observations["image"][6], ep.observations["proprio"][6], ep.instruction) for ep in own]
    acts = policy.act(np.stack([o[0] for o in later]), np.stack([o[1] for o in later]), [o[2] for o in later], seed=0)
    assert acts[..., 0].mean() < -0.3, acts[..., 0].mean()


def test_filtered_bc_can_clone_what_its_policy_executed_at_every_step(demos):
    """clone=executed: an approved episode of the policy's own is cloned as a demonstration is (every step, the
    actions it executed), not from the chunks it sampled; with practice_noise its snapshots ask for that noise."""
    own = []
    for ep in episodes_moving(demos[:4], 0.8, True):
        chunks = np.full((2, 8, 3), -0.5, np.float32)  # sampled chunks that disagree with what was executed
        own.append(dataclasses.replace(ep, extras={"chunks": chunks, "chunk_steps": np.array([0, 4])}))
    for clone, samples in (("chunks", 2 * len(own)), ("executed", sum(ep.num_steps for ep in own))):
        learner = FilteredBCLearner(SmallVLA(), demos=[], practice_noise=0.0, clone=clone)
        learner.add_episodes(own + episodes_moving(demos[4:6], -0.8, False))  # failures: never cloned
        assert len(learner.data) == samples
        targets = learner.data.sample(16, torch.Generator().manual_seed(0))["actions"]
        assert torch.all(targets[:, 0, 0] == (0.8 if clone == "executed" else -0.5))  # (past the end: padding)
    assert learner.snapshot().sampling.practice_noise == 0.0


def test_the_moving_average_is_published_and_a_resumed_learner_continues_it_exactly(demos):
    """``ema``: the snapshot is the average of the weights along the steps, not the last step's; a checkpoint (the
    snapshot + training_state) resumes both the average and the trained weights, so the next update is the one the
    original learner makes; a rollback restarts the average from the weights rolled back to."""
    import copy

    torch.manual_seed(0)
    base = SmallVLA()
    data = episodes_moving(demos, 0.8, True) + episodes_moving(demos, -0.8, False)

    def learner(ema):
        return FilteredBCLearner(copy.deepcopy(base), demos=[], steps_per_update=10, batch_size=16, lr=1e-3, ema=ema)

    def update(learner):  # (the flow's noise draws come from torch's global generator)
        torch.manual_seed(1)
        learner.update(data)

    plain, averaged = learner(0.0), learner(0.9)
    update(plain)
    update(averaged)
    name = "head.out.weight"
    start, trained = base.get_weights()[name], plain.snapshot().weights[name]
    published = averaged.snapshot().weights[name]
    assert np.array_equal(averaged.model.get_weights()[name], trained)  # the same training
    # the average lies between where training started and where it got, strictly
    assert 0 < np.abs(published - start).mean() < np.abs(trained - start).mean()

    import io

    saved = io.BytesIO()  # as a checkpoint on disk holds it: a copy, not the live optimizer's tensors
    torch.save(averaged.training_state(), saved)
    checkpoint = averaged.snapshot().weights, torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    resumed = learner(0.9)
    resumed.resume_from(*checkpoint)
    resumed.refill(data)  # (the run refills the buffer from the store)
    assert resumed.version == 1
    update(averaged)
    update(resumed)
    for a, b in ((averaged.snapshot().weights, resumed.snapshot().weights),
                 (averaged.model.get_weights(), resumed.model.get_weights())):
        assert all(np.array_equal(a[k], b[k]) for k in a)

    averaged.restore(checkpoint[0])
    assert np.array_equal(averaged.snapshot().weights[name], checkpoint[0][name])
    assert np.array_equal(averaged.model.get_weights()[name], checkpoint[0][name])


def test_a_checkpoint_from_before_the_average_resumes_with_it(demos):
    """A run started before ``learner.ema`` existed (its checkpoints hold no trained weights), resumed with it on:
    training and the average both go on from the checkpoint's weights."""
    torch.manual_seed(0)
    old = FilteredBCLearner(SmallVLA(), demos=[], steps_per_update=5, batch_size=16, lr=1e-3)
    data = episodes_moving(demos, 0.8, True) + episodes_moving(demos, -0.8, False)
    old.update(data)
    weights, training = old.snapshot().weights, old.training_state()
    assert "trained_weights" not in training
    new = FilteredBCLearner(SmallVLA(), demos=[], steps_per_update=5, batch_size=16, lr=1e-3, ema=0.9)
    new.resume_from(weights, training)
    assert new.version == 1
    for published in (new.snapshot().weights, new.model.get_weights()):
        assert all(np.array_equal(published[k], weights[k]) for k in weights)
    new.refill(data)
    new.update(data)
    assert new.version == 2 and all(np.isfinite(v).all() for v in new.snapshot().weights.values())


def test_recap_starts_acting_as_its_base_does(demos):
    """A base pretrained without the advantage indicator learned its "none" row only; RECAP conditions on
    "positive" with guidance from its first practice, so that row must start as "none" (it did not: 0.49 -> 0.18)."""
    from learner.recap import RecapLearner

    torch.manual_seed(0)
    base = SmallVLA()
    with torch.no_grad():
        base.indicator.weight[0] = torch.randn(base.encoder.out_dim)  # what pretraining leaves
    weights = base.get_weights()
    ep = demos[0]
    obs = (ep.observations["image"][:3], ep.observations["proprio"][:3], [ep.instruction] * 3)
    as_base = VLAPolicy(model=base).act(*obs, seed=1)
    model = SmallVLA()
    model.load_weights(weights)
    learner = RecapLearner(model, demos=[], guidance=2.0)
    policy = VLAPolicy(model=SmallVLA())
    snap = learner.snapshot()
    policy.load_weights(snap.weights, snap.sampling)
    assert snap.sampling.indicator == 1
    assert np.allclose(policy.act(*obs, seed=1), as_base, atol=1e-5)


def test_recap_chunk_credit_marks_the_top_fraction_of_chunks(demos):
    from learner.recap import RecapLearner

    torch.manual_seed(0)
    own = _with_chunks(episodes_moving(demos, 0.8, True) + episodes_moving(demos, -0.8, False))
    learner = RecapLearner(SmallVLA(), demos=[], credit="chunk", positive_fraction=0.3, steps_per_update=1,
                           value_steps=100)
    stats = learner.update(own)
    assert 0.1 < stats["positive_fraction"] <= 0.35, stats
    assert stats["positive_of_successes"] > stats["positive_of_failures"], stats
    for bad in ({"credit": "step"}, {"credit": "chunk", "positive_fraction": 0.0}):
        with pytest.raises(ValueError, match="credit|positive_fraction"):
            RecapLearner(SmallVLA(), demos=[], **bad)


def test_recap_clones_executed_steps_each_with_its_chunks_indicator(demos):
    from learner.recap import NEGATIVE, POSITIVE, RecapLearner

    torch.manual_seed(0)
    learner = RecapLearner(SmallVLA(), demos=[], clone="executed", steps_per_update=2, value_steps=20)
    own = _with_chunks(episodes_moving(demos[:6], 0.8, True) + episodes_moving(demos[6:12], -0.8, False))
    stats = learner.update(own)
    assert len(learner.data) == sum(ep.num_steps for ep in own)  # every step, not every chunk
    seen = set()
    for entry, ep in zip(learner.data._eps, own):
        steps = ep.extras["chunk_steps"]
        assert len(entry.indicators) == ep.num_steps
        for start, end in zip(steps, [*steps[1:], ep.num_steps]):
            assert len(set(entry.indicators[start:end])) == 1  # one chunk, one indicator
        seen |= set(entry.indicators)
    assert seen == {POSITIVE, NEGATIVE} and 0 < stats["positive_fraction"] < 1


def test_imitation_learns_from_demonstrations_alone(demos):
    from learner.imitation import ImitationLearner

    learner = ImitationLearner(SmallVLA(), demos=demos[:4], steps_per_update=3)
    stats = learner.update(episodes_moving(demos[4:8], 0.8, True))
    assert stats["kept_episodes"] == 0 and learner.data.num_episodes == 4 and np.isfinite(stats["loss"])


def test_ppo_self_imitation_replays_the_successes_that_beat_their_layout(demos):
    """With self_imitation, every update puts the approved successes that beat their layout's other attempts into
    the anchor's replay, weighted by their group advantage, where they stay for later updates and make up that share
    of every anchor batch; a resumed learner finds the same ones again among the stored episodes; the policy learns
    the approved direction."""
    from actors.rollout import RolloutWorker
    from flywheel.vla.model import VLAConfig
    from learner.ppo import PPOLearner

    torch.manual_seed(1)
    cfg = VLAConfig()
    make = lambda sil: PPOLearner(SmallVLA(cfg), demos, seed=0, ppo_lr=3e-4, ppo_epochs=4, anchor=1.0,  # noqa: E731
                                  self_imitation=sil)
    learner, worker = make(0.9), RolloutWorker(lambda: VLAPolicy(cfg), {"max_steps": 4})

    def practise(it):  # 8 layouts, 4 attempts each; the detector approves the one whose first move went furthest right
        episodes = worker.collect([100 * it + i // 4 for i in range(32)], "train", sample_seed=it)
        for i in range(0, 32, 4):
            xs = [ep.actions[0, 0] for ep in episodes[i:i + 4]]
            for j, ep in enumerate(episodes[i:i + 4]):
                ep.labels.append(Label(source="detector", success=bool(j == np.argmax(xs)), version="d"))
        return episodes

    def first_x():  # the mean first move on 16 held-out seeds, acting from the mean
        return float(np.mean([ep.actions[0, 0] for ep in worker.collect(list(range(900, 916)), "eval")]))

    worker.set_weights(learner.snapshot())
    before = first_x()
    for it in range(2):
        stats = learner.update(practise(it))
        worker.set_weights(learner.snapshot())
    assert first_x() > before + 0.3, (before, first_x())
    assert stats["imitated_episodes"] == 8 and stats["replayed_successes"] == 16  # kept from both updates
    batch = learner.anchor.data.sample(2000, torch.Generator().manual_seed(0), 0.1)
    mine = batch["weights"] != 1.0  # a demonstration weighs 1; the best of 4 attempts (1 - 1/4) / std = sqrt(3)
    assert torch.allclose(batch["weights"][mine], torch.tensor(3.0 ** 0.5))
    assert abs(mine.float().mean().item() - 0.9) < 0.03

    resumed, episodes = make(0.9), practise(5)
    resumed.refill(episodes)
    assert resumed.anchor.replayed == 8
    assert "replayed_successes" not in make(0.0).update(episodes)  # off: nothing kept


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_ppo_clones_a_persons_corrections_beside_its_loss(demos, share):
    """The steps a person took over join PPO's anchor as demonstrations (HIL-SERL keeps its interventions with its
    demonstrations), with or without self-imitation: they are drawn into anchor batches, and the policy, credited
    with none of those episodes, comes to act as the person did where the person acted."""
    from learner.ppo import PPOLearner

    torch.manual_seed(0)
    own = _corrected(episodes_moving(demos[:12], 0.8, True))
    for ep in own:  # as PPO's practice records its draws: the chunk drawn and its log-probability
        ep.extras.update(drawn=ep.extras["chunks"], logp=np.zeros_like(ep.extras["chunks"]))
    for i, ep in enumerate(own[:4]):  # one layout of 4 attempts, one uncorrected and approved: PPO has a step to take
        own[i] = dataclasses.replace(ep, seed=0, extras={k: v for k, v in ep.extras.items() if k != INTERVENTION}) \
            if i == 0 else dataclasses.replace(ep, seed=0)
    learner = PPOLearner(SmallVLA(), demos[12:16], ppo_lr=1e-3, ppo_epochs=30, anchor=1.0, batch_size=32,
                         self_imitation=share)
    learner.update(own)
    corrections = {f"{ep.id}/corrections" for ep in own[1:]}
    assert corrections <= learner.anchor.data.keys()
    assert learner.anchor.replayed == (1 if share else 0)  # the approved success alone, with a share
    batch = learner.anchor.batch(torch.Generator().manual_seed(0))
    assert (batch["actions"][..., 0] == -0.8).any()  # the person's moves are drawn
    later = [(ep.observations["image"][6], ep.observations["proprio"][6], ep.instruction) for ep in own[1:]]
    acts = VLAPolicy(model=learner.model, eval_noise=0.0).act(
        np.stack([o[0] for o in later]), np.stack([o[1] for o in later]), [o[2] for o in later], seed=0)
    assert acts[..., 0].mean() < 0.0, acts[..., 0].mean()
