"""The vision-language encoder's memory layout (session 11): a training step of the policy and of the success
detector with the encoder as it is, against the same step with the encoder as it was before (kept below), in the
same process, interleaved, best of 5.

    PYTHONPATH=. .venv/bin/python bench/encoder_layout.py

What changed (flywheel/vla/model.py): the pixels are built channels-last in one pass (the patch convolution and the
pooling run several times faster on that layout than on NCHW, the more so with more channels: the detector reads
20, a window of 3 frames from 2 cameras plus the coordinate planes), and the keypoint attention runs one head at a
time on strided views of the keys instead of copying them into a per-head layout. The outputs are the same (to
float rounding); the weights and checkpoints are unchanged.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from bench.common import best_of, training_steps, write_result
from flywheel.vla.checkpoint import load_policy_checkpoint
from flywheel.vla.model import PixelKeypoints, VisionLanguageEncoder
from reward.detector import DetectorNet, DetectorNetConfig


def pixels_before(self, images):
    x = images.permute(0, 3, 1, 2).float() / 255.0 - 0.5
    planes = self.coord_planes.permute(0, 3, 1, 2)
    return torch.cat([x, planes.expand(x.shape[0], -1, -1, -1)], dim=1)


def patches_before(self, pixels):
    x = F.gelu(self.patchify(pixels))
    x = x + self.context(x)
    return x.flatten(2).transpose(1, 2) + self.patch_pos


def keypoints_before(self, x, pixels):
    b, lq, _ = x.shape
    cells = F.avg_pool2d(pixels, 2).flatten(2).transpose(1, 2)
    xy = cells[..., -2:]
    k = self.ln_k(self.keys(cells[..., :-2])).view(b, -1, self.heads, self.key_dim).permute(0, 2, 3, 1)
    q = self.q(self.ln(x)).view(b, lq, self.heads, self.key_dim).transpose(1, 2)
    q = q * (self.log_scale.exp() / math.sqrt(self.key_dim))
    attn = torch.softmax(q @ k, dim=-1)
    where = (attn @ xy[:, None]).transpose(1, 2).reshape(b, lq, 2 * self.heads)
    return x + self.out(where), where.flatten(1)


NOW = (VisionLanguageEncoder.pixels, VisionLanguageEncoder.patches, PixelKeypoints.forward)
BEFORE = (pixels_before, patches_before, keypoints_before)


def use(impl) -> None:
    VisionLanguageEncoder.pixels, VisionLanguageEncoder.patches, PixelKeypoints.forward = impl


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    policy, _ = load_policy_checkpoint("base", as_model=True)
    p_opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    images = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8, generator=gen)
    ids = policy.tokenize(["push the red block onto the green pad"] * 64)
    proprio, actions = torch.rand(64, 3, generator=gen), torch.rand(64, 8, 3, generator=gen) * 2 - 1

    detector = DetectorNet(DetectorNetConfig(sensors=("overhead", "wrist"), window=3))
    d_opt = torch.optim.AdamW(detector.parameters(), lr=1e-6)
    frames = torch.randint(0, 256, (64, 64, 64, 18), dtype=torch.uint8, generator=gen)

    def policy_steps() -> None:
        training_steps(p_opt, lambda: policy.action_loss(images, ids, proprio, actions))

    def detector_steps() -> None:
        training_steps(d_opt, lambda: detector(frames, ids).sum())

    with torch.no_grad():
        use(BEFORE)
        ref = policy.encoder(images[:8], ids[:8], proprio[:8]), detector(frames[:8], ids[:8])
        use(NOW)
        new = policy.encoder(images[:8], ids[:8], proprio[:8]), detector(frames[:8], ids[:8])
    differ = max(float((a - b).abs().max()) for a, b in zip(ref, new))
    times = {"policy": {"now": [], "before": []}, "detector": {"now": [], "before": []}}
    for _ in range(5):  # interleaved: a slow spell of the machine falls on both
        for name, impl in (("now", NOW), ("before", BEFORE)):
            use(impl)
            times["policy"][name].append(best_of(policy_steps, 1) / 5)
            times["detector"][name].append(best_of(detector_steps, 1) / 5)
    use(NOW)
    ms = {who: {k: min(v) * 1e3 for k, v in t.items()} for who, t in times.items()}
    for who in ("policy", "detector"):
        write_result(f"encoder_layout_{who}", ms[who]["before"] / ms[who]["now"], None, None,
                     what=f"seconds of a {who} training step (batch 64, forward + backward + AdamW) with the encoder "
                          f"as it was before session 11 / as it is now, same process, interleaved, best of 5",
                     step_ms=ms[who]["now"], step_ms_before=ms[who]["before"], max_output_difference=differ)


if __name__ == "__main__":
    main()
