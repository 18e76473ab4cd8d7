"""The keypoint attention over colours instead of cells (session 12): a training step of the policy and of the
success detector, and the policy's inference, with the attention grouped by colour (as it is) against the same
computed over every cell (as it was), in the same process, interleaved, best of 5.

    PYTHONPATH=. .venv/bin/python bench/keypoint_colours.py

What changed (flywheel/vla/model.py PixelKeypoints, colour_groups): a cell's key is made from its colour alone, so in
a flat-shaded scene (the built-in tabletop: ~100 distinct 2x2-cell colours in a batch of 64 images, against 65,536
cells) the keys are computed once per colour, and the softmax over cells becomes a softmax over colours weighted by
their cell counts, read out at each colour's mean position. The same function, to float rounding; the weights and
checkpoints are unchanged. A textured scene, where colours are many, falls back to the cells: the last figure is
what falling back costs there (random images). The detector's window of 3 frames from two cameras has ~1,700
distinct colours in a batch, more than an image's 1,024 cells, so it falls back to the cells too: its figure is the
control, ~1 (after a miss a layer waits 64 calls before it checks again, so the check costs nearly nothing). A window
from one camera (~400 colours) is grouped: ``detector_one_camera`` (session 25; before it, a detector never tried).

Inputs are real episodes (expert demonstrations, both cameras), as the learner and the detector see them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

import flywheel.vla.model as vla_model
from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import best_of, training_steps, write_result
from flywheel.contracts import sensor_inputs
from flywheel.vla.checkpoint import load_policy_checkpoint
from reward.detector import DetectorNet, DetectorNetConfig, window_frames

GROUPED = vla_model.colour_groups


def cells(colour, limit):  # noqa: ARG001 (the signature it replaces)
    return None  # never grouped: every cell computed, as before session 12


def use(impl) -> None:
    vla_model.colour_groups = impl


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    eps = run_episodes([split_seed("train", i) for i in range(16)], "train", None, policy_version=-1,
                       sensors=("overhead", "wrist"))
    picks = [(ep, int(rng.integers(ep.num_steps))) for ep in (eps[i % len(eps)] for i in range(64))]
    policy, _ = load_policy_checkpoint("base", as_model=True)
    p_opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    images = torch.from_numpy(np.stack([sensor_inputs(ep.observations, ("overhead",), [t])[0][0] for ep, t in picks]))
    ids = policy.tokenize([ep.instruction for ep, _ in picks])
    proprio, actions = torch.rand(64, 3, generator=gen), torch.rand(64, 8, 3, generator=gen) * 2 - 1
    textured = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=gen)

    detector = DetectorNet(DetectorNetConfig(sensors=("overhead", "wrist"), window=3))
    d_opt = torch.optim.AdamW(detector.parameters(), lr=1e-6)
    frames = torch.from_numpy(np.stack([window_frames(ep.observations, ("overhead", "wrist"), t, window=3)
                                        for ep, t in picks]))
    one_camera = DetectorNet(DetectorNetConfig(sensors=("overhead",), window=3))
    o_opt = torch.optim.AdamW(one_camera.parameters(), lr=1e-6)
    one_frames = torch.from_numpy(np.stack([window_frames(ep.observations, ("overhead",), t, window=3)
                                            for ep, t in picks]))

    def distinct(encoder, x) -> int:
        colour = F.avg_pool2d(encoder.pixels(x), 2).permute(0, 2, 3, 1).flatten(1, 2)[..., :-2]
        return len(GROUPED(colour, limit=colour.numel())[0])

    palette = {"policy": distinct(policy.encoder, images), "detector": distinct(detector.encoder, frames),
               "detector_one_camera": distinct(one_camera.encoder, one_frames)}

    def policy_steps(x=images) -> None:
        training_steps(p_opt, lambda: policy.action_loss(x, ids, proprio, actions))

    def detector_steps() -> None:
        training_steps(d_opt, lambda: detector(frames, ids).sum())

    def one_camera_steps() -> None:
        training_steps(o_opt, lambda: one_camera(one_frames, ids).sum())

    def acting(n: int = 5) -> None:  # one worker's batch of 16 environments
        for _ in range(n):
            policy.sample(images[:16], ids[:16], proprio[:16], generator=torch.Generator().manual_seed(0))

    jobs = {"policy": policy_steps, "detector": detector_steps, "detector_one_camera": one_camera_steps,
            "acting": acting,
            "textured": lambda: policy_steps(x=textured)}
    with torch.no_grad():
        outputs = {}
        for name, impl in (("grouped", GROUPED), ("cells", cells)):
            use(impl)
            outputs[name] = (policy.encoder(images, ids, proprio), detector(frames, ids),
                             one_camera(one_frames, ids))
    differ = max(float((a - b).abs().max()) for a, b in zip(outputs["grouped"], outputs["cells"]))
    times = {job: {"grouped": [], "cells": []} for job in jobs}
    layers = [m for net in (policy, detector, one_camera) for m in net.modules()
              if isinstance(m, vla_model.PixelKeypoints)]
    for _ in range(5):  # interleaved: a slow spell of the machine falls on both
        for name, impl in (("grouped", GROUPED), ("cells", cells)):
            use(impl)
            for job, fn in jobs.items():
                for layer in layers:  # each job as a model that has seen only its own inputs (after a miss, the
                    layer._skip = 0   # layer waits before checking again: the policy's textured job would leave
                    #                   the flat-shaded job that follows it on the cells)
                times[job][name].append(best_of(fn, 1) / 5)
    use(GROUPED)
    ms = {job: {k: min(v) * 1e3 for k, v in t.items()} for job, t in times.items()}
    what = {"policy": "a policy training step (batch 64, forward + backward + AdamW)",
            "detector": "a detector training step (batch 64, a window of 3 frames from 2 cameras)",
            "detector_one_camera": "a detector training step (batch 64, a window of 3 frames from the overhead camera)",
            "acting": "the policy sampling a chunk for 16 environments (10 flow steps)",
            "textured": "a policy training step on random (textured) images, where grouping falls back to cells"}
    for job in jobs:
        write_result(f"keypoint_colours_{job}", ms[job]["cells"] / ms[job]["grouped"], None, None,
                     what=f"seconds of {what[job]}: keypoints over every cell (before session 12) / grouped by "
                          f"colour (now), same process, interleaved, best of 5",
                     ms_grouped=ms[job]["grouped"], ms_cells=ms[job]["cells"], max_output_difference=differ,
                     distinct_colours=palette.get(job))


if __name__ == "__main__":
    main()
