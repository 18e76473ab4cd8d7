"""π0 / π0.5 (flywheel/vla/pi0.py): openpi's and LeRobot's checkpoint layouts load, damaged ones are refused by
name, the full sizes are what was published, and the learners train the small configuration."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from flywheel import plugins
from learning import episodes_moving, mean_dx, ppo_rewarding_right_first_moves
from flywheel.contracts import Sampling
from flywheel.vla import openpi
from flywheel.vla.model import VLAPolicy
from flywheel.vla.pi0 import Pi0, Pi0Config, Prefix
from flywheel.vla.pi0_policy import init_checkpoint

TEXTS = ["push the red block to the blue pad", "place the green block in the yellow bowl",
         "stack the blue block on the red block", "press the red button", "open the drawer"]


def small(pi05: bool = False, precision: str = "float32") -> Pi0Config:
    """openpi's own "dummy" Gemma for both streams, a one-layer vision tower: about 0.4M parameters."""
    return Pi0Config(action_dim=4, action_horizon=8, paligemma_variant="dummy", action_expert_variant="dummy",
                     vision_variant="siglip_dummy", vocab_size=128, max_token_len=24 if not pi05 else 48,
                     pi05=pi05, precision=precision)


def checkpoint(path, pi05=False, precision="float32", seed=0):
    rng = np.random.default_rng(seed)
    return init_checkpoint(path, small(pi05, precision), TEXTS, rng.random((200, 3)), rng.uniform(-1, 1, (200, 3)),
                           seed=seed)


def observation(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 64, 64, 3), generator=g, dtype=torch.uint8)
    return images.numpy(), torch.rand(batch, 3, generator=g).numpy(), TEXTS[:batch]


def act(bundle, obs, **sampling):
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    return policy.act(*obs, seed=0)


@pytest.mark.parametrize("pi05", [False, True])
def test_openpi_file_set_written_and_loaded_back(tmp_path, pi05):
    path = checkpoint(tmp_path / "ck", pi05=pi05, precision="bfloat16")
    assert {"model.safetensors", "config.json", "assets/flywheel/norm_stats.json"} <= \
        {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    config = json.loads((path / "config.json").read_text())
    assert {k: config[k] for k in ("action_dim", "action_horizon", "paligemma_variant", "action_expert_variant",
                                   "precision")} == {"action_dim": 4, "action_horizon": 8, "paligemma_variant": "dummy",
                                                     "action_expert_variant": "dummy", "precision": "bfloat16"}
    stats = json.loads((path / "assets/flywheel/norm_stats.json").read_text())["norm_stats"]
    assert set(stats) == {"state", "actions"} and set(stats["state"]) >= {"mean", "std", "q01", "q99"}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("action_in_proj.weight").dtype == torch.bfloat16  # openpi's precision
    stem = "paligemma_with_expert."
    assert {stem + "paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight",
            stem + "paligemma.model.multi_modal_projector.linear.weight",
            stem + "paligemma.model.language_model.layers.0.self_attn.q_proj.weight",
            stem + "gemma_expert.model.layers.3.mlp.down_proj.weight", "action_in_proj.weight",
            "action_out_proj.weight"} <= names
    own = {"time_mlp_in.weight", "time_mlp_out.bias"} if pi05 else {"state_proj.weight", "action_time_mlp_in.weight"}
    assert own <= names and not any(n.startswith("flywheel") for n in names)  # openpi's strict loader reads it
    if pi05:  # adaRMS: the expert's norms are dense layers of the time
        assert stem + "gemma_expert.model.layers.0.input_layernorm.dense.weight" in names

    bundle = plugins.resolve("policy", "pi0")(str(path), None)
    model = bundle.make_model()
    model.load_weights(bundle.weights)
    assert model.cfg == small(pi05, "bfloat16") and model.chunk == 8 and model.action_dim == 3
    with torch.random.fork_rng(devices=[]):  # the weights as initialised, rounded to bfloat16 as stored
        torch.manual_seed(0)
        original = Pi0(small(pi05))
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor.to(torch.bfloat16).float()), name
    actions = act(bundle, observation())
    assert actions.shape == (3, 8, 3) and actions.dtype == np.float32 and np.abs(actions).max() <= 1.0


