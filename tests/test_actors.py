import functools

import numpy as np
import pytest

from actors.ray_actors import RolloutGroup
from flywheel.contracts import PolicySnapshot
from flywheel.vla.model import VLAConfig, VLAPolicy

ENV = {"max_steps": 12, "execute": 4}


def _snapshot(version, scale):
    weights = VLAPolicy().get_weights()
    return PolicySnapshot(version, {k: (v * scale if v.dtype.kind == "f" else v) for k, v in weights.items()})


@pytest.mark.parametrize("use_ray", [False, True])
def test_weights_reach_actors_in_version_order_and_stamp_episodes(use_ray, request):
    import ray
    import torch

    if use_ray:
        request.getfixturevalue("ray_local")
    driver_threads = torch.get_num_threads()
    group = RolloutGroup(functools.partial(VLAPolicy, VLAConfig()), ENV, num_workers=2, use_ray=use_ray,
                         cpus_per_worker=0.5)
    try:
        for v in (1, 2, 3):
            assert group.publish(_snapshot(v, 1.0)) == [v, v]
        with pytest.raises(ValueError, match="not newer"):
            group.publish(_snapshot(2, 1.0))
        assert group.applied_versions() == [[1, 2, 3], [1, 2, 3]]
        eps = group.collect([10, 11, 12], "train", sample_seed=0)
        assert [ep.seed for ep in eps] == [10, 11, 12]
        assert {ep.policy_version for ep in eps} == {3}
        assert all(ep.observations["image"].shape[0] == ep.num_steps + 1 for ep in eps)
        # A Ray actor acts on one thread per CPU it was given (at least one); a worker in the driver leaves the
        # driver's threads to the learner and the detector, which train there.
        threads = [ray.get(w.__ray_call__.remote(lambda _: torch.get_num_threads())) for w in group.workers] \
            if use_ray else [torch.get_num_threads()]
        assert threads == ([1, 1] if use_ray else [driver_threads])
    finally:
        group.close()


def test_worker_ignores_stale_snapshots():
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(functools.partial(VLAPolicy, VLAConfig()), ENV)
    with pytest.raises(RuntimeError, match="no weights yet"):
        worker.collect([0], "train")
    new, old = _snapshot(5, 1.0), _snapshot(4, 0.0)
    worker.set_weights(new)
    assert worker.set_weights(old) == 5
    w = worker.policy.get_weights()
    assert any(np.abs(v).sum() > 0 for v in w.values() if v.dtype.kind == "f")


def test_a_worker_hands_its_heap_back_only_once_it_sits_idle(monkeypatch):
    """A trim makes the next collection page its memory in again, so a worker trims only after ``trim_idle_s``
    without a collection: one kept busy never does, and a collection that starts calls off the trim pending."""
    import time

    from actors import rollout

    trims = []
    monkeypatch.setattr(rollout, "trim_heap", lambda: trims.append(time.monotonic()))
    busy = rollout.RolloutWorker(functools.partial(VLAPolicy, VLAConfig()), ENV, trim_idle_s=60.0)
    busy.set_weights(_snapshot(1, 1.0))
    busy.collect([0], "train")
    pending = busy._trim_timer
    busy.collect([1], "train")  # busy again: the first trim is called off
    pending.join(timeout=10)
    assert not pending.is_alive() and trims == [] and busy.usage()["trims"] == 0
    busy._trim_timer.cancel()

    idle = rollout.RolloutWorker(functools.partial(VLAPolicy, VLAConfig()), ENV, trim_idle_s=0.05)
    idle.set_weights(_snapshot(1, 1.0))
    for n in (1, 2):  # after each collection, once
        ended = time.monotonic()
        idle.collect([n], "train")
        idle._trim_timer.join(timeout=10)
        assert len(trims) == n and trims[-1] >= ended and idle.usage()["trims"] == n
    never = rollout.RolloutWorker(functools.partial(VLAPolicy, VLAConfig()), ENV)  # in the driver: no timer at all
    never.set_weights(_snapshot(1, 1.0))
    never.collect([3], "train")
    assert never._trim_timer is None and len(trims) == 2


