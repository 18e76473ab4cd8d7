import dataclasses

import numpy as np
import torch

from flywheel.contracts import Label
from flywheel.vla.model import SmallVLA, VLAPolicy
from learner.filtered_bc import FilteredBCLearner


def _episodes_moving(demos, dx: float, success: bool):
    """The demos' observations with every action replaced by a constant move along x, judged by the detector."""
    out = []
    for ep in demos:
        actions = np.zeros_like(ep.actions)
        actions[:, 0] = dx
        out.append(dataclasses.replace(
            ep, id=ep.id + str(dx), actions=actions, extras={}, ground_truth=None,
            labels=[Label(source="detector", success=success, version="d", score=float(success), threshold=0.5)],
        ))
    return out


def _mean_dx(model, demos):
    policy = VLAPolicy(model=model)
    obs = [(ep.observations["image"][0], ep.observations["proprio"][0], ep.instruction) for ep in demos]
    acts = policy.act(np.stack([o[0] for o in obs]), np.stack([o[1] for o in obs]), [o[2] for o in obs], seed=0)
    return float(acts[..., 0].mean())


def test_filtered_bc_moves_the_policy_toward_what_the_detector_approves(demos):
    for direction in (+1.0, -1.0):
        torch.manual_seed(0)
        model = SmallVLA()
        learner = FilteredBCLearner(model, demos=[], steps_per_update=60, batch_size=32, lr=1e-3)
        labelled = _episodes_moving(demos, 0.8 * direction, True) + _episodes_moving(demos, -0.8 * direction, False)
        stats = learner.update(labelled)
        assert stats["kept_episodes"] == len(demos) and learner.version == 1
        assert _mean_dx(model, demos[:8]) * direction > 0.4
        assert learner.snapshot().version == 1


def test_group_advantage_credits_rare_successes_most(demos):
    def judged(ep, seed, ok):
        return dataclasses.replace(ep, seed=seed, labels=[Label(source="detector", success=ok, version="d")])

    ep = demos[0]
    batch = [judged(ep, 1, True), judged(ep, 1, False), judged(ep, 1, False), judged(ep, 1, False),
             judged(ep, 2, True), judged(ep, 2, True), judged(ep, 2, True), judged(ep, 2, True)]
    adv = FilteredBCLearner.advantages(batch)
    assert np.allclose(adv, [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_recap_conditions_on_advantage_and_guides_toward_success(demos):
    from learner.recap import AdvantageConditionedLearner

    torch.manual_seed(0)
    model = SmallVLA()
    learner = AdvantageConditionedLearner(model, demos=[], steps_per_update=80, batch_size=32, lr=1e-3,
                                          indicator_dropout=0.3, guidance=2.0)
    learner.update(_episodes_moving(demos, 0.8, True) + _episodes_moving(demos, -0.8, False))
    snap = learner.snapshot()
    assert snap.meta["sampling"] == {"indicator": 1, "guidance": 2.0}
    policy = VLAPolicy(model=model)
    ep = demos[0]
    obs = (ep.observations["image"][:1], ep.observations["proprio"][:1], [ep.instruction])
    policy.sampling = {"indicator": 1, "guidance": 2.0}
    positive = policy.act(*obs, seed=0)[..., 0].mean()
    policy.sampling = {"indicator": 2, "guidance": 1.0}
    negative = policy.act(*obs, seed=0)[..., 0].mean()
    assert positive > 0.4 and negative < 0.0, (positive, negative)


def test_zero_indicator_leaves_an_old_checkpoint_unchanged(demos):
    model = SmallVLA()
    weights = {k: v.numpy() for k, v in model.state_dict().items() if k != "indicator.weight"}
    fresh = SmallVLA()
    fresh.load_weights(weights)
    ep = demos[0]
    obs = (ep.observations["image"][:2], ep.observations["proprio"][:2], [ep.instruction] * 2)
    a = VLAPolicy(model=model).act(*obs, seed=3)
    b = VLAPolicy(model=fresh).act(*obs, seed=3)
    assert np.allclose(a, b, atol=1e-5)


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
