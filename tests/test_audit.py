"""The audit in the loop (flywheel/audit.py, flywheel/loop.py): a detector corrupted on purpose is caught, the
alarm pauses updates, a retrained detector relabels, and a policy that regressed is rolled back."""

import dataclasses
import functools
import time

import numpy as np
import torch

from actors.ray_actors import RolloutGroup
from actors.tabletop import split_seed
from flywheel.checkpoint import CheckpointDir
from flywheel.audit import AuditSettings
from flywheel.evaluation import evaluate
from flywheel.gate import GateSettings
from flywheel.loop import LoopParts, LoopSettings, run_loop
from flywheel.state import Budget, LoopState
from flywheel.metrics import MetricsSink
from flywheel.store import EpisodeStore
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import SmallVLA, VLAPolicy
from learner.filtered_bc import FilteredBCLearner


def truth_scores(episodes, corrupt: bool = False) -> np.ndarray:
    """The simulator's verdicts as a detector's scores, or, ``corrupt``, with every failed push also called a success:
    a class of near misses a detector has learned to accept, the one corruption the audit is to find."""
    return np.array([float(ep.ground_truth["success"] or (corrupt and ep.task == "push")) for ep in episodes],
                    np.float32)


class Oracle:
    """A detector that is always right (the simulator's verdict), or, ``corrupt``, one that also accepts every
    failed push (``truth_scores``)."""

    def __init__(self, version: str, corrupt: bool = False):
        self.version, self.threshold, self.corrupt = version, 0.5, corrupt

    def score(self, episodes):
        return truth_scores(episodes, self.corrupt)


class Recording(FilteredBCLearner):
    """Filtered BC that remembers the labels of every episode it was given."""

    seen: list

    def update(self, episodes):
        self.seen = getattr(self, "seen", []) + [(ep.id, ep.latest_label("detector").success) for ep in episodes]
        return super().update(episodes)


def _loop(tmp_path, detector, learner_cls=Recording, iterations=2, retrain=None, eval_every=1, retrain_every=0,
          sample=48, env_kwargs=None, **loop_kwargs):
    cfg, weights, _ = load_policy_checkpoint("base")
    model = SmallVLA(cfg)
    model.load_weights(weights)
    torch.manual_seed(0)
    learner = learner_cls(model, [], steps_per_update=5, batch_size=16, lr=1e-4)
    rollouts = RolloutGroup(functools.partial(VLAPolicy, cfg), env_kwargs or {}, num_workers=1, use_ray=False)
    rollouts.publish(learner.snapshot())
    store = EpisodeStore(tmp_path / "episodes")
    state = run_loop(
        LoopParts(rollouts, store, detector, learner, MetricsSink(tmp_path, {}, mode="disabled"),
                  CheckpointDir(tmp_path / "ckpt", keep=2)),
        LoopSettings(train_seed=lambda i: split_seed("train", 5_000_000 + i),  # layouts the policy never saw
                     eval_seeds=[split_seed("eval", i) for i in range(48)], episodes_per_iteration=48,
                     eval_every=eval_every, group_size=2,
                     audit=AuditSettings(sample=sample, bound=0.15, retrain=retrain, retrain_every=retrain_every),
                     **loop_kwargs),
        LoopState(), Budget(time.time() + 600, max_iterations=iterations))
    return state, learner, store


def test_a_corrupted_detector_is_caught_retrained_and_never_taught_to_the_policy(tmp_path):
    state, learner, store = _loop(tmp_path, Oracle("corrupt", corrupt=True), retrain=lambda: Oracle("detector-2"))
    first, second = state.audits
    assert first.alarm and first.detector == "corrupt" and first.gap > 0.15 and first.precision < 0.8
    assert not second.alarm and second.detector == "detector-2" and second.gap == 0.0
    assert state.alarms == 1 and state.detector_versions == ["corrupt", "detector-2"] and state.paused_updates == 0
    # The learner only ever saw the retrained detector's labels, which are the truth.
    truth = {ep.id: bool(ep.ground_truth["success"]) for ep in store.iter(with_ground_truth=True)}
    assert len(learner.seen) == 96 and all(truth[i] == judged for i, judged in learner.seen)
    # Nothing was rewritten: the corrupt labels are still on record next to the new ones and the audit's.
    first_batch = [ep for ep in store.iter() if ep.policy_version == 0]
    assert all([lab.version for lab in ep.labels if lab.source == "detector"] == ["corrupt", "detector-2"]
               for ep in first_batch)
    assert sum(any(lab.version == "audit" for lab in ep.labels) for ep in first_batch) == 48