def test_third_party_episodes_run_in_waves_with_every_argument_passed_on(monkeypatch):
    """A heavy simulator (its factory's max_parallel) is stepped at most that many environments at a time; every
    argument reaches every wave, and the episodes come back one per seed, in order."""
    from actors.rollout import run_episodes
    from flywheel import plugins
    from actors.tabletop import TabletopEnv
    from actors.thirdparty import MAX_PARALLEL

    alive, most, calls = [0], [0], []

    class Counted(TabletopEnv):
        def close(self):
            alive[0] -= 1
            super().close()

    def make(family, **kwargs):
        calls.append((family, kwargs["max_steps"]))
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        return Counted(family="push", image_size=kwargs["image_size"], max_steps=kwargs["max_steps"])

    make.max_parallel = MAX_PARALLEL  # as the MuJoCo simulators' factories say
    monkeypatch.setitem(plugins.REGISTRY["env"], "heavy", make)
    seeds = list(range(2 * MAX_PARALLEL + 1))
    eps = run_episodes(seeds, "train", None, policy_version=-1, name="heavy", family="push", max_steps=7)
    assert [ep.seed for ep in eps] == seeds and all(ep.num_steps <= 7 for ep in eps)
    assert most[0] <= MAX_PARALLEL and alive[0] == 0 and calls == [("push", 7)] * len(seeds)


@pytest.mark.parametrize("use_ray", [False, True])
def test_only_the_arrays_that_changed_travel_and_a_replaced_worker_gets_them_all(use_ray, request):
    if use_ray:
        request.getfixturevalue("ray_local")
    group = RolloutGroup(functools.partial(VLAPolicy, VLAConfig()), ENV, num_workers=2, use_ray=use_ray,
                         cpus_per_worker=0.5)
    try:
        first = _snapshot(1, 1.0)
        group.publish(first)
        assert group.last_sync["arrays"] == len(first.weights)
        key = next(k for k in first.weights if k.startswith("head."))
        second = PolicySnapshot(2, {**first.weights, key: first.weights[key] + 1.0})
        assert group.publish(second) == [2, 2]
        assert group.last_sync["arrays"] == 1 and group.last_sync["bytes"] == first.weights[key].nbytes
        held = group._call("collect", [(0, ([10], "eval", 0))])[0]  # the worker acts with the merged weights
        assert held[0].policy_version == 2
        if not use_ray:
            np.testing.assert_array_equal(group.workers[0].policy.get_weights()[key], second.weights[key])
            np.testing.assert_array_equal(group.workers[1].policy.get_weights()["encoder.tok_emb.weight"],
                                          first.weights["encoder.tok_emb.weight"])
        else:  # a worker that died holds no version to apply a change to: its replacement gets the whole snapshot
            import ray

            ray.kill(group.workers[0])
            third = PolicySnapshot(3, {**second.weights, key: second.weights[key] + 1.0})
            assert group.publish(third) == [3, 3] and group.restarts == 1 and group.last_sync["arrays"] == 1
    finally:
        group.close()


def test_an_acting_policy_shares_the_snapshot_it_is_given_and_acts_as_a_copy_would():
    """Applying weights to a rollout policy makes its parameters the snapshot's own arrays (no copy: a 100M model's
    snapshot reaches 4 actors in 8-16 ms, bench/weight_sync.py); it acts exactly as a model that copied them, takes a
    checkpoint file's arrays as they are stored, and a delta changes only the arrays it names."""
    from flywheel.vla.checkpoint import load_policy_checkpoint
    from flywheel.vla.model import SmallVLA

    cfg, weights, _ = load_policy_checkpoint("base")  # as stored: a scalar parameter is saved with shape (1,)
    shared = VLAPolicy(cfg)
    shared.load_weights(weights)
    copied = SmallVLA(cfg)
    copied.load_weights(weights)
    params = dict(shared.model.named_parameters())
    assert all(np.shares_memory(params[k].detach().numpy(), v) for k, v in weights.items() if k in params)
    rng = np.random.default_rng(0)
    obs = (rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8), rng.random((3, 3), dtype=np.float32),
           ["push the red block onto the green pad"] * 3)
    np.testing.assert_array_equal(shared.act(*obs, seed=1), VLAPolicy(model=copied).act(*obs, seed=1))

    name = "head.out.bias"
    shared.load_weights({name: weights[name] + 1.0})  # a delta: that array changes, and nothing else
    after = shared.get_weights()
    np.testing.assert_array_equal(after[name], weights[name] + 1.0)
    assert all(np.array_equal(after[k], np.asarray(v).reshape(after[k].shape)) for k, v in weights.items()
               if k != name)
    with pytest.raises(KeyError, match="does not have"):
        shared.load_weights({"no.such.weight": weights[name]})


