"""Training and evaluating the success detector on labelled episodes.

Examples come from whole episodes: each episode's last frame with its label. A successful episode also gives a
hard negative for free: any earlier frame of it, which shows the moment *before* success (the built-in episodes end
at the first successful step, so no earlier state is a success). Such frames teach the detector the exact
predicate rather than "the policy looked busy".

Held-out metrics are computed on whole episodes the detector never trained on.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from flywheel.contracts import Episode
from reward.detector import DetectorConfig, DetectorNet, LearnedSuccessDetector


def episode_label(ep: Episode) -> bool | None:
    """The label to train on: the newest non-detector label (human > ground truth > demo marker, by recency)."""
    trusted = [lab for lab in ep.labels if lab.source != "detector"]
    if trusted:
        return max(trusted, key=lambda lab: lab.created).success
    return None


def detector_examples(
    episodes: list[Episode], rng: np.random.Generator, hard_negatives: bool = True
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(frames uint8 (N,H,W,3), instructions, labels float32 (N,)) from labelled episodes."""
    frames, texts, ys = [], [], []
    for ep in episodes:
        y = episode_label(ep)
        if y is None:
            continue
        imgs = ep.observations["image"]
        frames.append(imgs[-1])
        texts.append(ep.instruction)
        ys.append(float(y))
        if hard_negatives and y and len(imgs) > 2:
            frames.append(imgs[int(rng.integers(0, len(imgs) - 1))])
            texts.append(ep.instruction)
            ys.append(0.0)
    if not frames:
        raise ValueError("no labelled episodes to train the detector on: label episodes first (ground truth or human)")
    return np.stack(frames), texts, np.asarray(ys, np.float32)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    labels = labels.astype(bool)
    pred = scores >= threshold
    both = labels.any() and (~labels).any()
    return {
        "precision": float(precision_score(labels, pred, zero_division=0.0)),
        "recall": float(recall_score(labels, pred, zero_division=0.0)),
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "accuracy": float((pred == labels).mean()),
        "positives": int(labels.sum()),
        "n": int(len(labels)),
    }


def train_detector(
    train_episodes: list[Episode],
    heldout_episodes: list[Episode],
    *,
    version: str,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    cfg: DetectorConfig | None = None,
    threshold: float = 0.5,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[LearnedSuccessDetector, dict[str, float]]:
    """Train a detector on labelled episodes; report precision / recall / AUROC on the held-out episodes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames, texts, ys = detector_examples(train_episodes, rng)
    net = DetectorNet(cfg)
    ids = torch.from_numpy(net.tokenizer(texts)[0])
    frames_t, ys_t = torch.from_numpy(frames), torch.from_numpy(ys)
    pos_weight = torch.tensor(max(1.0, float((ys == 0).sum()) / max(1.0, float(ys.sum()))))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    net.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(ys_t), (batch_size,), generator=gen)
        img = frames_t[idx]
        # Random 90-degree rotations and flips: the predicate ("on the pad") does not depend on orientation.
        k = int(torch.randint(0, 4, (1,), generator=gen))
        img = torch.rot90(img, k, dims=(1, 2))
        logits = net(img, ids[idx])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, ys_t[idx], pos_weight=pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, steps, float(loss.item()))
    detector = LearnedSuccessDetector(net, version=version, threshold=threshold)
    metrics = evaluate_detector(detector, heldout_episodes)
    metrics["train_seconds"] = time.time() - start
    metrics["train_examples"] = int(len(ys))
    return detector, metrics


def evaluate_detector(detector: LearnedSuccessDetector, episodes: list[Episode]) -> dict[str, float]:
    """Precision / recall / AUROC of the detector's last-frame judgement against the episodes' trusted labels."""
    labelled = [ep for ep in episodes if episode_label(ep) is not None]
    if not labelled:
        raise ValueError("no labelled held-out episodes to evaluate the detector on")
    scores = detector.score(labelled)
    labels = np.array([episode_label(ep) for ep in labelled], bool)
    return classification_metrics(scores, labels, detector.threshold)
