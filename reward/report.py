"""``flywheel reward eval``: how far a run's success detector can be trusted, as ``reward/report.json`` and a
self-contained ``reward/report.html`` (plots inline; no network needed to read it).

The episodes judged are those the detector never trained on nor calibrated with, each against its true label
(``Episode.trusted_success``: a human or simulator label where there is one, else the ground truth the store keeps). They are grouped
into splits:

- ``heldout``: the detector's own held-out episodes (its training data's split);
- ``newest_policy``: the episodes of the newest policy version in the store, the policy the detector judges now
  (newer than any it trained on, once the loop has run). The report's headline figures are this split's;
- ``heldout_combos``: episodes whose instruction pairs colours held out of training (actors/instructions.py);
- ``swapped_instruction``: the newest policy's successes judged under an instruction that names other objects
  (reward/train.py swapped_instructions); ``rejection`` is the share the detector calls failures, as it should.

Each split is reported whole and per task family, with the figures of reward/metrics.py detector_metrics, and the
progress head's value-order correlation ``voc``: over the split's successful episodes, the mean Spearman
correlation between the head's progress and time (1: progress only ever rises toward success).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.checkpoint import load_weights
from flywheel.config import ConfigError
from flywheel.contracts import Episode
from flywheel.metrics import png_data_uri
from flywheel.store import EpisodeStore, atomic_write_bytes
from flywheel.vla.checkpoint import ASSETS
from reward.detector import LearnedSuccessDetector
from reward.metrics import detector_metrics, reliability
from reward.train import swapped_instructions


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # here, not at the top: sklearn is slow to import

    return roc_auc_score(labels, scores)


def detector_path(spec: str | Path) -> Path:
    """``base`` -> the shipped detector for the shipped base policy on the default tabletop
    (``flywheel/assets/base_detector.safetensors``); ``base:NAME`` -> ``flywheel/assets/NAME_detector.safetensors``;
    anything else is a path. A shipped one that is missing is an error saying how to rebuild it."""
    spec = str(spec)
    if spec != "base" and not spec.startswith("base:"):
        return Path(spec).expanduser()
    name = "base" if spec == "base" else spec[len("base:"):]
    path = ASSETS / f"{name}_detector.safetensors"
    if not path.exists():
        shipped = sorted(p.name[: -len("_detector.safetensors")] for p in ASSETS.glob("*_detector.safetensors"))
        raise ConfigError(
            f"there is no shipped detector {spec!r} ({path.name}); the shipped ones: "
            f"{', '.join('base' if n == 'base' else f'base:{n}' for n in shipped) or 'none'}. Restore it with `git "
            f"checkout -- flywheel/assets/`, rebuild it with the command in its .json, or train one: "
            f"detector.checkpoint='' trains one in the run")
    return path


def load_detector(path: str | Path) -> tuple[LearnedSuccessDetector, dict[str, Any]]:
    """A detector checkpoint written by a run (``run_dir/detector/detector-N.safetensors``), or a shipped one
    (``base``, ``base:NAME``: ``detector_path``) -> (detector, meta)."""
    path = detector_path(path)
    weights, meta = load_weights(path)
    try:
        detector, missing = LearnedSuccessDetector.from_weights(weights, {"version": Path(path).stem, **meta})
    except ValueError as e:
        raise ValueError(f"{path}: {e}. Give a checkpoint written by `flywheel run` or `flywheel reward train`") from e
    return detector, {**meta, "progress_head": not missing}  # one from before the progress head reports no VOC


def latest_detector(run_dir: Path) -> Path:
    if not (run_dir / "episodes").is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no episodes/ in it): give the run_dir of a "
                                f"`flywheel run`")
    found = sorted((run_dir / "detector").glob("detector-*.safetensors"), key=lambda p: int(p.stem.split("-")[-1]))
    if not found:
        raise FileNotFoundError(f"{run_dir}/detector holds no detector: train one with "
                                f"`flywheel reward train run_dir={run_dir}`")
    return found[-1]


def value_order_correlation(detector: LearnedSuccessDetector, episode: Episode, frames: int = 16) -> float | None:
    """Spearman correlation between the progress head's value and time over ``frames`` evenly spaced steps of the
    episode; None where it is undefined (too short, or a constant value)."""
    from scipy.stats import spearmanr

    steps = np.unique(np.linspace(0, episode.num_steps, frames).round().astype(int))
    if len(steps) < 3:
        return None
    rho = spearmanr(steps, detector.progress(episode, steps)).statistic
    return None if np.isnan(rho) else float(rho)


def _group(scores: np.ndarray, labels: np.ndarray, tasks: list[str], threshold: float,
           voc: list[float | None]) -> dict[str, Any]:
    def figures(keep: np.ndarray) -> dict[str, Any]:
        rhos = [v for v, k in zip(voc, keep) if k and v is not None]
        return {**detector_metrics(scores[keep], labels[keep], threshold),
                "voc": float(np.mean(rhos)) if rhos else None, "voc_episodes": len(rhos)}

    tasks_a = np.array(tasks)
    return {"all": figures(np.ones(len(tasks), bool)),
            "per_task": {t: figures(tasks_a == t) for t in sorted(set(tasks))}}


def build_report(detector: LearnedSuccessDetector, meta: dict[str, Any], episodes: list[Episode],
                 seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the report, the curves behind its plots). ``episodes``: the run's store, whole."""
    used = set(meta.get("episodes", {}).get("train", [])) | set(meta.get("episodes", {}).get("calibration", []))
    pool = [ep for ep in episodes if ep.id not in used and ep.trusted_success() is not None]
    if not pool:
        raise ValueError("no labelled episodes that the detector did not train on: nothing to evaluate it with")
    heldout_ids = set(meta.get("episodes", {}).get("heldout", []))
    policy_versions = [ep.policy_version for ep in pool if ep.policy_version >= 0]
    newest = max(policy_versions) if policy_versions else -1
    splits = {
        "heldout": [ep for ep in pool if ep.id in heldout_ids],
        "newest_policy": [ep for ep in pool if ep.policy_version == newest],
        "heldout_combos": [ep for ep in pool if ep.info.get("combo_heldout")],
    }
    threshold = detector.threshold
    report: dict[str, Any] = {
        "detector": {"version": detector.version, "threshold": threshold, "temperature": detector.temperature,
                     "bias": detector.bias, "per_task": detector.per_task, "members": len(detector.members)},
        "newest_policy_version": newest, "created": time.time(), "splits": {},
    }
    curves: dict[str, Any] = {}
    for name, eps in splits.items():
        if not eps:
            continue
        scores = detector.score(eps)
        labels = np.array([ep.trusted_success() for ep in eps], bool)
        progress = meta.get("progress_head", True)
        voc = [value_order_correlation(detector, ep) if ok and progress else None for ep, ok in zip(eps, labels)]
        report["splits"][name] = _group(scores, labels, [ep.task for ep in eps], threshold, voc)
        if len(detector.members) > 1:  # an ensemble: is its uncertainty highest where it is wrong?
            spread = detector.uncertainty(eps)
            wrong = (scores >= threshold) != labels
            report["splits"][name]["uncertainty"] = {
                "mean": float(spread.mean()), "mean_when_wrong": float(spread[wrong].mean()) if wrong.any() else None,
                "error_auroc": float(_auroc(wrong, spread)) if wrong.any() and (~wrong).any() else None}
        curves[name] = {"scores": scores, "labels": labels, "tasks": [ep.task for ep in eps],
                        "reliability": reliability(scores, labels.astype(float))}

    # Swapped instructions: the newest policy's successes (any successes, if it has none), asked for something else.
    rng = np.random.default_rng(seed)
    successes = ([ep for ep in splits["newest_policy"] if ep.trusted_success()]
                 or [ep for ep in pool if ep.trusted_success()])
    swaps = swapped_instructions(successes, rng, pool=pool)
    chosen = [(ep, text) for ep, text in zip(successes, swaps) if text is not None]
    if chosen:
        scores = detector.score([ep for ep, _ in chosen], [text for _, text in chosen])
        rejected = scores < threshold
        tasks = [ep.task for ep, _ in chosen]
        report["splits"]["swapped_instruction"] = {
            "rejection": float(rejected.mean()), "n": len(chosen),
            "per_task": {t: float(rejected[[x == t for x in tasks]].mean()) for t in sorted(set(tasks))}}
    headline = report["splits"].get("newest_policy", {}).get("all", {})
    report.update({k: headline.get(k) for k in ("auroc", "precision", "recall", "precision_at_90pct_recall", "ece", "voc")})
    report["swapped_instruction_rejection"] = report["splits"].get("swapped_instruction", {}).get("rejection")
    return report, curves


