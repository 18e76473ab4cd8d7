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


def test_the_pipeline_profile_finds_where_the_actors_waited():
    """bench/pipeline.py's reading of Ray's timeline: over the loop's iterations after the first collection, an
    actor's time with no call running, shared out among the loop phases it fell in."""
    from bench.pipeline import actors_idle

    def call(actor: str, start: float, end: float, name: str = "hand_over") -> dict:
        return {"cat": f"task::RolloutWorker.{name}", "name": name, "tid": actor, "ts": start * 1e6,
                "dur": (end - start) * 1e6}

    spans = [("collect", 0.0, 10.0), ("update", 10.0, 18.0), ("publish", 18.0, 19.0), ("gate", 19.0, 20.0),
             ("collect", 20.5, 30.0), ("update", 30.0, 50.0)]  # the last update: nothing in flight, not counted
    events = [call("a", 0.0, 1.0, "__init__"),  # starting up is not a call of the loop's
              call("a", 1.0, 18.5), call("a", 19.0, 20.0), call("a", 20.5, 30.0),  # waited 0.5 in publish, 0.5 between
              call("b", 1.0, 19.0), call("b", 19.0, 19.5), call("b", 20.5, 40.0),  # 0.5 in gate, 0.5 between
              call("b", 45.0, 46.0)]  # after the last collection: outside the window
    got = actors_idle(events, spans)
    assert got["actors"] == 2 and got["seconds"] == 20.0
    assert abs(got["actors_wait"] - 2.0 / 40.0) < 1e-9
    assert {k: round(v * 40, 6) for k, v in got["idle_by_phase"].items()} == {"publish": 0.5, "gate": 0.5,
                                                                              "between phases": 1.0}
