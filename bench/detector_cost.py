"""What the detector's session-5 additions cost where the loop pays for them: labelling one iteration's episodes,
and one training step. Baseline, in the same run: the last-frame, single-member detector.

    PYTHONPATH=. .venv/bin/python bench/detector_cost.py

Each figure is the best of 3 repeats (the machines are shared and noisy); ratios are against the baseline's.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from flywheel.contracts import Label
from reward.detector import DetectorNet, DetectorNetConfig, LearnedSuccessDetector
from reward.train import train_detector


def best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(2)
    eps = run_episodes([split_seed("train", i) for i in range(512)], "train", None, policy_version=-1)
    for ep in eps:
        ep.labels.append(Label(source="ground_truth", success=bool(ep.ground_truth["success"])))
    rows = []
    for window, members in [(1, 1), (3, 1), (3, 3)]:
        torch.manual_seed(0)
        cfg = DetectorNetConfig(window=window)
        detector = LearnedSuccessDetector([DetectorNet(cfg) for _ in range(members)], "bench")
        label_s = best(lambda: detector.score(eps))
        train_s = best(lambda: train_detector(eps[:64], eps[:8], version="b", steps=20, cfg=cfg, ensemble=members),
                       repeats=2)
        rows.append((window, members, label_s, train_s))
    base_label, base_train = rows[0][2], rows[0][3]
    print("| window | members | label 512 episodes | ratio | 20 training steps (incl. examples) | ratio |")
    print("|---|---|---|---|---|---|")
    for window, members, label_s, train_s in rows:
        print(f"| {window} | {members} | {label_s:.2f} s | {label_s / base_label:.2f} | {train_s:.2f} s | "
              f"{train_s / base_train:.2f} |")


if __name__ == "__main__":
    main()