def _plots(report: dict[str, Any], curves: dict[str, Any]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    out = []
    fig, (roc, pr, rel) = plt.subplots(1, 3, figsize=(13, 4))
    for name, c in curves.items():
        if c["labels"].all() or not c["labels"].any():
            continue
        fpr, tpr, _ = roc_curve(c["labels"], c["scores"])
        roc.plot(fpr, tpr, label=name)
        prec, rec, _ = precision_recall_curve(c["labels"], c["scores"])
        pr.plot(rec, prec, label=name)
    for name, c in curves.items():
        pts = c["reliability"]
        rel.plot([p["score"] for p in pts], [p["observed"] for p in pts], "o-", label=name)
    roc.plot([0, 1], [0, 1], ":", color="grey")
    rel.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(title="ROC", xlabel="false-positive rate", ylabel="recall")
    pr.set(title="precision-recall", xlabel="recall", ylabel="precision")
    rel.set(title="reliability (calibrated P(success))", xlabel="predicted", ylabel="observed success rate")
    for ax in (roc, pr, rel):
        ax.legend(fontsize=8)
    out.append(("ROC, precision-recall and reliability, per split", png_data_uri(fig)))
    plt.close(fig)

    split = "newest_policy" if "newest_policy" in report["splits"] else next(iter(report["splits"]))
    per_task = report["splits"][split]["per_task"]
    fig, axes = plt.subplots(1, len(per_task), figsize=(3.8 * len(per_task), 3.2), squeeze=False)
    for ax, (task, m) in zip(axes[0], per_task.items()):
        c = m["confusion"]
        grid = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > grid.max() / 2 else "black")
        ax.set(title=task, xticks=[0, 1], xticklabels=["judged fail", "judged success"], yticks=[0, 1],
               yticklabels=["failed", "succeeded"])
    fig.tight_layout()
    out.append((f"confusion matrices per task ({split}, threshold {report['detector']['threshold']:.3f})",
                png_data_uri(fig)))
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def render_html(report: dict[str, Any], curves: dict[str, Any]) -> str:
    cols = ["n", "positives", "auroc", "auprc", "precision", "recall", "f1", "balanced_accuracy",
            "recall_at_1pct_fpr", "recall_at_5pct_fpr", "precision_at_90pct_recall", "ece", "brier", "voc"]
    rows = []
    for split, body in report["splits"].items():
        if split == "swapped_instruction":
            continue
        for task, m in [("all", body["all"]), *body["per_task"].items()]:
            rows.append("<tr><td>" + html.escape(split) + "</td><td>" + html.escape(task) + "</td>" +
                        "".join(f"<td>{_fmt(m[c])}</td>" for c in cols) + "</tr>")
    swap = report["splits"].get("swapped_instruction")
    swap_html = "<p>No swapped instructions could be made (one instruction per task).</p>" if not swap else (
        f"<p>Swapped-instruction rejection: <b>{swap['rejection']:.3f}</b> over {swap['n']} successes; per task: "
        + ", ".join(f"{html.escape(t)} {v:.3f}" for t, v in swap["per_task"].items()) + "</p>")
    d = report["detector"]
    head = (f"<p>Detector <b>{html.escape(d['version'])}</b>, threshold {d['threshold']:.3f}, temperature "
            f"{d['temperature']:.3f}, bias {d['bias']:.3f}. Newest policy version: "
            f"{report['newest_policy_version']}. Headline (newest policy): AUROC {_fmt(report['auroc'])}, "
            f"precision {_fmt(report['precision'])}, recall {_fmt(report['recall'])}, ECE {_fmt(report['ece'])}, "
            f"swapped-instruction rejection "
            f"{_fmt(report['swapped_instruction_rejection'])}, progress value-order correlation "
            f"{_fmt(report['voc'])}.</p>")
    figs = "".join(f"<h2>{html.escape(t)}</h2><img src='{src}'>" for t, src in _plots(report, curves))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>flywheel detector report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,td:nth-child(2)"
            "{text-align:left}</style></head><body><h1>Success detector report</h1>" + head + swap_html +
            "<table><tr><th>split</th><th>task</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" +
            "".join(rows) + "</table>" + figs + "</body></html>")


def evaluate_run(run_dir: str | Path, detector_path: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Write ``run_dir/reward/report.json`` and ``report.html`` for the run's newest (or the given) detector."""
    run_dir = Path(run_dir)
    detector, meta = load_detector(detector_path or latest_detector(run_dir))
    episodes = list(EpisodeStore(run_dir / "episodes").iter(with_ground_truth=True))
    report, curves = build_report(detector, meta, episodes, seed=seed)
    out = run_dir / "reward"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(out / "report.html", render_html(report, curves).encode())
    return report
