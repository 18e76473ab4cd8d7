"""What the detector's additions cost where the loop pays for them: labelling one iteration's episodes, and one
training step (a window of frames and an ensemble, session 5; the wrist camera, session 6), and what recording and
storing the wrist camera costs. Baselines, in the same run: the last-frame, single-member, overhead-camera detector;
episodes recorded and stored with the overhead camera alone.

    PYTHONPATH=. .venv/bin/python bench/detector_cost.py

Each figure is the best of 3 repeats (the machines are shared and noisy); ratios are against the baseline's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from actors.rollout import run_episodes
from actors.tabletop import split_seed
from bench.common import best_of as best
from flywheel.contracts import Label
from flywheel.store import EpisodeStore
from reward.detector import DetectorNet, DetectorNetConfig, LearnedSuccessDetector
from reward.train import Training, train_detector


def main() -> None:
    import tempfile

    torch.set_num_threads(2)
    seeds = [split_seed("train", i) for i in range(512)]
    both = ("overhead", "wrist")
    record = {sensors: best(lambda s=sensors: run_episodes(seeds[:128], "train", None, policy_version=-1, sensors=s),
                            repeats=2) for sensors in (("overhead",), both)}
    eps = run_episodes(seeds, "train", None, policy_version=-1, sensors=both)
    for ep in eps:
        ep.labels.append(Label(source="ground_truth", success=bool(ep.ground_truth["success"])))
    store = {}
    for sensors in (("overhead",), both):
        view = [dataclasses.replace(ep, observations={k: v for k, v in ep.observations.items()
                                                      if k != "wrist" or "wrist" in sensors}) for ep in eps[:128]]

        def write(view=view):
            with tempfile.TemporaryDirectory() as d:
                s = EpisodeStore(d)
                for ep in view:
                    s.add(ep)
        store[sensors] = best(write, repeats=2)
    rows = []
    for window, members, sensors in [(1, 1, ("overhead",)), (3, 1, ("overhead",)), (3, 3, ("overhead",)), (3, 1, both)]:
        torch.manual_seed(0)
        cfg = DetectorNetConfig(window=window, sensors=sensors)
        detector = LearnedSuccessDetector([DetectorNet(cfg) for _ in range(members)], "bench")
        label_s = best(lambda: detector.score(eps))
        train_s = best(lambda: train_detector(eps[:64], eps[:8], version="b", cfg=cfg,
                                                     training=Training(steps=20, ensemble=members)),
                       repeats=2)
        rows.append((window, members, "+".join(sensors), label_s, train_s))
    base_label, base_train = rows[0][3], rows[0][4]
    print("| window | members | cameras | label 512 episodes | ratio | 20 training steps (incl. examples) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for window, members, cameras, label_s, train_s in rows:
        print(f"| {window} | {members} | {cameras} | {label_s:.2f} s | {label_s / base_label:.2f} | {train_s:.2f} s | "
              f"{train_s / base_train:.2f} |")
    print()
    print("| cameras recorded | 128 expert episodes | ratio | store them | ratio |")
    print("|---|---|---|---|---|")
    for sensors in (("overhead",), both):
        print(f"| {'+'.join(sensors)} | {record[sensors]:.2f} s | {record[sensors] / record[('overhead',)]:.2f} | "
              f"{store[sensors]:.2f} s | {store[sensors] / store[('overhead',)]:.2f} |")


if __name__ == "__main__":
    main()
