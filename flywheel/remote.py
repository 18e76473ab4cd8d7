"""A served policy as a policy plug-in (``policy.name=remote policy.checkpoint=ws://host:port``): the rollout actors
act through ``actors.remote_policy.RemotePolicy`` against a policy server (``flywheel serve``, or openpi's)."""

from __future__ import annotations

import functools

from actors.remote_policy import PolicyServerError, RemotePolicy, server_url
from flywheel.config import ConfigError
from flywheel.contracts import PolicyBundle


def remote(checkpoint: str, eval_noise: float | None = None, **options) -> PolicyBundle:
    """``checkpoint``: the server's address, ``ws://host:port`` (or ``host:port``). It is asked for its metadata now
    (chunk, action dim, sensors); the API key comes from ``FLYWHEEL_API_KEY``. ``options`` (``policy.options``):
    RemotePolicy's keyword arguments, e.g. ``{chunk: 10, action_dim: 7, sensors: [overhead, wrist], keys: {wrist:
    observation/wrist_image}}`` for an openpi server, whose metadata says none of these, or ``timeout_s``.
    ``eval_noise`` is the server's to choose (``flywheel serve eval.noise=...``): what it says it uses is recorded as
    the policy's ``eval_noise``, so a run evaluating otherwise says their figures do not compare."""
    url = server_url(checkpoint)
    probe, told = ask(url, options)
    described = " ".join(str(told[k]) for k in ("policy", "checkpoint") if told.get(k))
    meta = {"description": f"served at {url}" + (f" ({described})" if described else ""), "server": told,
            **({"eval_noise": told["eval_noise"]} if "eval_noise" in told else {})}
    shape = {"sensors": probe.sensors, "chunk": probe.chunk, "action_dim": probe.action_dim}
    return PolicyBundle(weights={}, sensors=probe.sensors, meta=meta, make_model=functools.partial(no_model, url),
                        make_actor=functools.partial(RemotePolicy, url, **{**options, **shape}),
                        record={"remote": url})


def ask(url: str, options: dict) -> tuple[RemotePolicy, dict]:
    """(a RemotePolicy shaped by the server's metadata and ``options``, that metadata), asked now so that a wrong
    address or a server not started fails before the run does, saying so."""
    try:
        probe = RemotePolicy(url, **options)
        if not probe.metadata:  # everything was given: ask the server anyway
            probe._connect()
    except PolicyServerError as e:
        raise ConfigError(f"policy.checkpoint={url}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"policy.options: {e} (they are RemotePolicy's keyword arguments)") from e
    probe.close()
    return probe, dict(probe.metadata)


def no_model(url: str):
    raise ConfigError(f"policy.name=remote acts through the policy served at {url}: its weights stay on that server, "
                      f"so there are no gradients here for a learner to train. A served policy can be evaluated and "
                      f"can collect episodes (rollouts, the detector's data); reinforcement learning on it (DSRL: "
                      f"steering the flow's starting noise) is coming")
