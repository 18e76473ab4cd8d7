"""A policy plug-in for the robot tests: the shipped small VLA, misbehaving once in practice as a real one might
(``policy.name=tests.robot_parts:misbehaving``): at its ``nan_at``-th practice call it answers NaN for one robot,
and at its ``stall_at``-th it stalls ``stall_s`` seconds before answering (a slow GPU, a garbage collection)."""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from flywheel.vla.bundle import small_vla


class Misbehaving:
    def __init__(self, inner, nan_at: int, stall_at: int, stall_s: float):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "plan", {"nan_at": nan_at, "stall_at": stall_at, "stall_s": stall_s, "calls": 0})

    def act(self, images, proprio, instructions, seed=None, **kw):
        out = self.inner.act(images, proprio, instructions, seed=seed, **kw)
        p = self.plan
        if self.inner.explore:
            p["calls"] += 1
            if p["calls"] == p["nan_at"]:
                out = out.copy()
                out[0] = np.nan
            if p["calls"] == p["stall_at"]:
                time.sleep(p["stall_s"])
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):  # explore, sampling: the worker sets them on the policy it holds
        setattr(self.inner, name, value)


def misbehaving(checkpoint: str = "base", eval_noise: float | None = None, nan_at: int = 2, stall_at: int = 4,
                stall_s: float = 0.5):
    bundle = small_vla(checkpoint, eval_noise)
    return dataclasses.replace(bundle, make_actor=functools.partial(_make, bundle.make_actor, nan_at, stall_at,
                                                                    stall_s))


def _make(make, nan_at: int, stall_at: int, stall_s: float) -> Misbehaving:
    return Misbehaving(make(), nan_at, stall_at, stall_s)