def test_without_a_retrain_the_alarm_pauses_updates(tmp_path):
    state, learner, _ = _loop(tmp_path, Oracle("corrupt", corrupt=True), iterations=2)
    assert state.alarms == 2 and state.paused_updates == 2
    assert learner.version == 0 and not getattr(learner, "seen", [])
    assert [e.version for e in state.evaluations] == [0]  # no new version was made, so none was evaluated


def _gate(n: int = 48) -> GateSettings:
    return GateSettings([split_seed("eval", 1_000_000 + i) for i in range(n)], audit=n, bound=0.15)


def test_judged_by_the_detector_the_gate_holds_back_what_its_audit_does_not_confirm(tmp_path):
    """On a robot the gate scores by the detector. This one also accepts every failed push, and the loop's own audit
    is off, so practice trusts it: the candidate looks no worse by its verdicts, but the gate's audit of them (the
    simulator standing in for a person) finds the gap, and the run rolls back."""
    state, learner, _ = _loop(tmp_path, Oracle("corrupt", corrupt=True), iterations=1, sample=0, gate=_gate(),
                              eval_judge="detector")
    (decision,) = state.gates
    assert decision.judged_by == "corrupt" and decision.upper >= 0  # by the detector's verdicts, no worse
    assert decision.audit["alarm"] and decision.audit["gap"] > 0.15 and decision.audit["n"] == 48
    assert not decision.promoted and state.rollbacks[0]["reason"] == "gate"
    assert [e.judged_by for e in state.evaluations] == ["corrupt", "corrupt"]


def test_a_retrained_detector_judges_the_deployed_version_again_before_the_next_gate(tmp_path):
    """The loop's audit replaces the corrupt detector; the deployed version's gate outcomes, judged by the corrupt
    one, are judged again by the new one, so that the candidate is compared by one detector, and passes its audit."""
    state, _, _ = _loop(tmp_path, Oracle("corrupt", corrupt=True), iterations=1, retrain=lambda: Oracle("detector-2"),
                        gate=_gate(), eval_judge="detector")
    assert state.alarms == 1 and state.detector_versions == ["corrupt", "detector-2"]
    (decision,) = state.gates
    assert decision.judged_by == "detector-2" and state.deployed_judged_by == "detector-2"
    assert decision.audit == {**decision.audit, "gap": 0.0, "alarm": False}
    # both sides judged by the truth (detector-2 is the oracle): the deployed rate is the simulator's
    truth = evaluate(_base_rollouts(), _gate().seeds, 0, sample_seed=_gate().sample_seed)
    assert decision.deployed_success == truth.success and decision.deployed_success < 0.9


def _unjudged_env(**kwargs):
    """The tabletop as a robot sees it: no success in ``info`` (nor privileged state)."""
    import gymnasium as gym

    from actors.tabletop import make_env

    class Robot(gym.Wrapper):
        def reset(self, **kw):
            obs, info = self.env.reset(**kw)
            return obs, {k: v for k, v in info.items() if k != "success"}

        def step(self, action):
            obs, reward, term, trunc, info = self.env.step(action)
            return obs, reward, term, trunc, {k: v for k, v in info.items() if k != "success"}

    return Robot(make_env(**{k: v for k, v in kwargs.items() if k != "name"}))


def test_an_environment_that_cannot_judge_itself_is_evaluated_by_the_detector_or_refused():
    import pytest

    from flywheel.config import ConfigError

    robot = _base_rollouts({"make_env": _unjudged_env})
    seeds = [split_seed("eval", i) for i in range(8)]
    with pytest.raises(ConfigError, match=r"8 of 8 held-out episodes came back without a ground-truth.*eval.judge=det"):
        evaluate(robot, seeds, 0)
    judged = evaluate(robot, seeds, 0, detector=Approves())
    assert judged.judged_by == "approves-all" and judged.success == 1.0 and judged.outcomes == (1,) * 8


class Approves:
    version, threshold = "approves-all", 0.5

    def score(self, episodes):
        assert all(ep.ground_truth is None for ep in episodes)  # nothing to read but what a robot records
        return np.ones(len(episodes), np.float32)