def test_a_person_standing_by_takes_over_practice_and_the_steps_are_marked():
    """rollout.corrections: the scripted expert, standing in for a person, takes over practice episodes still
    running at the first chunk boundary past ``after`` steps and finishes them; the steps it acted are marked, the
    policy's chunks stop there, and an evaluation is never corrected."""
    from actors.rollout import RolloutWorker, run_episodes
    from flywheel.contracts import INTERVENTION
    from flywheel.vla.checkpoint import load_policy_checkpoint

    cfg, weights, _ = load_policy_checkpoint("base")
    env = {"max_steps": 40, "execute": 4}
    seeds = list(range(100, 116))
    policy = VLAPolicy(cfg)
    policy.load_weights(weights)
    alone = run_episodes(seeds, "train", policy, policy_version=1, sample_seed=3, **env)
    helped = run_episodes(seeds, "train", policy, policy_version=1, sample_seed=3,
                          people={"corrections": 1.0, "after": 6}, **env)
    taken_over = [ep for ep in helped if ep.intervened().any()]
    assert len(taken_over) == sum(ep.num_steps > 8 for ep in helped) > 0  # all still running at step 8
    for ep in taken_over:
        mask = ep.intervened()
        assert not mask[:8].any() and mask[8:].all() and ep.info["interventions"] == ep.num_steps - 8
        assert ep.extras["chunk_steps"].tolist() == [0, 4] and len(ep.extras["chunks"]) == 2
    success = lambda eps: np.mean([ep.ground_truth["success"] for ep in eps])  # noqa: E731
    assert success(helped) > success(alone)  # the expert finishes what the policy would not have
    half = run_episodes(seeds, "train", policy, policy_version=1, sample_seed=3,
                        people={"corrections": 0.5, "after": 6}, **env)
    assert 0 < sum(INTERVENTION in ep.extras for ep in half) < len(seeds)
    # the loop's metrics: true success counts what the person finished; the unaided rate is the policy's own
    from flywheel.loop import true_success

    rates = true_success(half)
    assert rates["train/true_success"] == success(half)
    assert rates["train/true_success_unaided"] == success([ep for ep in half if INTERVENTION not in ep.extras])

    worker = RolloutWorker(functools.partial(VLAPolicy, cfg), {**env, "people": {"corrections": 1.0, "after": 6}})
    worker.set_weights(PolicySnapshot(1, weights))
    assert not any(ep.intervened().any() for ep in worker.collect(seeds[:4], "eval"))
    assert not any(ep.intervened().any() for ep in worker.collect(seeds[:4], "train", corrected=False))
    assert all(ep.intervened().any() for ep in worker.collect(seeds[:4], "train") if ep.num_steps > 8)