def test_lerobot_layout_loads_through_its_key_map(tmp_path):
    """LeRobot's names ("model." first; before 0.4, PaliGemma's parts nested as transformers 4.4x did), its
    config.json and its normaliser file give the same policy as openpi's files."""
    from safetensors.torch import load_file, save_file

    path = checkpoint(tmp_path / "openpi")
    lerobot = tmp_path / "lerobot"
    lerobot.mkdir()
    renamed = {}
    for name, tensor in load_file(str(path / "model.safetensors")).items():
        name = name.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        name = name.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        renamed["model." + name.replace("action_time_mlp_", "time_mlp_")] = tensor
    save_file(renamed, str(lerobot / "model.safetensors"))
    (lerobot / "config.json").write_text(json.dumps({
        "type": "pi0", "chunk_size": 8, "n_action_steps": 8, "max_action_dim": 4, "max_state_dim": 4,
        "paligemma_variant": "dummy", "action_expert_variant": "dummy", "dtype": "float32",
        "tokenizer_max_length": 24}))
    stats = json.loads((path / "assets/flywheel/norm_stats.json").read_text())["norm_stats"]
    save_file({f"{feature}.{stat}": torch.tensor(stats[key][stat])
               for feature, key in (("observation.state", "state"), ("action", "actions")) for stat in ("mean", "std")},
              str(lerobot / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
    (lerobot / "tokenizer.model").write_bytes((path / "paligemma_tokenizer.model").read_bytes())

    ours = plugins.resolve("policy", "pi0")(str(path), None)
    theirs = plugins.resolve("policy", "pi0")(str(lerobot), None)
    assert theirs.weights.keys() == ours.weights.keys()
    np.testing.assert_allclose(act(theirs, observation()), act(ours, observation()), atol=1e-6)


def _damage(tmp_path, change):
    from safetensors.torch import load_file, save_file

    path = checkpoint(tmp_path / "ck")
    weights = load_file(str(path / "model.safetensors"))
    change(weights)
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("change,message", [
    (lambda w: w.pop("action_out_proj.weight"), r"missing 1 keys.*action_out_proj\.weight"),
    (lambda w: w.update({"action_out_proj.weight": torch.zeros(4, 7)}),
     r"action_out_proj\.weight has shape \(4, 7\).*expects \(4, 64\)"),
    (lambda w: w["action_in_proj.weight"].fill_(float("nan")), r"action_in_proj\.weight holds NaN"),
    (lambda w: w.update({"extra.weight": torch.zeros(2)}), r"unexpected 1 keys.*extra\.weight"),
])
def test_a_mismatched_checkpoint_is_refused_naming_the_key(tmp_path, change, message):
    path = _damage(tmp_path, change)
    with pytest.raises(openpi.Pi0CheckpointError, match=message):
        openpi.load(path)


def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
    path = checkpoint(tmp_path / "ck")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(openpi.Pi0CheckpointError, match=r"model\.safetensors is damaged"):
        openpi.load(path)
    (path / "model.safetensors").write_bytes(data)
    (path / "config.json").write_text('{"action_dim": 4, "action_horizon": 8, "paligemma_variant": "gemma_9b"}')
    with pytest.raises(openpi.Pi0CheckpointError, match="paligemma_variant='gemma_9b'"):
        openpi.load(path)
    (path / "config.json").unlink()
    with pytest.raises(openpi.Pi0CheckpointError, match=r"config\.json is missing"):
        openpi.load(path)
    with pytest.raises(openpi.Pi0CheckpointError, match="not a directory"):
        openpi.load(tmp_path / "nowhere")


def test_full_sizes_match_the_published_counts_without_allocating():
    """π0: PaliGemma 3B (SigLIP So400m + Gemma 2B) and a 300M action expert, 3.3B as published (openpi counts its
    expert at 311M); built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        pi0, pi05 = Pi0(Pi0Config()), Pi0(Pi0Config(pi05=True, max_token_len=200))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert pi0.action_in_proj.weight.is_meta
    expert = count(pi0.paligemma_with_expert.gemma_expert)
    assert 0.30e9 < expert < 0.32e9, expert
    assert 2.9e9 < count(pi0.paligemma_with_expert.paligemma) < 2.95e9  # PaliGemma-3B without its tied head
    assert abs(count(pi0) - 3.3e9) / 3.3e9 < 0.03, count(pi0)
    assert abs(count(pi05) - 3.3e9) / 3.3e9 < 0.03, count(pi05)  # adaRMS adds 3 x width per norm instead of 1


@pytest.mark.parametrize("noise_at", ["steps", "output"])
def test_log_probabilities_of_practice_draws_are_recomputed_exactly(tmp_path, noise_at):
    _, model = _pi0(tmp_path)
    images, proprio, texts = observation()
    ids = torch.from_numpy(model.token_ids(texts))
    extras = {}
    model.sample(torch.from_numpy(images), ids, torch.from_numpy(proprio), torch.Generator().manual_seed(1),
                 extras=extras, flow_noise=0.1, noise=0.0 if noise_at == "output" else 1.0, noise_at=noise_at)
    ctx = model.context(torch.from_numpy(images), ids, torch.from_numpy(proprio))
    recorded = {"drawn": extras["drawn"]} if noise_at == "output" else {"flow_chain": extras["flow_chain"]}
    logp = model.log_prob(ctx, recorded, 0.1)
    torch.testing.assert_close(logp, extras["logp"], atol=2e-4, rtol=1e-5)
    logp.sum().backward()
    assert model.action_out_proj.weight.grad.abs().sum() > 0


def _pi0(tmp_path):
    bundle = plugins.resolve("policy", "pi0")(str(checkpoint(tmp_path / "ck")), None)
    model = bundle.make_model()
    model.load_weights(bundle.weights)
    return bundle, model


def test_filtered_bc_moves_pi0_toward_what_the_detector_approves(tmp_path, demos):
    """Filtered BC, through π0's flow-matching loss, clones what the detector approved: moving right, not left."""
    from learner.filtered_bc import FilteredBCLearner

    _, model = _pi0(tmp_path)
    before = mean_dx(model, demos[:8], eval_noise=0.0)
    torch.manual_seed(0)
    learner = FilteredBCLearner(model, demos=[], steps_per_update=50, batch_size=16, lr=1e-3)
    learner.update(episodes_moving(demos[:12], 0.8, True) + episodes_moving(demos[:12], -0.8, False))
    after = mean_dx(model, demos[:8], eval_noise=0.0)
    assert learner.version == 1 and after > before + 0.3 and after > 0.3, (before, after)


def test_recap_conditions_pi0_on_the_advantage(tmp_path, demos):
    """RECAP through π0's conditioning input: conditioned on "positive" (and guided) it moves as the approved
    attempts did, apart from "negative"."""
    from learner.bc import action_chunks
    from learner.recap import RecapLearner

    _, model = _pi0(tmp_path)
    torch.manual_seed(0)
    learner = RecapLearner(model, demos=[], steps_per_update=80, batch_size=16, lr=1e-3, indicator_dropout=0.3,
                           guidance=2.0, value_steps=60)
    episodes = [dataclasses.replace(ep, extras={"chunks": action_chunks(ep.actions, 8)[::4],
                                                "chunk_steps": np.arange(0, ep.num_steps, 4)})
                for ep in episodes_moving(demos[:12], 0.8, True) + episodes_moving(demos[:12], -0.8, False)]
    stats = learner.update(episodes)
    assert stats["positive_of_successes"] > 0.9 and stats["positive_of_failures"] == 0, stats
    policy = VLAPolicy(model=model, eval_noise=0.0)
    ep = demos[0]
    obs = (ep.observations["image"][:1], ep.observations["proprio"][:1], [ep.instruction])
    policy.sampling = Sampling(indicator=1, guidance=2.0)
    positive = policy.act(*obs, seed=0)[..., 0].mean()
    policy.sampling = Sampling(indicator=2, guidance=1.0)
    negative = policy.act(*obs, seed=0)[..., 0].mean()
    assert positive > 0 and positive - negative > 0.3, (positive, negative)


def test_ppo_moves_pi0_toward_what_the_detector_approves(tmp_path):
    """PPO with the exact log-probabilities of π0's flow draws (noise at the chunk) shifts it the way the detector
    approves (here: the attempts whose first move went right more than the others' at the same layout), as it does
    the small VLA (tests/test_learner.py)."""
    from actors.rollout import RolloutWorker
    from learner.ppo import PPOLearner

    bundle, model = _pi0(tmp_path)
    learner = PPOLearner(model, seed=0, ppo_lr=1e-3, ppo_epochs=8, anchor=0.0, flow_noise=0.2, noise_at="output")
    worker = RolloutWorker(bundle.make_actor, {"max_steps": 4})  # one chunk an episode
    before, after = ppo_rewarding_right_first_moves(learner, worker, drawn_shape=(1, 8, 4))
    assert after > before + 0.1, (before, after)


def test_pretrain_writes_a_pi0_that_a_run_loads(tmp_path):
    """``flywheel pretrain model=pi0``: the base is an openpi checkpoint directory holding the trained weights."""
    from flywheel.config import load_config
    from flywheel.pretrain import pretrain

    cfg = load_config("pretrain", [f"out_dir={tmp_path}", "model=pi0", "demos=4", "steps=4", "batch_size=8",
                                   "warmup=1", "eval_every=1000", "eval_episodes=2", "checkpoint_every=4",
                                   "env.max_steps=8", "pi0.paligemma_variant=dummy", "pi0.action_expert_variant=dummy",
                                   "pi0.vision_variant=siglip_dummy"])
    record = pretrain(cfg, say=lambda m: None)
    bundle = plugins.resolve("policy", "pi0")(str(tmp_path / "base_pi0"), None)
    assert bundle.meta["description"] == record["description"] and bundle.sensors == ("overhead",)
    initial = plugins.resolve("policy", "pi0")(str(tmp_path / "init_pi0"), None)
    assert any(not np.array_equal(bundle.weights[k], initial.weights[k]) for k in bundle.weights)  # trained
    assert act(bundle, observation()).shape == (3, 8, 3)


@pytest.mark.parametrize("pi05", [False, True])
def test_the_prefix_cache_computes_what_one_joint_pass_does(pi05):
    """Acting and training split π0's forward in two (the prefix's keys and values, then the expert on them); openpi
    trains with both streams in one attention per layer. The same velocity either way, and the flow-matching loss
    reaches every weight that acts but the last backbone layer's past its keys and values (as in π0)."""
    import torch.nn.functional as F

    from bench.pi0_latency import inputs, loss
    from flywheel.vla.pi0 import BLOCKED, rope

    torch.manual_seed(0)
    cfg = dataclasses.replace(small(pi05), image_slots=2)
    model = Pi0(cfg)
    with torch.no_grad():  # as trained weights are: nothing at zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args, actions = inputs(cfg, 2, "cpu", torch.float32)
    args[1][1, 1] = False  # a missing camera
    args[3][0, 10:] = False  # a short prompt
    t = torch.tensor([0.3, 0.8])
    cached = model.velocity(model.prefix(*args)[0], actions, t)

    prefix_layers, expert = model.paligemma_with_expert.paligemma.model, model.paligemma_with_expert.gemma_expert.model
    images, image_valid, tokens, token_valid, state = args
    patches = prefix_layers.vision_tower(images.flatten(0, 1))
    x = torch.cat([prefix_layers.multi_modal_projector.linear(patches).view(2, -1, cfg.vlm.width),
                   prefix_layers.language_model.embed_tokens(tokens) * cfg.vlm.width ** 0.5], 1)
    suffix, blocks, cond = model._suffix(Prefix(None, None, None, state), actions, t, None)
    valid = torch.cat([image_valid.repeat_interleave(patches.shape[1], 1), token_valid,
                       torch.ones(2, suffix.shape[1], dtype=torch.bool)], 1)
    order = torch.cat([torch.zeros(x.shape[1], dtype=torch.long), blocks.cumsum(0)])  # openpi's make_att_2d_masks
    allowed = (order[None, :] <= order[:, None])[None] & valid[:, None, :] & valid[:, :, None]
    mask = torch.where(allowed, 0.0, BLOCKED)[:, None]
    cos_sin = rope(valid.long().cumsum(1) - 1, cfg.vlm.head_dim)
    n = x.shape[1]
    for layer, own in zip(prefix_layers.language_model.layers, expert.layers):
        q1, k1, v1, _ = layer.qkv(x, None, tuple(c[:, :, :n] for c in cos_sin))
        q2, k2, v2, gate = own.qkv(suffix, cond, tuple(c[:, :, n:] for c in cos_sin))
        out = F.scaled_dot_product_attention(torch.cat([q1, q2], 2), torch.cat([k1, k2], 2), torch.cat([v1, v2], 2),
                                             attn_mask=mask, enable_gqa=True)
        x, suffix = layer.finish(x, out[:, :, :n], None, None), own.finish(suffix, out[:, :, n:], gate, cond)
    joint = model.action_out_proj(expert.norm(suffix, cond)[0][:, -actions.shape[1]:])
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=1e-4)

    loss(model, args, actions).backward()
    last = f"paligemma_with_expert.paligemma.model.language_model.layers.{cfg.vlm.depth - 1}."
    untrained = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert untrained == {last + n for n in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.gate_proj.weight",
                                            "mlp.up_proj.weight", "mlp.down_proj.weight",
                                            "post_attention_layernorm.weight")} | {
        "paligemma_with_expert.paligemma.model.language_model.norm.weight"}