def _base_rollouts(env_kwargs=None) -> RolloutGroup:
    """In-process rollouts of the shipped base, as version 0."""
    cfg, weights, _ = load_policy_checkpoint("base")
    model = SmallVLA(cfg)
    model.load_weights(weights)
    rollouts = RolloutGroup(functools.partial(VLAPolicy, cfg), env_kwargs or {}, num_workers=1, use_ray=False)
    rollouts.publish(FilteredBCLearner(model, [], steps_per_update=1, batch_size=4, lr=1e-4).snapshot())
    return rollouts


class Sabotaged(Recording):
    """Its first update wrecks the action expert (a policy that learned something disastrous)."""

    def update(self, episodes):
        stats = super().update(episodes)
        if self.version == 1:
            with torch.no_grad():
                for p in self.model.head.parameters():
                    p.mul_(-3.0)
        return stats


class HonestThenCorrupt(Oracle):
    def __init__(self):
        super().__init__("flaky")
        self.calls = 0

    def score(self, episodes):
        self.calls += 1
        self.corrupt = self.calls > 1
        return super().score(episodes)


def test_after_an_alarm_a_regressed_policy_is_rolled_back(tmp_path):
    state, learner, _ = _loop(tmp_path, HonestThenCorrupt(), learner_cls=Sabotaged, iterations=2,
                              retrain=lambda: Oracle("detector-2"))
    v0, v1 = state.evaluations[0], state.evaluations[1]
    assert v1.version == 1 and v1.ci95[1] < v0.success  # the sabotaged update regressed
    assert state.alarms == 1 and state.rollbacks == [
        {"iteration": 2, "from_version": 1, "to_weights_of": 0, "new_version": 2, "reason": "audit"}]
    final = state.evaluations[-1]
    assert final.version == 3 and final.success >= v0.ci95[0]  # restored, then one honest update on top


class Noisy(Oracle):
    """Right more often than not, but with no better than a coin's confidence ordering within each class."""

    def score(self, episodes):
        rng = np.random.default_rng(len(episodes))
        truth = np.array([float(ep.ground_truth["success"]) for ep in episodes])
        return np.clip(0.35 + 0.3 * truth + rng.uniform(-0.3, 0.3, len(truth)), 0, 1).astype(np.float32)


def test_periodic_retraining_promotes_a_candidate_only_if_it_judges_the_newest_audit_no_worse(tmp_path):
    excluded = []

    def retrain(exclude=()):
        excluded.append(set(exclude))
        return Oracle(f"detector-{len(excluded) + 1}") if len(excluded) == 1 else Noisy(f"detector-{len(excluded) + 1}")

    state, _, store = _loop(tmp_path, Noisy("detector-1"), iterations=2, retrain=retrain, retrain_every=1)
    first, second = state.promotions
    assert first["promoted"] and first["candidate_auroc"] == 1.0 > first["current_auroc"]
    assert not second["promoted"] and second["candidate_auroc"] < second["current_auroc"] == 1.0
    assert state.detector_versions == ["detector-1", "detector-2"]  # the oracle kept, the worse one refused
    # each candidate trained without the audit it was judged on
    audited = [{ep.id for ep in store.iter() if ep.policy_version == v and any(lab.version == "audit" for lab in
                                                                             ep.labels)} for v in (0, 1)]
    assert excluded == audited and all(len(ids) == 48 for ids in audited)


def _scored_by_truth(detector, corrupt=False):
    """The detector the run trained, its verdicts replaced by ``truth_scores``: what the whole-run test checks is the
    run's wiring, so the verdicts must not depend on how well a short training went on this machine
    (tests/test_detector.py tests that)."""
    detector.score = lambda episodes, instructions=None: truth_scores(episodes, corrupt)
    return detector