def test_actors_go_on_practising_until_new_weights_and_every_round_comes_back(ray_local):
    """collect_async(more=): actors done with their share take rounds beyond it, with the weights the collection
    started with, until the next publish; every round started comes back, and one on an actor that dies is lost
    whole, recorded, and stops that actor's rounds."""
    import time

    import ray

    from flywheel.collect import MorePractice

    group = RolloutGroup(functools.partial(VLAPolicy, VLAConfig()), ENV, num_workers=2, cpus_per_worker=0.5)
    try:
        group.publish(_snapshot(1, 1.0))
        more = MorePractice(lambda i: 1000 + i, first=4, group_size=2, limit=200, round_layouts=2)
        pending = group.collect_async([1000, 1000, 1001, 1001, 1002, 1002, 1003, 1003], "train", more=more)
        deadline = time.time() + 60
        while more.drawn < 8 and time.time() < deadline:  # the learner trains meanwhile
            time.sleep(0.05)
        group.publish(_snapshot(2, 1.0))
        drawn = more.drawn
        episodes = pending()
        assert 8 <= drawn < 200 and more.drawn == drawn  # none started after the new weights
        seeds = sorted(ep.seed for ep in episodes)  # every layout handed out came back, twice (group_size 2)
        assert seeds == sorted(2 * list(range(1000, 1004 + drawn)))
        assert {ep.policy_version for ep in episodes} == {1} and not group.faults

        more = MorePractice(lambda i: 5000 + i, first=2, group_size=1, limit=200, round_layouts=2)
        pending = group.collect_async([5000, 5001], "train", more=more)
        while more.drawn < 6 and time.time() < deadline + 60:
            time.sleep(0.05)
        ray.kill(group.workers[0], no_restart=True)  # mid-round, or between two
        time.sleep(0.5)
        group.publish(_snapshot(3, 1.0))
        episodes = pending()
        lost = [f for f in group.faults if "left out a round" in f.get("action", "")]
        assert len(lost) == 1 and lost[0]["worker"] == 0 and group.restarts == 1  # one round, then no more for it
        got = [ep.seed for ep in episodes]
        assert len(got) == len(set(got)) == 2 + more.drawn - 2 and set(got) <= set(range(5000, 5002 + more.drawn))
        assert group.collect([7000, 7001], "train") and group.applied_versions()[0][-1] == 3  # replaced: newest
    finally:
        group.close()


def test_the_robust_split_runs_the_same_seeds_in_held_out_randomised_scenes():
    """The robustness split (eval.robust): split "robust" swaps the held-out randomisation in for the practice
    scenes' own; its episodes are evaluation episodes, and each says how its scene was drawn."""
    from actors.rollout import RolloutWorker

    held_out = {"colour": 0.15, "lighting": 0.3, "camera": 0.05, "size": 0.2, "friction": 0.3}
    practice = {"colour": 0.5, "lighting": 0.5}  # env.randomize: practice only, never in an evaluation
    worker = RolloutWorker(functools.partial(VLAPolicy, VLAConfig()),
                           {**ENV, "randomize": practice, "held_out_randomize": held_out})
    worker.set_weights(_snapshot(1, 1.0))
    nominal, robust, train = (worker.collect([3, 4, 5], split) for split in ("eval", "robust", "train"))
    shift = lambda eps: max(abs(x) for ep in eps for rgb in ep.info["randomization"]["palette_shift"].values()  # noqa: E731
                            for x in rgb)
    assert shift(train) > 0.15 * 255 >= shift(robust) and shift(nominal) == 0  # practice's own amplitudes
    assert [ep.split for ep in robust] == ["eval"] * 3 and [ep.seed for ep in robust] == [3, 4, 5]
    assert all(ep.info["randomization"]["brightness"] == 1.0 for ep in nominal)
    drawn = [ep.info["randomization"] for ep in robust]
    assert all(abs(d["brightness"] - 1) <= 0.3 and d["brightness"] != 1.0 and d["slip"] > 0 for d in drawn)
    assert not any(np.array_equal(a.observations["image"][0], b.observations["image"][0])
                   for a, b in zip(nominal, robust))
    assert worker.collect([3, 4, 5], "robust")[0].info["randomization"] == drawn[0]  # the same scene again
    plain = RolloutWorker(functools.partial(VLAPolicy, VLAConfig()), ENV)
    plain.set_weights(_snapshot(1, 1.0))
    with pytest.raises(ValueError, match="held_out_randomize"):
        plain.collect([3], "robust")
