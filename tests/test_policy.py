import numpy as np
import torch

from actors.tabletop import TabletopEnv
from flywheel.contracts import Policy, Sampling
from flywheel.vla.model import SmallVLA, VLAConfig, VLAPolicy


def _batch(n=3):
    env = TabletopEnv()
    obs = [env.reset(seed=i) for i in range(n)]
    images = np.stack([o["image"] for o, _ in obs])
    proprio = np.stack([o["proprio"] for o, _ in obs])
    return images, proprio, [info["instruction"] for _, info in obs]


def test_policy_contract_and_shapes():
    policy = VLAPolicy(VLAConfig())
    assert isinstance(policy, Policy)
    images, proprio, texts = _batch(3)
    out = policy.act(images, proprio, texts, seed=0)
    assert out.shape == (3, policy.chunk, policy.action_dim) and out.dtype == np.float32
    assert np.all(out >= -1) and np.all(out <= 1)
    assert np.array_equal(out, policy.act(images, proprio, texts, seed=0))  # seeded sampling is reproducible


def test_weights_round_trip_between_policies():
    a, b = VLAPolicy(), VLAPolicy()
    images, proprio, texts = _batch(2)
    b.load_weights(a.get_weights())
    assert np.allclose(a.act(images, proprio, texts, seed=1), b.act(images, proprio, texts, seed=1))


def test_action_loss_is_scalar_and_backpropagates_to_every_part():
    model = SmallVLA()
    images, proprio, texts = _batch(4)
    loss = model.action_loss(
        torch.from_numpy(images), model.tokenize(texts), torch.from_numpy(proprio), torch.rand(4, 8, 3) * 2 - 1,
        aux=torch.rand(4, 4), aux_mask=torch.ones(4),
    )
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    for name in ("encoder.patchify.weight", "encoder.keypoints.q.weight", "head.out.weight", "aux_head.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_instruction_changes_the_action():
    torch.manual_seed(0)
    policy = VLAPolicy()
    images, proprio, _ = _batch(1)
    a = policy.act(images, proprio, ["push the red block onto the green pad"], seed=0)
    b = policy.act(images, proprio, ["put the blue block in the yellow bowl"], seed=0)
    assert not np.allclose(a, b)


def test_action_token_head_samples_bins_with_their_exact_log_probability():
    """The discrete head (RT-2 / OpenVLA style): every action is a bin centre, the recorded log-probabilities are
    each token's exact one (its log-softmax: PPO's denominators), seeded draws repeat, and the
    cross-entropy (against a Gaussian over the bins) teaches it a target chunk."""
    torch.manual_seed(0)
    cfg = VLAConfig(action_head="tokens", bins=16)
    policy = VLAPolicy(cfg)
    images, proprio, texts = _batch(3)
    out = policy.act(images, proprio, texts, seed=0)
    assert out.shape == (3, cfg.chunk, cfg.action_dim)
    centres = np.linspace(-1, 1, 16)
    assert np.abs(out[..., None] - centres).min(-1).max() < 1e-6  # bin centres only
    assert np.array_equal(out, policy.act(images, proprio, texts, seed=0))
    model = policy.model
    with torch.no_grad():
        logits = model.head(model.encoder(torch.from_numpy(images), model.tokenize(texts), torch.from_numpy(proprio)))
        idx = torch.from_numpy(np.abs(out[..., None] - centres).argmin(-1))
        manual = torch.log_softmax(logits, -1).gather(-1, idx[..., None]).squeeze(-1)
    assert np.allclose(policy.last_extras["logp"], manual.numpy(), atol=1e-4)  # per token: (B, C, A)

    target = torch.from_numpy(np.tile(centres[[3, 12, 8]], (3, cfg.chunk, 1)).astype(np.float32))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    args = (torch.from_numpy(images), model.tokenize(texts), torch.from_numpy(proprio), target)
    first = model.action_loss(*args).item()
    for _ in range(60):
        optimizer.zero_grad()
        model.action_loss(*args).backward()
        optimizer.step()
    soft = model.head.soft_targets(target)  # the loss's floor: its targets' entropy (a Gaussian over the bins)
    floor = float(-(soft * soft.clamp_min(1e-12).log()).sum(-1).mean())
    assert model.action_loss(*args).item() - floor < 0.1 * (first - floor)
    assert np.allclose(policy.act(images, proprio, texts, seed=3), target.numpy())  # it now draws the target


def test_an_unknown_action_head_is_refused():
    import pytest

    with pytest.raises(ValueError, match="action_head='diffusion' is unknown"):
        VLAConfig(action_head="diffusion")


def test_practice_noise_zero_practises_one_chunk_per_observation_and_evaluation_still_samples():
    policy = VLAPolicy(VLAConfig())
    policy.load_weights(policy.get_weights(), Sampling(practice_noise=0.0))  # as a learner's snapshot asks
    images, proprio, texts = _batch(2)
    policy.explore = True  # practice
    assert np.array_equal(policy.act(images, proprio, texts, seed=0), policy.act(images, proprio, texts, seed=1))
    policy.explore = False  # evaluation samples the policy as it is
    assert not np.array_equal(policy.act(images, proprio, texts, seed=0), policy.act(images, proprio, texts, seed=1))


def test_eval_noise_sets_how_every_snapshot_acts_in_evaluation_and_leaves_practice_alone():
    images, proprio, texts = _batch(2)
    policy = VLAPolicy(VLAConfig(), eval_noise=0.0)  # eval.noise=0: every learner's policy from the flow's mean
    policy.load_weights(policy.get_weights(), Sampling(practice_noise=1.0))  # a snapshot that samples
    mean = policy.model.sample(torch.from_numpy(images), policy.model.tokenize(texts),
                               torch.from_numpy(proprio).float(), noise=0.0).numpy()
    assert np.allclose(policy.act(images, proprio, texts, seed=0), mean, atol=1e-6)
    assert np.allclose(policy.act(images, proprio, texts, seed=1), mean, atol=1e-6)
    policy.explore = True  # practice is the learner's to choose
    assert not np.array_equal(policy.act(images, proprio, texts, seed=0), policy.act(images, proprio, texts, seed=1))
    sampled = VLAPolicy(VLAConfig(), eval_noise=1.0)  # and a snapshot that asks for its mean (PPO's) can be sampled
    sampled.load_weights(policy.get_weights(), Sampling(noise=0.0, practice_noise=0.0))
    assert not np.array_equal(sampled.act(images, proprio, texts, seed=0), sampled.act(images, proprio, texts, seed=1))


def test_after_a_batch_of_too_many_colours_grouping_waits_before_it_is_tried_again(monkeypatch):
    """Inputs with too many colours keep having them (a detector's window from two cameras), so the check is not
    paid at every call: after a miss the next RETRY_AFTER calls go straight to the cells, and then it is tried again."""
    import flywheel.vla.model as vla_model

    keypoints = vla_model.PixelKeypoints(16, 2, in_channels=5)
    checks, real = [], vla_model.colour_groups
    monkeypatch.setattr(vla_model, "colour_groups", lambda colour, limit: checks.append(limit) or real(colour, limit))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, generator=gen)
    textured = torch.rand(2, 5, 8, 8, generator=gen) - 0.5  # 32 cells of 32 colours: more than an image's 16
    flat = torch.zeros(2, 5, 8, 8)
    keypoints(x, textured)
    assert len(checks) == 1
    for _ in range(vla_model.PixelKeypoints.RETRY_AFTER):
        keypoints(x, flat)
    assert len(checks) == 1
    keypoints(x, flat)
    assert len(checks) == 2 and keypoints._skip == 0  # tried again, and grouped: it goes on checking every call


