"""Resuming a run: ``flywheel run run_dir=PATH`` on a directory that holds a run continues it.

After every iteration, once its checkpoint is on disk, the loop's state goes to ``run_dir/run_state.json``
(atomically): where the loop stands, the policy version to restore (a checkpoint with its learner state) and the
detector that labels. A run killed at any point (the driver, the machine) resumes from there:

- its config is the one in ``run_dir/config.yaml``; only what does not change the experiment may be given anew
  (``RESUMABLE``: budgets, wandb, how many rollout workers, how often to evaluate);
- the policy, the learner's optimizer and generators come from that checkpoint; the learner's replay buffer is
  refilled from the episode store with the episodes it had already learned from;
- the iteration that was in flight is done again, using every attempt it had stored (none run twice) and
  collecting only the rest (none lost);
- the wall-clock budget counts the time the run has already spent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flywheel.config import ConfigError, run_schema
from flywheel.contracts import Episode, collection_order
from flywheel.store import EpisodeStore, atomic_write_bytes

STATE_FILE = "run_state.json"
# Keys a resumed run may be given anew: how long, where it reports, how many workers, how often it evaluates.
RESUMABLE = ("run_dir", "budget.", "wandb.", "rollout.num_workers", "rollout.use_ray", "rollout.cpus_per_worker",
             "rollout.call_timeout_s", "rollout.resources", "rollout.overlap", "rollout.keep_collecting",
             "rollout.trim_idle_s", "ray.", "eval.every", "placement.", "detector.min_auroc")


class RunDirError(RuntimeError):
    """A run directory that cannot be used (or resumed)."""


def holds_a_run(run_dir: Path) -> bool:
    """Stored episodes, or a run that did not fail. A run that failed before storing anything (a mistyped
    checkpoint path, say) leaves nothing to lose, so its directory is used afresh once the mistake is fixed."""
    if (run_dir / "episodes").exists():
        return True
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") != "failed"
    except FileNotFoundError:
        return False
    except (json.JSONDecodeError, AttributeError):
        return True  # unreadable: do not guess


def _given_keys(overrides: list[str]) -> list[str]:
    return [a.split("=", 1)[0].lstrip("+~") for a in overrides if "=" in a]


def resumable(key: str) -> bool:
    """Whether a resumed run may be given ``key`` (a dotted config key) anew."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config to run with: ``cfg`` (composed from the command line) for a new run; for a run_dir that holds a
    run, its recorded config with only the keys given on the command line replaced. A given key that would change
    the experiment is a ConfigError naming it."""
    if OmegaConf.is_missing(cfg, "run_dir") or not holds_a_run(Path(cfg.run_dir)):
        return cfg
    recorded = recorded_config(Path(cfg.run_dir))
    for key in _given_keys(overrides):
        OmegaConf.update(recorded, key, OmegaConf.select(cfg, key), merge=False)
    check_unchanged(recorded, Path(cfg.run_dir))
    return recorded


def recorded_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{run_dir} holds a run but no config.yaml: it cannot be resumed. Choose a new run_dir; "
                          f"nothing in {run_dir} was touched.")
    try:
        recorded = OmegaConf.load(path)
        return OmegaConf.merge(run_schema(OmegaConf.to_container(recorded).get("learner")), recorded)
    except OmegaConfBaseException as e:  # written by another version of flywheel, or edited by hand
        raise RunDirError(f"{path} does not fit this version of flywheel ({type(e).__name__}: {e}), so the run "
                          f"cannot be resumed. Its episodes and checkpoints are intact: start a new run_dir (with "
                          f"policy.checkpoint= its newest checkpoint to go on from its policy).") from e


def check_unchanged(cfg: DictConfig, run_dir: Path) -> None:
    """A ConfigError if ``cfg`` differs from the run's recorded config outside RESUMABLE."""
    recorded = OmegaConf.to_container(recorded_config(run_dir), resolve=True)
    given = OmegaConf.to_container(cfg, resolve=True)
    changed = [k for k in _leaves(given) | _leaves(recorded)
               if not resumable(k) and _at(given, k) != _at(recorded, k)]
    if changed:
        shown = ", ".join(f"{k}: {_at(recorded, k)!r} -> {_at(given, k)!r}" for k in sorted(changed))
        raise ConfigError(
            f"{run_dir} holds a run, which `flywheel run` resumes with the config it started with; this one differs "
            f"in {shown}. A resumed run may change only {', '.join(k.rstrip('.') for k in RESUMABLE[1:])}. For "
            f"other settings choose a new run_dir; nothing in {run_dir} was touched.")


def _leaves(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, dict):
        return {leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}{k}.")}
    return {prefix.rstrip(".")}


def _at(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / STATE_FILE, json.dumps(state).encode())


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The last resumable point, or None when the run stopped before its first iteration ended."""
    path = run_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # written atomically, so only damage after the fact does this
        raise RunDirError(f"{path} is damaged ({e}): the run cannot be resumed from it. Its episodes and "
                          f"checkpoints are intact; start a new run_dir (policy.checkpoint= the newest "
                          f"{run_dir}/checkpoints/policy-*.safetensors continues from its policy).") from e


def loop_episodes(store: EpisodeStore, seed_index: callable, next_index: int, keep: int
                  ) -> tuple[list[Episode], list[Episode]]:
    """The run's practice episodes in the store: (the newest ``keep`` of those the learner already learned from,
    oldest first; those of the iteration in flight, which it had not). ``seed_index(seed)`` gives a practice
    episode's seed index (None for any other episode); indices below ``next_index`` were learned from, those from
    it on were in flight (an iteration's, and the practice its actors went on with: ``rollout.keep_collecting``)."""
    done, in_flight = [], []
    for path, meta in store.lineage("train"):
        index = seed_index(meta["seed"]) if meta.get("policy_version", -1) >= 0 else None
        if index is None:
            continue
        if index < next_index:  # in the order the loop collected them (and the learner took them)
            done.append((collection_order(meta["seed"], meta.get("info", {})), path))
        else:
            in_flight.append(path)
    done = [path for *_, path in sorted(done)[-keep:]] if keep > 0 else []
    labels = store.labels()
    read = lambda paths: [store.read(p, labels.get(p.stem)) for p in paths]  # noqa: E731
    return read(done), read(in_flight)


def elapsed(state: dict[str, Any] | None, started: float) -> float:
    """Seconds the run has spent: its earlier attempts' (as of their last resumable point) and this one's."""
    return (state or {}).get("elapsed_s", 0.0) + time.time() - started
