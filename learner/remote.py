"""The learner in a process of its own: a Ray actor, placed by resources (the GPU node of a cluster), behind the
same ``Learner`` contract as a learner in the driver (``placement.remote=true``).

Why a process of its own: on a cluster the learner belongs on the GPU node, not beside the driver; and a learner
that dies in the night (killed, out of memory) must cost one update, not the run.

Faults. Every call has a deadline (``call_timeout_s``). A learner actor that dies or misses it is killed and a new
one is started from the same factory; ``on_restart`` (the run layer) then puts it back where the run was: the
deployed checkpoint (weights, optimizer, generators, version) and the replay buffer refilled from the episode store.
An ``update`` that was under way is lost (``LearnerLost``: the loop records it and goes on); any other call is made
again on the new actor. A learner that cannot start at all (no node offers what it asks for) is a
``LearnerStartError`` naming what it asked for and what the cluster offers.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

from flywheel.contracts import Learner, LearnerLost


class LearnerStartError(RuntimeError):
    """The learner actor did not start: no node offers what it needs, or building the learner failed."""


class _LearnerHost:
    """The actor: builds the learner on its node (on ``device``) and runs its methods."""

    def __init__(self, factory: Callable[[str], Learner], device: str, threads: int):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.learner = factory(device)  # the factory resolves "auto" (the run's build_learner)

    def call(self, name: str, *args) -> tuple[Any, int]:
        return getattr(self.learner, name)(*args), self.learner.version

    def update(self, episodes) -> tuple[Any, int]:  # its own method, so the process is titled ray::...update
        return self.call("update", episodes)

    def version(self) -> int:
        return self.learner.version

    def where(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.learner.model.device)}


class RemoteLearner:
    """A ``Learner`` whose every method runs in a Ray actor. ``factory(device)`` builds the learner there (it must
    pickle: a module-level function, or a functools.partial of one). ``version`` is the learner's, as of the last
    call."""

    def __init__(self, factory: Callable[[str], Learner], *, device: str = "auto", cpus: float = 1.0,
                 gpus: float = 0.0, resources: dict[str, float] | None = None, call_timeout_s: float = 3600.0,
                 start_timeout_s: float = 600.0, on_restart: Callable[[RemoteLearner], None] | None = None):
        import ray

        self.call_timeout_s, self.start_timeout_s = call_timeout_s, start_timeout_s
        self.on_restart = on_restart
        self.asked = {"CPU": cpus, "GPU": gpus, **dict(resources or {})}
        self._remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0,
                                  **({"resources": dict(resources)} if resources else {}))(_LearnerHost)
        self._args = (factory, device, max(1, round(cpus)) if cpus else 0)
        self.restarts = 0
        self.faults: list[dict] = []
        self.version = -1
        self._start()

    def _start(self) -> None:
        import ray

        self._actor = self._remote.remote(*self._args)
        try:  # a new process, torch, the learner's demonstrations: allow for them
            self.placement = ray.get(self._actor.where.remote(), timeout=self.start_timeout_s)
            self.version = ray.get(self._actor.version.remote(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError as e:
            ray.kill(self._actor, no_restart=True)
            raise LearnerStartError(
                f"the learner actor did not start within {self.start_timeout_s:g} s. It asks for {self.asked} "
                f"(placement.cpus, placement.gpus, placement.resources); the cluster offers {ray.cluster_resources()}, of "
                f"which {ray.available_resources()} are free. Start a node that offers them (e.g. a GPU node with "
                f"`ray start --address=HEAD:6379 --num-gpus=1`), lower them, or set placement.remote=false.") from e
        except ray.exceptions.RayError as e:
            raise LearnerStartError(f"the learner actor failed to start: {e}") from e

    def _call(self, name: str, *args):
        import ray

        try:
            ref = self._actor.update.remote(*args) if name == "update" else self._actor.call.remote(name, *args)
            out, self.version = ray.get(ref, timeout=self.call_timeout_s)
            return out
        except ray.exceptions.RayTaskError as e:  # the learner raised: an error of its own, passed on as it is
            raise e.as_instanceof_cause() from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            why = (f"no answer within {self.call_timeout_s:g} s (placement.call_timeout_s)"
                   if isinstance(e, ray.exceptions.GetTimeoutError) else f"{type(e).__name__}: the process died")
            self._restart(f"{name}: {why}")
            if name == "update":
                raise LearnerLost(f"the learner was lost during an update ({why}); it was restarted from the deployed "
                                  f"checkpoint (v{self.version}), and this update is lost") from e
            out, self.version = ray.get(self._actor.call.remote(name, *args), timeout=self.call_timeout_s)
            return out

    def _restart(self, why: str) -> None:
        import ray

        ray.kill(self._actor, no_restart=True)
        self._start()
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self)
        self.faults.append({"time": time.time(), "learner": self.placement, "error": why, "action": "restarted",
                            "restored": self.version})

    # ---- the Learner contract ------------------------------------------------------------------------------------
    def update(self, episodes):
        return self._call("update", episodes)

    def snapshot(self):
        return self._call("snapshot")

    def restore(self, weights) -> None:
        self._call("restore", weights)

    def resume_from(self, weights, training) -> None:
        self._call("resume_from", weights, training)

    def training_state(self):
        return self._call("training_state")

    def load_training_state(self, state) -> None:
        self._call("load_training_state", state)

    def refill(self, episodes) -> None:
        self._call("refill", episodes)

    def close(self) -> None:
        import ray

        ray.kill(self._actor, no_restart=True)
