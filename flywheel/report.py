"""``flywheel report RUN_DIR``: the run at a glance, as one self-contained HTML file (``RUN_DIR/report.html``).

Made from the run's local files alone (metrics.jsonl, summary.json or, for a run still going or killed,
run_state.json, and the episode store), with every plot and clip inlined: it opens without a network, can be mailed,
and works while the run is going. The plots are the loop's dashboard panels:

- held-out success per policy version, with its 95% interval (ground truth), in the nominal scene and, at the
  start and the end, under the held-out randomisation (the robustness split);
- the detector's claimed success against the audited truth, per iteration;
- the promotion gate's decisions (candidate against deployed, held-back versions marked);
- throughput (episodes and env steps per second) and where each iteration's time went, phase by phase;
- rollout clips of the newest policy: a judged success and a judged failure, as animated GIFs.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.metrics import gif_bytes, png_data_uri
from flywheel.store import EpisodeStore, atomic_write_bytes

PHASES = ("collect", "store", "label", "audit", "update", "publish", "gate", "checkpoint", "evaluate")


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, skipping a last line cut short by a crash."""
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _summary(run_dir: Path) -> dict[str, Any]:
    for name in ("summary.json", "run_state.json"):
        try:
            found = json.loads((run_dir / name).read_text())
            return found if name == "summary.json" else {"status": "running or killed (no summary yet)",
                                                          **found.get("loop", {})}
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return {"status": "no summary yet"}


def _judged_by(run_dir: Path) -> str:
    """Who scored the run's evaluations (its config.yaml's eval.judge): ground_truth, or detector on a robot."""
    from omegaconf import OmegaConf

    try:
        return str(OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "eval.judge", default="ground_truth"))
    except (FileNotFoundError, ValueError):
        return "ground_truth"


def _success_series(ax, rows: list[dict[str, Any]], prefix: str, fmt: str, label: str) -> list[dict[str, Any]]:
    """One held-out success series (``eval`` or ``eval_robust``) with its 95% intervals, per policy version."""
    found = [r for r in rows if f"{prefix}/success" in r]
    if found:
        s = np.array([r[f"{prefix}/success"] for r in found])
        lo, hi = (np.array([r[f"{prefix}/ci95_{k}"] for r in found]) for k in ("low", "high"))
        ax.errorbar([r[f"{prefix}/version"] for r in found], s, yerr=[s - lo, hi - s], fmt=fmt, capsize=3,
                    label=label.format(episodes=found[-1].get(f"{prefix}/episodes", "?")))
    return found


def _held_out_plot(rows: list[dict[str, Any]], judged_by: str, plt, MaxNLocator) -> list[tuple[str, str]]:
    """Held-out success per version in the nominal scene and, at the start and the end, under the held-out
    randomisation (the robustness split)."""
    if not any("eval/success" in r for r in rows):
        return []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    evals = _success_series(ax, rows, "eval", "o-", "nominal scene")
    if _success_series(ax, rows, "eval_robust", "s--", "held-out randomisation ({episodes} seeds)"):
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    by = "ground truth" if judged_by == "ground_truth" else "the detector's verdicts"
    ax.set(xlabel="policy version", ylabel=f"held-out success ({by})", ylim=(0, 1),
           title=f"held-out success, 95% interval ({evals[-1].get('eval/episodes', '?')} seeds)")
    plot = ("Held-out success per policy version", png_data_uri(fig))
    plt.close(fig)
    return [plot]


