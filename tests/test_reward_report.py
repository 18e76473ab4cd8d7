"""The detector's figures, its calibration, and `flywheel reward eval` (reward/metrics.py, reward/report.py)."""

import json

import numpy as np
import pytest

from flywheel.contracts import Label
from flywheel.store import EpisodeStore
from reward.metrics import (detector_metrics, expected_calibration_error, fit_calibration, recall_at_fpr,
                            threshold_for_precision)
from reward.report import evaluate_run
from reward.train import swapped_instructions


def test_figures_on_known_scores():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.1, 0.05])
    m = detector_metrics(scores, labels, threshold=0.5)
    assert m["confusion"] == {"tp": 3, "fp": 1, "fn": 1, "tn": 3}
    assert m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == 0.75 and m["balanced_accuracy"] == 0.75
    assert m["auroc"] == pytest.approx(15 / 16)  # one of the 16 positive-negative pairs is out of order
    assert m["recall_at_1pct_fpr"] == 0.75  # above every negative's score: 0.9, 0.8, 0.7
    assert m["precision_at_90pct_recall"] == 0.8  # all four successes need a threshold of 0.2: one negative passes
    assert m["brier"] == pytest.approx(np.mean((scores - labels) ** 2))
    one_class = detector_metrics(scores[:4], labels[:4], 0.5)
    assert one_class["auroc"] is None and one_class["recall_at_5pct_fpr"] is None and one_class["precision"] == 1.0
    assert one_class["precision_at_90pct_recall"] is None
    assert json.loads(json.dumps(one_class)) == one_class  # no NaN: the report stays valid JSON


def test_ece_is_zero_when_probabilities_come_true_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    assert expected_calibration_error(p, (rng.uniform(size=p.size) < p).astype(float)) < 0.02
    assert expected_calibration_error(np.full(1000, 0.99), np.r_[np.ones(500), np.zeros(500)]) == pytest.approx(0.49)


def test_calibration_recovers_overconfidence_and_a_lean_and_keeps_the_order():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 2, 5000)
    labels = rng.uniform(size=5000) < 1 / (1 + np.exp(-true_logits))
    t, b = fit_calibration(3.0 * true_logits + 1.5, labels)  # three times too sure, and leaning to "success"
    assert t == pytest.approx(3.0, rel=0.1) and b == pytest.approx(-0.5, abs=0.1)
    calibrated = 1 / (1 + np.exp(-((3.0 * true_logits + 1.5) / t + b)))
    assert expected_calibration_error(calibrated, labels) < 0.02
    assert recall_at_fpr(calibrated, labels, 0.05) == recall_at_fpr(3.0 * true_logits, labels, 0.05)


def test_each_task_family_gets_its_own_calibration_where_it_has_the_episodes():
    """Two families the detector leans on differently (one over-claims, one is too timid): a fit per family
    recovers each lean and calibrates both; a family with too few episodes keeps the global fit."""
    from reward.detector import DetectorNet, LearnedSuccessDetector
    from reward.metrics import fit_task_calibrations

    rng = np.random.default_rng(3)
    true_logits = rng.normal(0, 2, 6000)
    labels = rng.uniform(size=6000) < 1 / (1 + np.exp(-true_logits))
    tasks = np.array(["push"] * 3000 + ["place"] * 2990 + ["stack"] * 10)
    logits = np.where(tasks == "push", 2.0 * true_logits + 2.0, 0.5 * true_logits - 1.0)
    fits = fit_task_calibrations(logits, labels, list(tasks))
    assert set(fits) == {"push", "place"}  # stack: 10 episodes, too few
    assert fits["push"] == pytest.approx((2.0, -1.0), abs=0.1) and fits["place"] == pytest.approx((0.5, 2.0), abs=0.15)
    detector = LearnedSuccessDetector(DetectorNet(), "d", temperature=1.0, bias=0.0, per_task=fits)
    per_task = detector._calibrated(logits, list(tasks))
    single = 1 / (1 + np.exp(-(logits / fit_calibration(logits, labels)[0] + fit_calibration(logits, labels)[1])))
    assert expected_calibration_error(per_task, labels) < 0.02 < expected_calibration_error(single, labels)
    stack = tasks == "stack"
    assert np.allclose(per_task[stack], 1 / (1 + np.exp(-logits[stack])), atol=1e-6)  # the global fit (T 1, b 0)


def test_the_threshold_reaches_the_target_precision_at_the_policys_success_rate():
    rng = np.random.default_rng(2)
    labels = rng.uniform(size=4000) < 0.5
    scores = np.clip(rng.normal(np.where(labels, 0.7, 0.3), 0.15), 0, 1)
    t = threshold_for_precision(scores, labels, 0.95)
    m = detector_metrics(scores, labels, t)
    precision_at = {x: labels[scores >= x].mean() for x in scores}  # as detector_metrics counts it, at each score
    assert m["precision"] >= 0.94 and t == pytest.approx(min(x for x, p in precision_at.items() if p >= 0.95), abs=0.02)
    # Where the policy succeeds a fifth as often, false positives weigh more: the threshold must rise.
    assert threshold_for_precision(scores, labels, 0.95, base_rate=0.1) > t


def test_a_swapped_instruction_names_other_objects_of_the_same_kind(demos):
    swaps = swapped_instructions(demos, np.random.default_rng(0))
    assert sum(s is not None for s in swaps) >= len(demos) // 2
    by_text = {ep.instruction: ep for ep in demos}
    for ep, text in zip(demos, swaps):
        if text is not None:
            other = by_text[text]
            assert other.info["kind"] == ep.info["kind"] and other.info["named"] != ep.info["named"]


def test_reward_eval_writes_the_report_of_a_run(tmp_path, finished_run):
    """A tiny run, then `flywheel reward eval` on it: the JSON keys scripts read, the splits, and the HTML."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run[0], run_dir)  # two iterations: v0 and v1 practised, v2 collected nothing yet
    report = evaluate_run(run_dir)
    on_disk = json.loads((run_dir / "reward" / "report.json").read_text())
    assert on_disk["newest_policy_version"] == 1 == report["newest_policy_version"]
    for key in ("auroc", "precision", "recall", "ece", "swapped_instruction_rejection", "voc"):
        assert key in on_disk
    assert -1.0 <= on_disk["voc"] <= 1.0 and on_disk["splits"]["newest_policy"]["all"]["voc_episodes"] > 0
    assert {"heldout", "newest_policy", "swapped_instruction"} <= set(on_disk["splits"])
    assert set(on_disk["splits"]["newest_policy"]["per_task"]) == {"push", "place"}
    assert 0.0 <= on_disk["swapped_instruction_rejection"] <= 1.0
    meta_ids = json.loads((run_dir / "detector" / "metrics.json").read_text())
    assert on_disk["splits"]["heldout"]["all"]["n"] == meta_ids["n"]  # the same held-out episodes as training's
    page = (run_dir / "reward" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "swapped-instruction rejection" in page.lower()

    # Judged against the simulator, never against a detector's own labels: contradicting every detector label
    # changes nothing.
    store = EpisodeStore(run_dir / "episodes")
    flipped = [(ep.id, Label(source="detector", success=not lab.success, version="detector-x"))
               for ep in store.iter() for lab in ep.labels if lab.source == "detector"]
    assert flipped
    store.add_labels(flipped)
    again = evaluate_run(run_dir)
    assert again["splits"]["newest_policy"] == report["splits"]["newest_policy"]