def test_keypoints_over_colours_are_the_keypoints_over_cells(monkeypatch):
    """A flat-shaded scene has few colours, and the keypoint attention is computed over them (flywheel/vla/model.py
    colour_groups): the same context and the same gradients as over every cell; a textured image falls back."""
    import torch.nn.functional as F

    import flywheel.vla.model as vla_model
    from flywheel.vla.checkpoint import load_policy_checkpoint

    model, _ = load_policy_checkpoint("base", as_model=True)
    images, proprio, texts = _batch(8)
    images, proprio, ids = torch.from_numpy(images), torch.from_numpy(proprio), model.tokenize(texts)
    actions = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    colour = F.avg_pool2d(model.encoder.pixels(images), 2).permute(0, 2, 3, 1).flatten(1, 2)[..., :-2]
    palette, inverse = vla_model.colour_groups(colour, limit=colour.shape[1])
    assert len(palette) < 200 and torch.allclose(palette[inverse], colour, atol=1e-6)
    # eighteen channels (a detector's window): keys packed over several passes, still exact
    deep = torch.cat([colour, colour.flip(1), colour.roll(5, 1)] * 2, dim=-1)
    palette, inverse = vla_model.colour_groups(deep, limit=10**9)
    assert torch.allclose(palette[inverse], deep, atol=1e-6)
    assert vla_model.colour_groups(torch.rand(8, 1024, 3) - 0.5, limit=1024) is None  # textured: too many

    def context_and_grads():
        torch.manual_seed(0)
        model.zero_grad()
        ctx = model.encoder(images, ids, proprio)
        model.action_loss(images, ids, proprio, actions).backward()
        return ctx.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grouped, grouped_grads = context_and_grads()
    monkeypatch.setattr(vla_model, "colour_groups", lambda colour, limit: None)
    cells, cell_grads = context_and_grads()
    assert torch.allclose(grouped, cells, atol=1e-4)
    # (the keys' LayerNorm bias has no true gradient: a shift of every key moves no softmax; both are rounding)
    for name, g in cell_grads.items():
        if name != "encoder.keypoints.ln_k.bias":
            assert torch.allclose(grouped_grads[name], g, atol=1e-5, rtol=1e-3), name
