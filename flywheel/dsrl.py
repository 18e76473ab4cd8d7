"""DSRL as a policy plug-in (``policy.name=dsrl policy.checkpoint=ws://host:port``, with ``learner=ppo``): RL on a
policy served on another machine, without its gradients. The learner trains a small noise policy
(flywheel/vla/noise.py) that picks the starting noise of the served flow policy's sampler (the protocol's ``noise``
field, which ``flywheel serve`` honours); the served policy stays frozen. The rollout actors run
``actors.steered.SteeredPolicy``: the noise policy here, the flow over there.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from actors.remote_policy import server_url
from actors.steered import steered
from flywheel.config import ConfigError
from flywheel.contracts import PolicyBundle
from flywheel.remote import ask
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import VLAConfig
from flywheel.vla.noise import NoisePolicy


def dsrl(checkpoint: str, eval_noise: float | None = None, encoder: str = "base", seed: int = 0,
         **options) -> PolicyBundle:
    """``checkpoint``: the server's address. ``encoder``: "base" starts the noise policy's encoder from the shipped
    small VLA's (which already reads the built-in tasks' scenes and instructions), "" from random weights.
    ``options``: RemotePolicy's keyword arguments (``policy.options``), as for ``policy.name=remote``."""
    url = server_url(checkpoint)
    probe, told = ask(url, options)
    if told.get("takes_noise") is False:
        raise ConfigError(f"the policy served at {url} takes no starting noise (it says takes_noise=false: an action "
                          f"token head): DSRL steers a flow policy's noise")
    chunk, dims = told.get("noise_shape") or (probe.chunk, probe.action_dim)
    image = told.get("image_shape") or [64, 64, 3]
    cfg = VLAConfig(image_size=int(image[0] or 64), sensors=tuple(probe.sensors), chunk=int(chunk),
                    action_dim=int(dims), proprio_dim=int(told.get("state_dim") or 3))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = NoisePolicy(cfg)
    if encoder:
        base_cfg, base, _ = load_policy_checkpoint(encoder)
        if (base_cfg.image_size, tuple(base_cfg.sensors), base_cfg.proprio_dim) != \
                (cfg.image_size, cfg.sensors, cfg.proprio_dim):
            raise ConfigError(f"policy.options.encoder={encoder!r} reads {base_cfg.image_size}-px {base_cfg.sensors} "
                              f"and {base_cfg.proprio_dim} proprio dims, the served policy "
                              f"{cfg.image_size}-px {cfg.sensors} and {cfg.proprio_dim}: give encoder='' (random)")
        model.encoder.load_state_dict({k[len("encoder."):]: torch.from_numpy(v) for k, v in base.items()
                                       if k.startswith("encoder.")})
    shape = {"sensors": probe.sensors, "chunk": probe.chunk, "action_dim": probe.action_dim}
    return PolicyBundle(weights=model.get_weights(), sensors=tuple(probe.sensors),
                        meta={"description": f"DSRL noise policy steering the policy served at {url}",
                              "server": told, **({"eval_noise": told["eval_noise"]} if "eval_noise" in told else {})},
                        make_model=functools.partial(NoisePolicy, cfg),
                        make_actor=functools.partial(steered, url, cfg, **{**options, **shape}),
                        record={"dsrl": url, "noise_policy": dataclasses.asdict(cfg)})