def _plots(rows: list[dict[str, Any]], judged_by: str = "ground_truth") -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = _held_out_plot(rows, judged_by, plt, MaxNLocator)
    its = [r for r in rows if "iteration" in r]
    if its:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        x = [r["iteration"] for r in its]
        ax.plot(x, [r["train/claimed_success"] for r in its], "o-", label="claimed by the detector (all episodes)")
        ax.plot(x, [r["train/true_success"] for r in its], "s--", label="true (simulator; never seen by the learner)")
        audited = [r for r in its if "audit/audited_success" in r]
        if audited:
            ax.plot([r["iteration"] for r in audited], [r["audit/audited_success"] for r in audited], "^:",
                    label="audited sample")
        alarms = [r["iteration"] for r in its if r.get("audit/alarm")]
        for a in alarms:
            ax.axvline(a, color="red", alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="iteration", ylabel="success of practice episodes", ylim=(0, 1),
               title="detector: claimed against audited" + (" (red: audit alarm)" if alarms else ""))
        ax.legend(fontsize=8)
        out.append(("Detector success, claimed against audited", png_data_uri(fig)))
        plt.close(fig)
        gated = [r for r in its if "gate/candidate_success" in r]
        if gated:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            x = [r["iteration"] for r in gated]
            ax.plot(x, [r["gate/deployed_success"] for r in gated], "o-", label="deployed")
            ax.plot(x, [r["gate/candidate_success"] for r in gated], "s--", label="candidate")
            held = [r for r in gated if not r["gate/promoted"]]
            ax.scatter([r["iteration"] for r in held], [r["gate/candidate_success"] for r in held], s=120,
                       facecolors="none", edgecolors="red", label="held back (rolled back)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel="iteration", ylabel="success on the gate's seeds", ylim=(0, 1),
                   title=f"promotion gate: {len(gated) - len(held)} promoted, {len(held)} held back")
            ax.legend(fontsize=8)
            out.append(("Promotion gate decisions", png_data_uri(fig)))
            plt.close(fig)
        fig, (rate, time_ax, idle) = plt.subplots(1, 3, figsize=(17, 3.6))
        x = [r["iteration"] for r in its]
        seconds = np.array([sum(r.get(f"time/{p}", 0.0) for p in PHASES) for r in its])
        episodes = np.diff([0] + [r["episodes"] for r in its])
        steps = np.diff([0] + [r["env_steps"] for r in its])
        rate.plot(x, episodes / np.maximum(seconds, 1e-9), "o-", label="episodes/s")
        rate.plot(x, steps / np.maximum(seconds, 1e-9) / 10, "s--", label="env steps/s ÷ 10")
        rate.set(xlabel="iteration", title="throughput (whole iteration)")
        rate.legend(fontsize=8)
        bottom = np.zeros(len(its))
        for p in PHASES:
            t = np.array([r.get(f"time/{p}", 0.0) for r in its])
            if t.any():
                time_ax.bar(x, t, bottom=bottom, label=p)
                bottom += t
        for key, label in (("rollout/busy_fraction", "actors busy"), ("time/learner_wait_fraction",
                                                                        "learner waiting for practice")):
            if any(key in r for r in its):
                idle.plot([r["iteration"] for r in its if key in r], [r[key] for r in its if key in r], "o-",
                          label=label)
        idle.set(xlabel="iteration", ylabel="fraction of the iteration", ylim=(0, 1), title="pipeline")
        idle.legend(fontsize=8)
        for a in (rate, time_ax, idle):
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        time_ax.set(xlabel="iteration", ylabel="seconds", title="where each iteration's time went")
        time_ax.legend(fontsize=7, ncol=3)
        out.append(("Throughput, time per phase, and pipeline waits", png_data_uri(fig)))
        plt.close(fig)
    return out


def _gif(frames: np.ndarray) -> str:
    return "data:image/gif;base64," + base64.b64encode(gif_bytes(frames)).decode()


def _clips(run_dir: Path, count: int = 2) -> list[tuple[str, str]]:
    """Clips of the newest policy's stored practice: judged successes and failures, ``count`` of each."""
    store_dir = run_dir / "episodes"
    if not store_dir.is_dir():
        return []
    store = EpisodeStore(store_dir)
    newest = sorted(((m.get("policy_version", -1), p) for p, m in store.lineage("train")), reverse=True)
    if not newest or newest[0][0] < 0:
        return []
    labels = store.labels()
    out: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    for version, path in newest:
        if version != newest[0][0] or all(len(v) >= count for v in out.values()):
            break
        judged = [lab for lab in labels.get(path.stem, []) if lab.source == "detector"]
        if not judged or len(out[judged[-1].success]) >= count:
            continue
        ep = store.read(path, labels.get(path.stem))
        known = (ep.ground_truth or {}).get("success")
        truth = "not judged by a person" if known is None else ("truly succeeded" if known else "truly failed")
        caption = (f"v{version} · {ep.instruction} · judged {'success' if judged[-1].success else 'failure'} "
                   f"(P={judged[-1].score:.2f}) · {truth} · {ep.num_steps} steps")
        out[judged[-1].success].append((caption, _gif(ep.observations["image"])))
    return out[True] + out[False]


