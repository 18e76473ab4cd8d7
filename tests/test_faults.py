"""Faults in the rollout actors, injected for real: an environment that raises, one that hangs, and an actor process
killed with SIGKILL mid-episode. The group replaces what failed and loses only the episodes in flight."""

import functools
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle

from actors.ray_actors import RolloutError, RolloutGroup
from actors.tabletop import TabletopEnv
from flywheel.contracts import PolicySnapshot
from flywheel.vla.model import VLAConfig, VLAPolicy

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the drill environment travels to the actors

FAULT_SEED = 13
SEEDS = list(range(10, 18))


class Drill(TabletopEnv):
    """The tabletop, failing on cue: at step 3 of seed FAULT_SEED it raises, hangs or kills its own process; with a
    ``marker`` file, only the first time (the marker records that it happened)."""

    def __init__(self, fault: str, marker: str | None, **kwargs):
        super().__init__(**kwargs)
        self.fault, self.marker, self.steps, self.seed_now = fault, marker, 0, None

    def reset(self, *, seed=None, options=None):
        self.seed_now, self.steps = seed, 0
        return super().reset(seed=seed, options=options)

    def step(self, action):
        self.steps += 1
        if self.seed_now == FAULT_SEED and self.steps == 3 and not (self.marker and Path(self.marker).exists()):
            if self.marker:
                Path(self.marker).touch()
            if self.fault == "raise":
                raise RuntimeError("the simulator crashed")
            if self.fault == "hang":
                time.sleep(3600)
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
        return super().step(action)


def drill_env(fault, marker, family="any", **kwargs):
    return Drill(fault, marker, family=family, **{k: v for k, v in kwargs.items() if k not in ("randomize", "name")})


def _group(fault, marker=None, use_ray=True, timeout=600.0):
    env = {"max_steps": 12, "make_env": functools.partial(drill_env, fault, str(marker) if marker else None)}
    group = RolloutGroup(functools.partial(VLAPolicy, VLAConfig()), env, num_workers=2, use_ray=use_ray,
                         cpus_per_worker=0.5, call_timeout_s=timeout)
    group.publish(PolicySnapshot(1, VLAPolicy().get_weights()))
    return group


def test_an_environment_that_raises_costs_only_its_own_episode():
    group = _group("raise", use_ray=False)
    episodes = group.collect(SEEDS, "train")
    assert [ep.seed for ep in episodes] == [s for s in SEEDS if s != FAULT_SEED]
    (fault,) = group.faults
    assert fault["seed"] == FAULT_SEED and fault["step"] < 3 and "simulator crashed" in fault["error"]
    assert fault["action"] == "episode discarded"


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_an_actor_killed_or_hung_is_replaced_and_its_share_run_again(fault, ray_local, tmp_path):
    group = _group(fault, tmp_path / "happened", timeout=8.0)
    try:
        before = ray_local.get(group.workers[0].pid.remote())
        episodes = group.collect(SEEDS, "train")
        assert sorted(ep.seed for ep in episodes) == SEEDS  # every seed once: the lost share was run again
        assert (tmp_path / "happened").exists() and group.restarts == 1
        (replaced,) = group.faults
        assert replaced["worker"] == 0 and replaced["action"] == "replaced"  # seeds 10-13 were its share
        assert ("RayActorError" in replaced["error"] or "ActorDied" in replaced["error"]) if fault == "kill" else \
            "TimeoutError" in replaced["error"]
        assert ray_local.get(group.workers[0].pid.remote()) != before  # a new process
        assert group.publish(PolicySnapshot(2, VLAPolicy().get_weights())) == [2, 2]  # and it keeps up
    finally:
        group.close()


def test_a_share_that_fails_twice_is_left_out_of_practice_and_stops_an_evaluation(ray_local):
    group = _group("kill")  # no marker: it dies every time
    try:
        episodes = group.collect(SEEDS, "train")
        assert sorted(ep.seed for ep in episodes) == SEEDS[4:]  # worker 0's share (13 among it) is left out
        assert [f["action"] for f in group.faults] == ["replaced", "replaced", "left out 4 seeds"]
        with pytest.raises(RolloutError, match="rollout worker 0 failed twice"):
            group.collect(SEEDS, "eval")
        with pytest.raises(RolloutError, match="every rollout worker failed twice"):  # nothing left to practise on
            group.collect([FAULT_SEED, FAULT_SEED], "train")
    finally:
        group.close()


def test_a_learner_that_diverges_is_restored_from_its_checkpoint_and_the_run_goes_on(tmp_path, monkeypatch,
                                                                                     tiny_detector):
    import numpy as np
    import torch

    from flywheel.checkpoint import load_weights
    from flywheel.config import load_config
    from flywheel.run import run
    from flywheel import plugins
    from learner.filtered_bc import FilteredBCLearner

    class Diverging(FilteredBCLearner):
        """Its second update leaves NaN in the weights, as a blown-up gradient would."""

        calls = 0

        def update(self, episodes):
            stats = super().update(episodes)
            Diverging.calls += 1
            if Diverging.calls == 2:
                with torch.no_grad():
                    next(self.model.head.parameters()).fill_(float("nan"))
            return stats

    monkeypatch.setitem(plugins.REGISTRY["learner"], "diverging", Diverging)
    cfg = load_config("run", ["experiment=tiny", "rollout.use_ray=false", "wandb.mode=disabled",
                              f"run_dir={tmp_path}", "budget.iterations=3", "learner.algorithm=diverging",
                              "gate.episodes=0",  # no gate: which version is deployed depends on the update alone
                              # the NaN is written after the update: a moving average taken during it would not
                              # carry it into the snapshot (a real blow-up inside the steps reaches the average too)
                              "learner.ema=0", tiny_detector])
    summary = run(cfg, say=lambda m: None)
    assert summary["status"] == "completed" and summary["iterations"] == 3
    (recovery,) = summary["learner_recoveries"]
    assert recovery["iteration"] == 2 and recovery["restored"] == 1 and "NaN/inf" in recovery["error"]
    assert summary["policy_version_final"] == 2  # v1, the lost update, then one more
    weights, _ = load_weights(tmp_path / "checkpoints" / "policy-000002.safetensors")
    assert all(np.isfinite(v).all() for v in weights.values() if v.dtype.kind == "f")


def test_a_worker_killed_for_memory_is_replaced_and_twice_says_what_to_change(monkeypatch):
    """Ray's memory monitor kills an actor with an OutOfMemoryError (not an actor error): a fault like a kill, the
    worker replaced and its share run again; twice in an evaluation, the error says how to need less memory."""
    import ray

    from actors import ray_actors

    oom = ray.exceptions.OutOfMemoryError("1 worker(s) were killed due to the node running low on memory")

    def get(ref, **kwargs):
        raise oom

    monkeypatch.setattr(ray, "get", get)
    assert ray_actors._fetch(object()) is oom  # returned as the call's failure, as a dead actor's is
    group = _group("raise", use_ray=False)
    replaced = []
    monkeypatch.setattr(group, "_call", lambda method, calls, refs=None, fetched=None: [oom for _ in calls])
    monkeypatch.setattr(group, "_replace", lambda i, why: replaced.append((i, why)))
    with pytest.raises(RolloutError, match="killed it for memory.*rollout.num_workers.*eval.episodes"):
        group._checked("collect_with_faults", [(SEEDS[:4], "eval")], leave_out=False)
    assert [i for i, _ in replaced] == [0, 0] and "OutOfMemoryError" in replaced[0][1]
