"""The benchmarks' own models: what they time must be what they say."""

import torch

from bench.pi0_latency import Pi0, Pi0Size, inputs


def test_the_pi0_sized_model_caches_the_prefix_without_changing_what_it_computes():
    # bench/pi0_latency.py times inference with the prefix's keys and values cached and training with both streams in
    # one pass: on a small copy, the two give the same velocity, and the training loss reaches every weight that acts.
    torch.manual_seed(0)
    c = Pi0Size().scaled(0.05)
    model = Pi0(c)
    images, text, state, actions = inputs(c, 2, torch.device("cpu"), torch.float32)
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        cached = model.velocity(model.prefix_cache(model.prefix_tokens(images, text)), state, actions, t)
        joint = model.joint(images, text, state, actions, t)
    assert cached.shape == actions.shape
    assert torch.allclose(cached, joint, atol=1e-5)
    assert model.sample(images, text, state, torch.randn_like(actions)).shape == actions.shape
    model.loss(images, text, state, actions).backward()  # the training step reaches every weight that acts
    last = f"backbone.{c.layers - 1}."  # but the last backbone layer's, past its keys and values (as in pi0)
    untrained = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert untrained == {last + n for n in ("q.weight", "o.weight", "norm2.weight", "gate_up.weight", "down.weight")}