@pytest.mark.parametrize("vlm", ["frozen", "lora"])
def test_what_fits_one_gpu_trains_what_it_says(tmp_path, demos, vlm):
    """policy.options: a frozen VLM trains the action expert alone; LoRA trains low-rank adapters on the language
    model besides, and the checkpoint written folds them in, so that openpi (and flywheel) read it as it acts."""
    from learner.filtered_bc import FilteredBCLearner

    path = checkpoint(tmp_path / "ck")
    bundle = plugins.resolve("policy", "pi0")(str(path), None, vlm=vlm, lora_rank=4)
    model = bundle.make_model()
    model.load_weights(bundle.weights)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = FilteredBCLearner(model, demos=[], steps_per_update=30, batch_size=16, lr=1e-3)
    learner.update(episodes_moving(demos[:8], 0.8, True) + episodes_moving(demos[:8], -0.8, False))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    vlm_names = {k for k in changed if k.startswith("paligemma_with_expert.paligemma.")}
    assert any(k.startswith("paligemma_with_expert.gemma_expert.") for k in changed)
    if vlm == "lora":  # the adapters, not the weights they adapt
        assert vlm_names and all(".lora_" in k for k in vlm_names), sorted(vlm_names)[:4]
    else:
        assert not vlm_names, sorted(vlm_names)[:4]
    openpi.save(tmp_path / "out", model, model.spec.norm_stats, tokenizer=model.spec.tokenizer,
                record={"sensors": ["overhead"], "action_dim": 3})
    merged = plugins.resolve("policy", "pi0")(str(tmp_path / "out"), None)
    adapted = bundle.make_actor()
    adapted.load_weights(model.get_weights())
    np.testing.assert_allclose(act(merged, observation()), adapted.act(*observation(), seed=0), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, model = _pi0(tmp_path)
    images, proprio, texts = observation()
    args = (torch.from_numpy(images), torch.from_numpy(model.token_ids(texts)), torch.from_numpy(proprio))
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.train()
        model.gradient_checkpointing = on
        model.imitation_loss(model.context(*args), torch.zeros(3, 8, 3), generator=torch.Generator().manual_seed(0)
                             ).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_a_pi0_served_over_the_network_acts_as_in_process(tmp_path):
    """flywheel serve serves a π0 like any policy: its metadata gives the sampler's noise in the model's own (padded)
    width and its state's length (which a DSRL noise policy reads; any image size: π0 resizes), and a remote actor
    gets the chunk the policy gives in process, from its mean or from a given noise."""
    from actors.remote_policy import RemotePolicy
    from flywheel.serve import PolicyServer, ServedPolicy, expected_inputs

    bundle = plugins.resolve("policy", "pi0")(str(checkpoint(tmp_path / "ck")), 0.0)
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    images, proprio, texts = observation(batch=1)
    noise = np.random.default_rng(0).standard_normal((1, 8, 4)).astype(np.float32)
    here = policy.act(images, proprio, texts), policy.act(images, proprio, texts, noise=noise)
    image, state = expected_inputs(bundle)
    served = ServedPolicy(policy, name="pi0", checkpoint="ck", image_shape=image, state_dim=state, meta=bundle.meta)
    with PolicyServer(served, port=0) as server:
        remote = RemotePolicy(server.url)
        assert remote.metadata["noise_shape"] == [8, 4] and (remote.chunk, remote.action_dim) == (8, 3)
        assert remote.metadata["state_dim"] == 3 and remote.metadata["image_shape"] == [None, None, 3]
        np.testing.assert_allclose(remote.act(images, proprio, texts), here[0], atol=1e-6)
        np.testing.assert_allclose(remote.act(images, proprio, texts, noise=noise), here[1], atol=1e-6)
        remote.close()