def _robustness_facts(rob: dict[str, Any]) -> list[tuple[str, str]]:
    """The robustness split's rows: success in the nominal scene and under the held-out randomisation, before and
    after, and the gap between them."""
    if not rob.get("measured"):
        return [("robustness split", f"not measured ({rob['why']})")] if rob else []
    fig = lambda f: f"{f['success']:.3f} [{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]"  # noqa: E731
    first, last = rob["initial"], rob["final"]
    knobs = ", ".join(f"{k} {v:g}" for k, v in rob["randomize"].items() if v)
    return [(f"held-out randomisation ({rob['episodes']} seeds: {knobs}), before → after",
             f"{fig(first['randomized'])} → {fig(last['randomized'])}"),
            ("robustness gap (nominal − randomised), before → after",
             f"{first['nominal']['success'] - first['randomized']['success']:+.3f} → "
             f"{last['nominal']['success'] - last['randomized']['success']:+.3f}")]


def _table(pairs: list[tuple[str, Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in pairs) + "</table>"


# Once the page has loaded, it records on <body> how many of its images a browser decoded (what the headless check
# in tests/test_report.py reads): data-images, data-decoded.
_SELF_CHECK = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
               "document.body.dataset.images=i.length;"
               "document.body.dataset.decoded=i.filter(x=>x.complete&&x.naturalWidth>0).length})</script>")


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` and return its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} holds no metrics.jsonl: give the run_dir of a `flywheel run`")
    rows = read_rows(run_dir)
    summary = _summary(run_dir)
    det = summary.get("detector") or {}
    gate = summary.get("gate") or {}
    faults = (summary.get("faults") or {}).get("events", [])
    facts = [(k, summary[k]) for k in ("status", "experiment", "attempt", "iterations", "episodes", "env_steps",
                                        "policy_version_final", "eval_episodes") if k in summary]
    if "initial_success" in summary:
        facts.append(("held-out success, before → after",
                      f"{summary['initial_success']:.3f} [{summary['initial_ci95'][0]:.3f}, "
                      f"{summary['initial_ci95'][1]:.3f}] → {summary['final_success']:.3f} "
                      f"[{summary['final_ci95'][0]:.3f}, {summary['final_ci95'][1]:.3f}]"))
    facts += _robustness_facts(summary.get("robustness") or {})
    if "wall_seconds" in summary:
        facts.append(("wall time", f"{summary['wall_seconds'] / 60:.1f} min"))
    facts += [(f"detector {k}", det[k]) for k in ("version", "auroc", "precision", "recall", "ece") if k in det]
    if gate:
        facts.append(("gate", f"{len(gate.get('decisions', []))} decisions, {gate.get('held_back', 0)} held back "
                              f"({gate.get('episodes')} seeds, confidence {gate.get('confidence')}, judged by "
                              f"{gate.get('judge', 'ground_truth')})"))
    facts.append(("rollbacks", len(summary.get("rollbacks", []))))
    facts.append(("faults", f"{len(faults)} ({(summary.get('faults') or {}).get('restarts', 0)} actors replaced)"))
    figures = "".join(f"<h2>{html.escape(t)}</h2><img class='plot' src='{src}'>"
                      for t, src in _plots(rows, _judged_by(run_dir)))
    clips = _clips(run_dir)
    clips_html = ("<h2>Newest policy, in practice</h2><div class='clips'>" + "".join(
        f"<figure><img class='clip' src='{src}'><figcaption>{html.escape(c)}</figcaption></figure>"
        for c, src in clips) + "</div>") if clips else ""
    fault_rows = "".join(f"<tr><td>{html.escape(json.dumps(f))}</td></tr>" for f in faults[-50:])
    body = (f"<h1>flywheel run: {html.escape(run_dir.name)}</h1>" + _table(facts) + figures + clips_html +
            (f"<h2>Faults (the last 50)</h2><table>{fault_rows}</table>" if faults else ""))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>flywheel run "
            f"{html.escape(run_dir.name)}</title><style>body{{font-family:sans-serif;margin:2em}}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:left}.clips{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;max-width:220px;"
            "font-size:12px}</style></head><body>" + body + _SELF_CHECK + "</body></html>")
    path = run_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