def test_a_whole_run_catches_a_corrupted_detector_and_recovers(tmp_path, monkeypatch):
    """`flywheel run` end to end, its first detector corrupted: the first audit rings the alarm, the detector is
    retrained on the labels the audit bought, relabels what was judged wrongly, and from then on the labels the learner
    gets are the truth; the summary's audit block records it all.

    Both detectors are trained by the run's own code (one step each: the wiring is under test here), and their
    verdicts are replaced: the first's by the corruption, the retrained one's by the simulator's truth. An honest
    detector trained briefly on this tiny data judged failed pushes right only about half the time, differently from
    machine to machine, which made a test of the wiring a test of the machine."""
    import json

    import flywheel.run as run_module
    import reward.pipeline as pipeline
    from flywheel.config import load_config
    from flywheel.checkpoint import load_weights

    trained = []
    real = pipeline.train_detector

    def corrupt_the_first(*args, **kwargs):
        detector, metrics = real(*args, **{**kwargs, "training": dataclasses.replace(kwargs["training"], steps=1)})
        trained.append(detector.version)
        return _scored_by_truth(detector, corrupt=len(trained) == 1), metrics

    monkeypatch.setattr(pipeline, "train_detector", corrupt_the_first)
    run_dir = tmp_path / "run"
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "rollout.use_ray=false", "audit.bound=0.15",
                              "rollout.episodes_per_iteration=64", "audit.sample=64", "budget.iterations=4",
                              "gate.episodes=0",  # the gate is not under test (tests/test_resume.py tests it)
                              "wandb.mode=disabled"])
    run_module.run(cfg, say=lambda m: None)
    audit = json.loads((run_dir / "summary.json").read_text())["audit"]
    rang = [a for a in audit["per_iteration"] if a["alarm"]]
    assert rang and rang[0]["detector"] == "detector-1" and rang[0]["gap"] > 0.15, json.dumps(audit)
    assert audit["detector_versions"][:2] == ["detector-1", "detector-2"] == trained[:2]
    after = audit["per_iteration"][audit["per_iteration"].index(rang[0]) + 1:]
    assert after and all(a["detector"] == "detector-2" and not a["alarm"] and a["gap"] == 0.0 for a in after), \
        json.dumps(audit)  # recovered
    from flywheel.store import EpisodeStore

    alarmed, exploited, relabelled, audited = rang[0]["policy_version"], {"before": [], "after": []}, [], set()
    for ep in EpisodeStore(run_dir / "episodes").iter(with_ground_truth=True):
        if ep.policy_version == alarmed and any(lab.version == "audit" for lab in ep.labels):
            audited.add(ep.id)
        if ep.task != "push" or ep.ground_truth["success"] or ep.policy_version < 0:
            continue
        verdicts = [(lab.version, lab.success) for lab in ep.labels if lab.source == "detector"]
        if not verdicts:  # the detector's own training data
            continue
        # The learner trains on the newest verdict; the corrupt ones stay on record, never rewritten.
        exploited["after" if ep.policy_version > alarmed else "before"].append(verdicts[-1][1])
        if verdicts[0][0] == "detector-1" and ep.policy_version == alarmed:  # the iteration the alarm rang on
            relabelled.append(verdicts)
    # (updates may pause after the alarm: episodes of that version collected later are judged by detector-2 alone)
    assert relabelled and all(v[0] == ("detector-1", True) and v[-1] == ("detector-2", False) for v in relabelled)
    assert exploited["after"] and not any(exploited["after"]), exploited
    # The retrain learned from the labels the alarm's audit bought: every one of them is in its data.
    _, meta = load_weights(run_dir / "detector" / "detector-2.safetensors")
    used = {i for ids in meta["episodes"].values() for i in ids}
    assert len(audited) == 64 and audited <= used, (len(audited), len(audited - used))


def test_a_whole_run_judged_by_its_detector_says_so_and_audits_its_gate(tmp_path, monkeypatch):
    """`flywheel run eval.judge=detector` (how a robot runs), wired end to end: the evaluations and the gate score by
    the run's detector, the gate's verdicts are audited, and the summary and report say who judged. The detector
    is trained by the run's code (one step) with the simulator's verdicts as its scores, so the figures are known."""
    import json

    import flywheel.run as run_module
    import reward.pipeline as pipeline
    from flywheel.config import load_config
    from flywheel.report import write_report

    real = pipeline.train_detector
    monkeypatch.setattr(pipeline, "train_detector", lambda *a, **kw: (
        lambda made: (_scored_by_truth(made[0]), made[1]))(real(*a, **{**kw, "training": dataclasses.replace(kw["training"], steps=1)})))
    run_dir = tmp_path / "run"
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "rollout.use_ray=false", "eval.judge=detector",
                              "budget.iterations=1", "wandb.mode=disabled"])
    summary = run_module.run(cfg, say=lambda m: None)
    assert [e["judged_by"] for e in summary["evaluations"]] == ["detector-1", "detector-1"]
    (decision,) = summary["gate"]["decisions"]
    assert summary["gate"]["judge"] == "detector" and decision["judged_by"] == "detector-1"
    assert decision["audit"] == {**decision["audit"], "n": 32, "gap": 0.0, "alarm": False} and decision["promoted"]
    page = write_report(run_dir).read_text()
    assert "judged by detector" in page and json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
