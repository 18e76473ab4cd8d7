"""The loop end to end, through the same entry point as `flywheel run`, on small numbers."""

import json
import re

import numpy as np
import pytest

from bench.common import our_processes
from flywheel.config import load_config
from flywheel.parts import loop_seed_index
from flywheel.run import eval_noise_note, run
from flywheel.store import EpisodeStore


def _kill_an_actor_after_the_first_iteration(run_dir, stop):
    """SIGKILL one of this test's rollout actors once the run has finished an iteration, then its learner actor in
    the middle of the next update it makes (its process is titled ray::_LearnerHost.update while it does)."""
    import os
    import signal

    while not stop.wait(0.05):
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and '"iteration": 1' in metrics.read_text():
            for pid in list(our_processes(b"ray::RolloutWorker"))[:1]:
                os.kill(pid, signal.SIGKILL)
            break
    while not stop.wait(0.01):
        for pid in our_processes(b"ray::_LearnerHost.update"):
            os.kill(pid, signal.SIGKILL)
            return


def test_tiny_run_end_to_end(tmp_path):
    """The whole loop with Ray actors, the learner in one of its own. After the first iteration a rollout actor and
    the learner are killed with SIGKILL: the run replaces the one, restarts the other from the deployed checkpoint
    (its next update made again), and completes with every episode it should have."""
    import threading

    run_dir = tmp_path / "run"
    # No gate here (tests/test_faults.py runs it): a rollback's extra version would shift every version below.
    # Evaluated on 16 seeds (the preset's 64 are figures no assertion reads): the four evaluations are counted.
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "placement.remote=true", "gate.episodes=0",
                              "eval.episodes=16"])
    stop = threading.Event()
    killer = threading.Thread(target=_kill_an_actor_after_the_first_iteration, args=(run_dir, stop), daemon=True)
    killer.start()
    try:
        summary = run(cfg, say=lambda m: None)
    finally:
        stop.set()
        killer.join()
    assert summary["faults"]["restarts"] == 1 and summary["faults"]["events"][0]["action"] == "replaced"
    assert summary["learner"]["device"] == "cpu" and summary["faults"]["learner_restarts"] == 1
    lost, again = summary["faults"]["learner_events"][0], summary["learner_recoveries"]
    assert lost["action"] == "restarted" and lost["error"].startswith("update") and len(again) == 1
    # killed in the update of iteration 2 (or 3): restored to the version deployed then, the update made again
    assert again[0]["action"] == "update made again" and lost["restored"] == again[0]["iteration"] - 1 >= 1

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "completed"
    for key in ("wall_seconds", "episodes", "env_steps", "policy_version_final", "initial_success", "final_success",
                "eval_episodes", "detector"):
        assert key in on_disk, key
    assert set(on_disk["detector"]) >= {"version", "precision", "recall", "auroc"}
    assert summary["policy_version_final"] == 3 and summary["iterations"] == 3, json.dumps({k: summary[k] for k in ("gate", "learner_recoveries", "faults", "rollbacks")})
    assert summary["eval_episodes"] == 16 and len(summary["evaluations"]) == 4  # before + after every iteration
    assert [e["version"] for e in summary["evaluations"]] == [0, 1, 2, 3]
    audits = on_disk["audit"]["per_iteration"]  # every iteration's labels checked against the simulator
    assert on_disk["audit"]["bound"] == 1.0  # the config's (experiment=tiny), not the default
    assert len(audits) == 3 and on_disk["audit"]["alarms"] == 0 and [a["policy_version"] for a in audits] == [0, 1, 2]
    assert all(a["n"] == 32 and abs(a["claimed"] - a["audited"] - a["gap"]) < 1e-9 for a in audits)

    # every collected episode is stored with its lineage and a detector label
    store = EpisodeStore(run_dir / "episodes")
    loop_eps = [ep for ep in store.iter(with_ground_truth=True) if ep.policy_version >= 0 and
                ep.latest_label("detector") is not None]
    assert len(loop_eps) == summary["episodes"] == 3 * 32
    assert sorted({ep.policy_version for ep in loop_eps}) == [0, 1, 2]
    assert len({ep.seed for ep in loop_eps}) == len(loop_eps) // 2  # two attempts per layout, no layout reused across iterations
    checked = store.verify()  # what `flywheel store verify` prints: the killed actor's episode in flight is not there
    assert checked["ok"] and checked["unique_ids"] == checked["episodes"] and not checked["unreadable"]

    # checkpoints, metrics and the resolved config are in the run
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.safetensors"))[-1] == "policy-000003.safetensors"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("time/update" in r for r in rows) and any("detector/auroc" in r for r in rows)
    assert (run_dir / "config.yaml").exists() and (run_dir / "detector" / "detector-1.safetensors").exists()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    clips = sorted(p.name for p in (run_dir / "media").glob("*.gif"))  # practice clips, also logged to wandb
    assert clips and all(re.match(r"v\d+-judged-(success|failure)-step\d{5}\.gif$", c) for c in clips)


