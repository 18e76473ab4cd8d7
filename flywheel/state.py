"""Where a run stands: the loop's state (carried across processes by ``to_json``, so a run resumes) and its budget."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from flywheel.audit import AuditResult
from flywheel.evaluation import Evaluation
from flywheel.gate import GateDecision


@dataclasses.dataclass
class Budget:
    """Stop when wall clock, iterations or env steps run out. ``reserve_s`` keeps time for the final evaluation."""

    deadline: float  # time.time() by which the run must be done
    max_iterations: int = 0
    max_env_steps: int = 0
    max_episodes: int = 0
    stop_requested: str | None = None  # why the run was asked to stop early (a signal's name); set from outside

    def allows(self, iteration: int, env_steps: int, next_iteration_s: float, reserve_s: float,
               episodes: int = 0) -> bool:
        if self.stop_requested:
            return False
        if self.max_iterations and iteration >= self.max_iterations:
            return False
        if self.max_env_steps and env_steps >= self.max_env_steps:
            return False
        if self.max_episodes and episodes >= self.max_episodes:
            return False
        return time.time() + next_iteration_s + reserve_s <= self.deadline


@dataclasses.dataclass
class LoopState:
    """Where the loop stands. ``to_json``/``from_json`` carry it across processes (a resumed run); weights are not
    in it: they are checkpoints, named by version."""

    iteration: int = 0
    episodes: int = 0
    env_steps: int = 0
    next_train_index: int = 0  # the next training seed index: seeds are never reused
    evaluations: list[Evaluation] = dataclasses.field(default_factory=list)
    robust: list[Evaluation] = dataclasses.field(default_factory=list)  # the robustness split's: start and end
    audits: list[AuditResult] = dataclasses.field(default_factory=list)  # one per iteration (before any retrain)
    alarms: int = 0
    paused_updates: int = 0
    detector_versions: list[str] = dataclasses.field(default_factory=list)  # every detector that labelled
    rollbacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    promotions: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # periodic retraining's decisions
    best: tuple[int, float, dict] | None = None  # (version, held-out success, weights) of the best evaluated policy
    gates: list[GateDecision] = dataclasses.field(default_factory=list)  # the promotion gate's decisions
    deployed: tuple[int, tuple[int, ...], dict] | None = None  # (version, gate outcomes, weights) the actors run
    deployed_judged_by: str | None = None  # who judged the deployed version's gate outcomes (ground_truth, a detector)
    recoveries: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the learner diverged (NaN/inf)
    diverged_in_a_row: int = 0

    def to_json(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("evaluations", "robust"):
            plain[name] = [{**dataclasses.asdict(e), "outcomes": e.outcomes_text} for e in getattr(self, name)]
        plain["audits"] = [dataclasses.asdict(a) for a in self.audits]
        plain["gates"] = [dataclasses.asdict(g) for g in self.gates]
        plain["best"] = None if self.best is None else list(self.best[:2])
        plain["deployed"] = None if self.deployed is None else [self.deployed[0], list(self.deployed[1])]
        return plain

    @classmethod
    def from_json(cls, plain: dict[str, Any], weights_of: Callable[[int], dict]) -> "LoopState":
        """``weights_of(version)``: the policy weights of a version (its checkpoint)."""
        state = cls(**{k: v for k, v in plain.items() if k not in ("evaluations", "robust", "audits", "gates",
                                                                  "best", "deployed")})
        for name in ("evaluations", "robust"):  # (a run saved before the robustness split has no "robust")
            setattr(state, name, [Evaluation(**{**e, "ci95": tuple(e["ci95"]),
                                                "outcomes": tuple(map(int, e["outcomes"]))})
                                  for e in plain.get(name, [])])
        state.audits = [AuditResult(**a) for a in plain["audits"]]
        state.gates = [GateDecision(**g) for g in plain["gates"]]
        if plain["best"] is not None:
            state.best = (plain["best"][0], plain["best"][1], weights_of(plain["best"][0]))
        if plain["deployed"] is not None:
            version, outcomes = plain["deployed"]
            state.deployed = (version, tuple(outcomes), weights_of(version))
        return state

    def protected_versions(self) -> tuple[int, ...]:
        """Versions whose checkpoints must outlive the newest K: the deployed one and the best evaluated."""
        return tuple(v for v in (self.deployed and self.deployed[0], self.best and self.best[0]) if v is not None)
