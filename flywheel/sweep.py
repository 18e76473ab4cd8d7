"""``flywheel run -m``: a sweep. Every override given as a comma-separated list (Hydra's multirun syntax:
``learner=ppo,recap seed=1,2``) is an axis; one run per combination, each a ``flywheel run`` of its own in its own
directory under ``run_dir``, one after another. ``run_dir/sweep.json`` says what each run was given and how it
ended, and is rewritten after every run: a sweep stopped midway, started again, resumes each run where it stopped.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from flywheel.config import ConfigError
from flywheel.store import atomic_write_bytes


def combinations(overrides: list[str]) -> list[list[str]]:
    """The overrides of each run of the sweep, in order (the last axis turning fastest)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(f"bad sweep override: {e}") from e
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in parsed]
    return [list(c) for c in itertools.product(*axes)]


def sweep(overrides: list[str], say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every combination; returns (and writes) the sweep summary."""
    given = [o for o in overrides if not o.startswith("run_dir=")]
    root = Path(next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")),
                     f"runs/sweep-{time.strftime('%Y%m%d-%H%M%S')}"))
    runs = combinations(given)
    varied = [o.get_key_element() for o in OverridesParser.create().parse_overrides(given) if o.is_sweep_override()]
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"sweep": given, "varied": varied, "runs": []}
    for i, run_overrides in enumerate(runs):
        chosen = [o for o in run_overrides if o.split("=", 1)[0] in varied]
        run_dir = root / f"{i}-{_slug(chosen)}"
        say(f"sweep: run {i + 1} of {len(runs)}: {' '.join(chosen)} -> {run_dir}")
        done = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", *run_overrides, f"run_dir={run_dir}"])
        summary["runs"].append(_outcome(run_dir, chosen, done.returncode))
        atomic_write_bytes(root / "sweep.json", json.dumps(summary, indent=2).encode())
    summary["completed"] = sum(r["status"] == "completed" for r in summary["runs"])
    atomic_write_bytes(root / "sweep.json", json.dumps(summary, indent=2).encode())
    say(_table(summary))
    return summary


def _outcome(run_dir: Path, chosen: list[str], returncode: int) -> dict[str, Any]:
    try:
        run = json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        run = {"status": "failed", "error": f"exit status {returncode}, no summary.json"}
    keep = ("status", "initial_success", "initial_ci95", "final_success", "final_ci95", "iterations", "env_steps",
            "wall_seconds", "error")
    return {"run_dir": str(run_dir), "overrides": chosen, "returncode": returncode,
            **{k: run[k] for k in keep if k in run}}


def _slug(chosen: list[str]) -> str:
    """A directory name of the values a run was given, that Hydra reads back as one value (no "=" nor ",")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(o.replace("=", "_") for o in chosen)) or "run"


def _table(summary: dict[str, Any]) -> str:
    lines = [f"sweep: {summary['completed']} of {len(summary['runs'])} runs completed"]
    for r in summary["runs"]:
        outcome = (f"{r['initial_success']:.3f} -> {r['final_success']:.3f}" if "final_success" in r
                   else r.get("error", r["status"]))
        lines.append(f"  {' '.join(r['overrides']) or '(as given)'}: {r['status']}, {outcome}")
    return "\n".join(lines)