def test_a_failed_run_says_so_in_its_summary(tmp_path):
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path}", f"policy.checkpoint={tmp_path}/missing.safetensors",
                              "rollout.use_ray=false"])
    with pytest.raises(Exception, match="does not exist"):
        run(cfg, say=lambda m: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "does not exist" in summary["error"]


@pytest.mark.slow
def test_smoke_preset_improves_the_policy(tmp_path):
    """The issue's acceptance check: the smoke preset, from the shipped base, within its budget."""
    cfg = load_config("run", ["experiment=smoke", f"run_dir={tmp_path}"])
    summary = run(cfg, say=print)
    assert summary["status"] == "completed"  # stopped by its own budget (no timing is asserted: machines differ)
    assert summary["policy_version_final"] >= 3 and summary["eval_episodes"] >= 500
    assert summary["detector"]["auroc"] >= 0.9
    assert summary["final_success"] >= summary["initial_success"] + 0.10, summary["evaluations"]
    assert np.isfinite(summary["final_success"])


def test_a_directory_holding_a_run_is_refused_untouched(tmp_path):
    from flywheel.run import RunDirError

    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path}", "rollout.use_ray=false"])
    with pytest.raises(RunDirError, match="Choose a new run_dir"):
        run(cfg, say=lambda m: None)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed"}


def test_a_run_that_failed_before_storing_anything_can_be_retried_in_place(tmp_path):
    from flywheel.checkpoint import CheckpointError

    cfg = load_config("run", ["experiment=tiny", f"run_dir={tmp_path}", "rollout.use_ray=false",
                              f"policy.checkpoint={tmp_path / 'missing.safetensors'}"])
    for _ in range(2):  # the second attempt gets the same clear error, not "already holds a run"
        with pytest.raises(CheckpointError, match="does not exist"):
            run(cfg, say=lambda m: None)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_learner_replays_the_bases_own_demonstrations_not_the_runs_task():
    # A run on held-out combinations must not give the learner expert demonstrations of them: measured, those 100
    # demos alone lifted held-out success 0.196 -> 0.454, while practice with the base's own demos gave 0.204.
    from flywheel.parts import pretraining_demos

    env = {"family": "any", "combos": "heldout", "phrasing": "canonical", "image_size": 64, "max_steps": 40}
    trained_on_train_combos = {"config": {"env": {"family": "any", "combos": "train", "phrasing": "canonical"}}}
    demos = pretraining_demos(12, trained_on_train_combos, env)
    assert len(demos) == 12 and not any(ep.info["combo_heldout"] for ep in demos)
    assert all(ep.info["combo_heldout"] for ep in pretraining_demos(6, {}, env))  # no record: the run's settings


def test_the_learner_sees_only_what_the_policy_reads():
    """A camera recorded for the detector alone (here the wrist) never reaches the learner's replay, nor does the
    simulator's verdict; the stored episode keeps both."""
    from actors.rollout import run_episodes
    from actors.tabletop import split_seed
    from flywheel.contracts import Label
    from flywheel.update import learner_view

    ep = run_episodes([split_seed("train", 1)], "train", None, policy_version=-1, sensors=("overhead", "wrist"))[0]
    ep.labels.append(Label(source="ground_truth", success=True))
    view = learner_view(ep, {"image", "proprio"})
    assert set(view.observations) == {"image", "proprio"} and view.ground_truth is None and not view.labels
    assert "wrist" in ep.observations and ep.ground_truth is not None
    assert set(learner_view(ep).observations) == {"image", "proprio", "wrist"}


def test_the_default_cameras_reach_the_detector_and_not_the_policy(tmp_path):
    """`flywheel run`'s default records the wrist camera as well: the detector judges from both cameras, the
    stored episodes carry both, and the policy (which reads the overhead camera) still turns."""
    from safetensors import safe_open

    run_dir = tmp_path / "run"
    assert list(load_config("run", [f"run_dir={run_dir}"]).env.sensors) == ["overhead", "wrist"]
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "env.sensors=[overhead,wrist]",
                              "budget.iterations=1", "rollout.use_ray=false", "wandb.mode=disabled",
                              "gate.episodes=0", "eval.episodes=8"])  # (what is under test is where the cameras go)
    summary = run(cfg, say=lambda m: None)
    assert summary["status"] == "completed" and summary["policy_version_final"] == 1
    with safe_open(str(run_dir / "detector" / "detector-1.safetensors"), "np") as f:
        assert json.loads(f.metadata()["flywheel"])["config"]["sensors"] == ["overhead", "wrist"]
    assert all("wrist" in ep.observations for ep in EpisodeStore(run_dir / "episodes").iter())


