"""Where the parts run: Ray started or joined, and the actors and the learner placed by the resources they ask for.

Ray and its dashboard listen on localhost or a private network, never the open internet; a resource no node offers is
a ConfigError naming the ``ray start`` that would offer it, before any actor waits for a place that never comes.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from flywheel.config import ConfigError, to_dict


def start_ray(cfg: DictConfig, say: Callable[[str], None]) -> None:
    """Join the cluster at ``ray.address``, or start Ray on this machine (its dashboard on localhost if asked).

    ``ray.init`` puts in its own SIGTERM handler (a stack dump, then ``sys.exit``); a handler the caller had set in
    Python (the command's, flywheel/cli.py sigterm_interrupts) is put back, so that SIGTERM still says what the run
    kept and how to go on."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        _start_ray(cfg, say)
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _start_ray(cfg: DictConfig, say: Callable[[str], None]) -> None:
    import ray

    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=False, configure_logging=False)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        say(f"ray: joined {cfg.ray.address}: {len(nodes)} nodes, {ray.cluster_resources()}")
        return
    # Ray's own servers (GCS, raylet) listen on every interface: Ray 2.60 has no setting that binds them to
    # 127.0.0.1. What keeps the network out is Ray's token authentication, which ray.init turns on for a new local
    # cluster unless RAY_AUTH_MODE says otherwise: a process without this machine's token (~/.ray/auth_token, made
    # on first use) is refused. (Setting RAY_AUTH_MODE=token here instead would stop Ray making the token.)
    try:
        started = ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=cfg.ray.dashboard,
                           dashboard_host="127.0.0.1", log_to_driver=False, configure_logging=False)
    except ValueError as e:
        if "existing cluster" not in str(e):
            raise
        raise ConfigError(  # ray.init joins a cluster that `ray start` began on this machine, if it finds one
            "a Ray cluster started with `ray start` is running on this machine (or one that was killed left "
            "/tmp/ray/ray_current_cluster behind), and a run without ray.address starts its own. Give ray.address=auto "
            "to run on that cluster, or stop it with `ray stop`.") from e
    if os.environ.get("RAY_AUTH_MODE") == "token":
        token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if token.is_file() and token.stat().st_mode & 0o077:
            token.chmod(0o600)  # Ray writes it readable by every user of the machine
    else:
        say(f"ray: token authentication is off (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE')}): anyone who can "
            f"reach this machine's Ray ports can run code here")
    if cfg.ray.dashboard:
        say(f"ray: dashboard at http://{getattr(started, 'dashboard_url', None) or '127.0.0.1:8265'}")


def check_resources(wanted: dict, offered: dict, who: str = "rollout") -> None:
    """A ConfigError, before any actor waits forever, when no node offers a resource the actors (``who``) need."""
    missing = {k: v for k, v in dict(wanted).items() if offered.get(k, 0) < v}
    if missing:
        start = ("--num-gpus=1" if "GPU" in missing else
                 f"--resources='{{\"{next(iter(k for k in missing if k != 'GPU'))}\": 1}}'")
        raise ConfigError(
            f"{who}.resources={dict(wanted)}, but the Ray cluster offers {dict(offered)}: no node has "
            f"{sorted(missing)}. Start the hosts that have them with `ray start --address=HEAD:6379 {start}` and "
            f"give ray.address=HEAD:6379, or drop the setting.")


def start_remote_learner(cfg: DictConfig, factory, on_restart):
    """``placement.remote=true``: the learner as a Ray actor, placed by placement.gpus / placement.resources."""
    import ray

    from learner.remote import RemoteLearner

    if not cfg.rollout.use_ray:
        raise ConfigError("placement.remote=true needs Ray: drop rollout.use_ray=false (or set placement.remote=false)")
    check_learner_fits(cfg, ray.cluster_resources())
    p = cfg.placement
    return RemoteLearner(factory, device=p.device, cpus=p.cpus, gpus=p.gpus, resources=to_dict(p.resources),
                         call_timeout_s=p.call_timeout_s,
                         on_restart=on_restart)


def check_learner_fits(cfg: DictConfig, offered: dict) -> None:
    """A ConfigError, before the learner actor waits for a place that will never come: a resource no node offers,
    or more CPUs than the cluster has once the rollout actors hold theirs (a 2-core laptop with the defaults)."""
    p = cfg.placement
    check_resources({**({"GPU": p.gpus} if p.gpus else {}), **to_dict(p.resources)}, offered, who="placement")
    rollout = cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
    if rollout + p.cpus > offered.get("CPU", 0) + 1e-9:
        raise ConfigError(
            f"placement.cpus={p.cpus:g} does not fit: the rollout actors hold {rollout:g} of the cluster's "
            f"{offered.get('CPU', 0):g} CPUs (rollout.num_workers={cfg.rollout.num_workers} x "
            f"rollout.cpus_per_worker={cfg.rollout.cpus_per_worker:g}). Lower placement.cpus (0 shares the CPUs, as a "
            f"learner in the driver does) or rollout.cpus_per_worker, or join a cluster with more (ray.address).")