def test_sigterm_finishes_the_iteration_in_flight_and_says_stopped(tmp_path, tiny_detector):
    """A scheduler's SIGTERM mid-run: the iteration in flight completes (episodes stored, update checkpointed), the
    final evaluation runs, summary.json says "stopped" and why, the store verifies whole, and the process's own
    signal handling is back as it was."""
    import os
    import signal

    run_dir = tmp_path / "run"
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "rollout.use_ray=false", "wandb.mode=disabled",
                              "budget.iterations=3", "gate.episodes=0",  # no gate: no rollback's version in between
                              tiny_detector])
    before = signal.getsignal(signal.SIGTERM)

    def after_iteration(state, row):  # also called after the evaluations, which have no iteration of their own
        if state.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = run(cfg, say=lambda m: None, on_iteration=after_iteration)
    assert summary["status"] == "stopped" and summary["stop_reason"] == "SIGTERM"
    assert summary["iterations"] == 1 and summary["policy_version_final"] == 1
    assert [e["version"] for e in summary["evaluations"]] == [0, 1]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
    assert (run_dir / "checkpoints" / "policy-000001.safetensors").exists()
    report = EpisodeStore(run_dir / "episodes").verify()
    assert report["ok"] and report["unique_ids"] == report["episodes"] >= 32
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_budget_stops_the_loop():
    import time

    from flywheel.state import Budget

    assert Budget(time.time() + 600).allows(5, 10_000, 1.0, 1.0, episodes=1_000)
    assert not Budget(time.time() + 600, max_episodes=64).allows(2, 500, 1.0, 1.0, episodes=64)
    assert not Budget(time.time() + 600, max_env_steps=500).allows(2, 500, 1.0, 1.0, episodes=64)
    assert not Budget(time.time() + 600, max_iterations=2).allows(2, 500, 1.0, 1.0, episodes=64)
    assert not Budget(time.time() + 5).allows(0, 0, next_iteration_s=4.0, reserve_s=2.0)  # no time for another


@pytest.mark.slow  # CI runs it (make test-slow in .ci/run); the default suite keeps to 10 min
def test_with_overlap_the_actors_collect_while_the_learner_trains(tmp_path, ray_local, tiny_detector):
    """The actors collect the next iteration while the learner trains, then go on practising with the weights they
    hold until the new ones come (rollout.keep_collecting): the next iteration learns from all of it, one version
    behind, and no seed is used twice."""
    run_dir = tmp_path / "run"
    cfg = load_config("run", ["experiment=tiny", f"run_dir={run_dir}", "rollout.overlap=true", "gate.episodes=0",
                              "wandb.mode=disabled", "eval.every=100", "eval.episodes=16",
                              "learner.steps_per_update=100",  # an update longer than a share
                              tiny_detector])
    summary = run(cfg, say=lambda m: None)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if "iteration" in r]
    assert [r["rollout/lag_versions"] for r in its] == [0, 1, 1]  # iterations 2-3 practised during an update
    kept = [r["rollout/kept_collecting"] for r in its]
    assert kept[0] == 0 and kept[1] > 0 and kept[2] > 0, kept  # more than 32 an iteration: the actors went on
    assert summary["status"] == "completed" and summary["iterations"] == 3 and summary["episodes"] == 96 + sum(kept)
    assert all(0 < r["rollout/busy_fraction"] <= 1 and 0 <= r["time/learner_wait_fraction"] < 1 for r in its), its
    store = EpisodeStore(run_dir / "episodes")
    practice = [ep for ep in store.iter() if ep.policy_version >= 0 and ep.seed >= 5_000_000]
    indices = sorted(loop_seed_index(ep.seed) for ep in practice)  # every seed index twice (group_size 2), none
    assert indices == sorted(2 * list(range(len(indices) // 2)))   # skipped, none run twice
    sizes = [32 + k for k in kept]  # each iteration's practice ran with the version before its update
    by_version = {v: sum(ep.policy_version == v for ep in practice) for v in (0, 1, 2)}
    assert by_version == {0: sizes[0] + sizes[1], 1: sizes[2], 2: 0}, by_version  # none after the last iteration
    assert store.verify()["ok"]


def test_a_run_judges_with_a_detector_it_is_given_or_with_the_simulator(tmp_path, finished_run):
    """detector.checkpoint: no detector is trained; the given one is copied into the run and labels its practice.
    detector.name=ground_truth: the simulator's record labels it (the comparison's upper bound), and nothing is audited."""
    given = finished_run[0] / "detector" / "detector-1.safetensors"
    base = ["experiment=tiny", "rollout.use_ray=false", "wandb.mode=disabled", "budget.iterations=1", "gate.episodes=0"]
    runs = {"given": [f"detector.checkpoint={given}"], "truth": ["detector.name=ground_truth"]}
    for name, extra in runs.items():
        summary = run(load_config("run", [*base, *extra, f"run_dir={tmp_path / name}"]), say=lambda m: None)
        assert summary["status"] == "completed" and summary["iterations"] == 1
        practice = [ep for ep in EpisodeStore(tmp_path / name / "episodes").iter(with_ground_truth=True)
                    if ep.policy_version >= 0]
        assert len(practice) == 32  # what the loop collected, and nothing made for a detector's training
        labels = [ep.latest_label("detector") for ep in practice]
        if name == "given":
            assert summary["detector"]["version"] == "detector-1" and summary["detector"]["auroc"] is not None
            copied = tmp_path / name / "detector" / "detector-1.safetensors"
            assert copied.read_bytes() != b"" and {lab.version for lab in labels} == {"detector-1"}
            assert summary["audit"]["per_iteration"]
        else:
            assert summary["detector"] == {"version": "ground-truth"}
            assert not (tmp_path / name / "detector").exists() and not summary["audit"]["per_iteration"]
            assert [lab.success for lab in labels] == [ep.ground_truth["success"] for ep in practice]


def test_a_runs_checkpoint_is_the_next_runs_policy_checkpoint(finished_run):
    """Any checkpoint a run wrote loads as policy.checkpoint, carrying the base's record (whose demonstrations the
    next run's learner replays)."""
    from flywheel.vla.checkpoint import load_policy_checkpoint

    newest = sorted((finished_run[0] / "checkpoints").glob("policy-*.safetensors"))[-1]
    model, meta = load_policy_checkpoint(str(newest), as_model=True)
    _, _, base_meta = load_policy_checkpoint("base")
    assert meta["config"] == base_meta["config"] and meta["version"] == 2
    # how its held-out figures were measured, said when the next run measures otherwise
    assert meta["eval_noise"] == 0.0 and eval_noise_note(meta, 0.0) is None and eval_noise_note(base_meta, 1.0) is None
    assert "eval.noise=0" in eval_noise_note(meta, 1.0) and "eval.noise=null" in eval_noise_note(meta, None)
    assert model.get_weights().keys() == load_policy_checkpoint("base", as_model=True)[0].get_weights().keys()


def test_the_robustness_split_is_in_the_summary_and_the_report(finished_run, tmp_path):
    """Success under the held-out randomisation (eval.robust), beside the nominal scene's, at the start and the end:
    summary.json, metrics.jsonl (wandb's eval_robust/*) and the report."""
    import shutil

    from flywheel.report import write_report

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)
    rob = json.loads((run_dir / "summary.json").read_text())["robustness"]
    assert rob["measured"] and rob["episodes"] == 32 and rob["randomize"]["lighting"] == 0.3
    assert rob["initial"]["randomized"]["version"] == rob["initial"]["nominal"]["version"] == 0
    assert rob["final"]["randomized"]["version"] == rob["final"]["nominal"]["version"] == 2
    for when in ("initial", "final"):
        for scene in ("nominal", "randomized"):
            low, high = rob[when][scene]["ci95"]
            assert low <= rob[when][scene]["success"] <= high
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["eval_robust/version"] for r in rows if "eval_robust/success" in r] == [0, 2]
    page = write_report(run_dir).read_text()
    assert "held-out randomisation (32 seeds: colour 0.15, lighting 0.3" in page and "robustness gap" in page


def test_the_robustness_split_is_off_where_the_environment_cannot_randomise():
    from flywheel.parts import held_out_randomize

    assert held_out_randomize(load_config("run", [])) == {"colour": 0.15, "lighting": 0.3, "camera": 0.05,
                                                          "size": 0.2, "friction": 0.3}
    assert held_out_randomize(load_config("run", ["eval.robust_episodes=0"])) is None
    assert held_out_randomize(load_config("run", ["env.name=metaworld"])) is None
