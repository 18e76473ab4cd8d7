"""Training and evaluating the success detector on labelled episodes.

Examples come from whole episodes: each episode's last step (a window of frames ending there) with its label. A
successful episode also gives hard negatives for free: an earlier step of it, which shows the moment *before*
success (the built-in episodes end at the first successful step, so no earlier state is a success), and its last
step under swapped instructions that name other objects. They teach the detector the exact predicate rather than
"the policy looked busy" or "some block is on some pad". Every example also teaches the progress head how many steps
remain until success (or that none will come before the episode ends).

Calibration episodes, kept out of the gradient steps, fit the temperature and bias of P(success) and the threshold
for a target precision (reward/metrics.py).

Held-out metrics are computed on whole episodes the detector never trained on.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from flywheel.contracts import Episode, Extras
from reward.detector import DetectorNet, DetectorNetConfig, LearnedSuccessDetector, init_from_policy, window_frames
from reward.metrics import detector_metrics, fit_calibration, fit_task_calibrations, threshold_for_precision


AUX_WEIGHT = 10.0  # position errors are ~0.01-0.04 in MSE; weighted up so grounding leads the judgement
PROGRESS_WEIGHT = 0.5  # the progress head's cross-entropy, beside the success head's


class Examples(NamedTuple):
    """What the detector trains on, one row per example."""

    frames: np.ndarray  # uint8 (N, H, W, channels): a window of frames (reward/detector.py window_frames)
    texts: list[str]  # the instruction it is judged under
    labels: np.ndarray  # float32 (N,): success at that step; NaN where only the progress head trains on it
    aux: np.ndarray  # float32 (N, 4): the named block's and target's true positions, where recorded
    has_aux: np.ndarray  # float32 (N,)
    to_go: np.ndarray  # int64 (N,): steps to success (horizon + 1: not before the end); -1 where unknown


def swapped_instructions(episodes: list[Episode], rng: np.random.Generator,
                         pool: list[Episode] | None = None) -> list[str | None]:
    """For each episode, an instruction that asks for something else in the same kind of task: one from another
    episode of the ``pool`` (default: the same list) of the same kind that names other objects
    (``info["named"]``). Judged on the first episode's frames, it is a hard negative: the scene is a success, but not
    of what is now asked. ``None`` where there is no such instruction (one task, one instruction)."""
    pool = episodes if pool is None else pool
    by_kind: dict[str, list[tuple[tuple, str]]] = {}
    for ep in pool:
        if ep.info.get("named"):
            by_kind.setdefault(ep.info.get("kind", ep.task), []).append((tuple(ep.info["named"]), ep.instruction))
    out: list[str | None] = []
    for ep in episodes:
        named = tuple(ep.info.get("named") or ())
        others = [text for n, text in by_kind.get(ep.info.get("kind", ep.task), []) if named and n != named]
        out.append(others[int(rng.integers(len(others)))] if others else None)
    return out


def detector_examples(
    episodes: list[Episode], rng: np.random.Generator, hard_negatives: bool = True,
    cfg: DetectorNetConfig | None = None, swaps: int = 1,
) -> Examples:
    """The examples of episodes whose truth is known (``Episode.trusted_success``).

    Per episode: its last step, with its label; one earlier step, a failure (a built-in episode ends at its first
    success), which teaches the success head "not yet" where the episode succeeded and the progress head the steps
    still to go (not for a hard example made on purpose, whose earlier steps look like a success's and which would
    teach the progress head that carrying the block to the target leads nowhere); and, for a success, its last step
    under a swapped instruction. A step is a window of frames
    stacking the cameras in ``cfg.sensors`` (reward/detector.py window_frames)."""
    cfg = cfg or DetectorNetConfig()
    never = cfg.horizon + 1  # the progress class "no success before the episode ends"
    rows: list[tuple] = []

    def add(ep: Episode, t: int, y: float, to_go: int, instruction: str | None = None, with_aux: bool = True):
        positions = ep.extras.get(Extras.AUX_POSITIONS) if with_aux else None
        rows.append((window_frames(ep.observations, cfg.sensors, t, cfg.window, cfg.stride),
                     instruction or ep.instruction, y, positions[t] if positions is not None else np.zeros(4),
                     positions is not None, to_go))

    draws = [swapped_instructions(episodes, rng) for _ in range(swaps if hard_negatives else 0)]
    for i, ep in enumerate(episodes):
        y = ep.trusted_success()
        if y is None:
            continue
        last = ep.num_steps
        add(ep, last, float(y), 0 if y else never)
        if last > 1 and not ep.made_on_purpose():  # a hard example's earlier steps are a success's: no label fits
            t = int(rng.integers(0, last))
            # Before a success: a hard negative for the success head. Before a failure: an easy one, which only
            # the progress head learns from (it would dilute the success head's hard examples).
            add(ep, t, 0.0 if y and hard_negatives else float("nan"), min(last - t, cfg.horizon) if y else never)
        for other in dict.fromkeys(d[i] for d in draws) if y else ():  # distinct, in order
            if other is not None:  # the positions recorded are of the original instruction's objects
                add(ep, last, 0.0, -1, instruction=other, with_aux=False)
    if not rows:
        raise ValueError("no labelled episodes to train the detector on: label episodes first (ground truth or human)")
    frames, texts, ys, aux, has_aux, to_go = zip(*rows)
    return Examples(np.stack(frames), list(texts), np.asarray(ys, np.float32), np.asarray(aux, np.float32),
                    np.asarray(has_aux, np.float32), np.asarray(to_go, np.int64))


def dihedral(images: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 flips/transposes of a top-down frame (B,H,W,C), with (x, y) pairs in ``positions`` (B,2n)
    mapped to match. Whether one object rests on another does not change under them, so each example counts 8
    times: the detector trains on a few hundred episodes and otherwise overfits them."""
    pos = positions.view(positions.shape[0], -1, 2).clone()
    if k & 1:  # mirror left-right
        images, pos[..., 0] = images.flip(2), 1.0 - pos[..., 0]
    if k & 2:  # mirror top-bottom
        images, pos[..., 1] = images.flip(1), 1.0 - pos[..., 1]
    if k & 4:  # transpose
        images, pos = images.transpose(1, 2), pos.flip(-1)
    return images.contiguous(), pos.view_as(positions)


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """The held-out figures a run prints and stores (reward/metrics.py detector_metrics has them all)."""
    m = detector_metrics(scores, labels, threshold)
    return {k: m[k] for k in ("precision", "recall", "auroc", "accuracy", "ece", "positives", "n")}


@dataclasses.dataclass(frozen=True)
class Training:
    """How a detector is optimised: each member of its ensemble (members trained one after another on the same
    examples, each from its own seed, seed + k, for its heads and its batches, as in deep ensembles) for ``steps``.
    ``swaps``: swapped-instruction negatives per success (detector_examples). ``checkpoint_every``: steps between
    saves of the training state, with a checkpoint directory."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    augment: bool = True
    ensemble: int = 1
    swaps: int = 1
    checkpoint_every: int = 200


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Where the detector's verdict is set. On ``episodes`` (never trained on), the temperature and bias are fitted
    (and per task family where it has enough episodes: reward/metrics.py fit_task_calibrations), and with
    ``target_precision`` > 0 the threshold that reaches it at success rate ``base_rate``; otherwise ``threshold``
    stays."""

    threshold: float = 0.5
    episodes: tuple[Episode, ...] | list[Episode] = ()
    target_precision: float = 0.0
    base_rate: float | None = None


def train_detector(
    train_episodes: list[Episode],
    heldout_episodes: list[Episode],
    *,
    version: str,
    training: Training = Training(),
    cfg: DetectorNetConfig | None = None,
    calibration: Calibration = Calibration(),
    init_weights: dict[str, np.ndarray] | None = None,
    init_sensors: tuple[str, ...] = ("overhead",),
    checkpoint_dir: str | Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[LearnedSuccessDetector, dict[str, Any]]:
    """Train a detector on labelled episodes; report precision / recall / AUROC / ECE on the held-out episodes.

    ``init_weights``: a policy's weights to start the encoder from, ``init_sensors`` what that policy reads (see
    ``init_from_policy``). ``checkpoint_dir``: the training state is saved there (``training.checkpoint_every``),
    and a training started again with the same data and settings continues from it. ``progress(step, steps,
    loss)`` counts the steps of every member."""
    start = time.time()
    cfg = cfg or DetectorNetConfig()
    t = training
    ex = detector_examples(train_episodes, np.random.default_rng(t.seed), cfg=cfg, swaps=t.swaps)
    members = []
    for k in range(t.ensemble):
        where = Path(checkpoint_dir) / f"member-{k}" if checkpoint_dir is not None else None
        report = None if progress is None else (
            lambda step, total, loss, k=k: progress(k * t.steps + step, t.ensemble * t.steps, loss))
        members.append(_train_member(ex, cfg, (init_weights, init_sensors), dataclasses.replace(t, seed=t.seed + k),
                                     report, where))
    if checkpoint_dir is not None and Path(checkpoint_dir).exists():
        shutil.rmtree(checkpoint_dir)  # every member is done: the partial states go
    detector = LearnedSuccessDetector(members, version=version, threshold=calibration.threshold)
    calibrated = calibrate(detector, calibration)
    metrics = evaluate_detector(detector, heldout_episodes)
    metrics.update(temperature=detector.temperature, bias=detector.bias, per_task=detector.per_task,
                   threshold=detector.threshold, calibration_episodes=calibrated, members=t.ensemble)
    metrics["train_seconds"] = time.time() - start
    metrics["train_examples"] = int(len(ex.labels))
    return detector, metrics


def calibrate(detector: LearnedSuccessDetector, calibration: Calibration) -> int:
    """Set the detector's temperature, bias, per-task calibrations and threshold (``Calibration``); -> how many
    episodes with a trusted verdict it was calibrated on."""
    episodes = [ep for ep in calibration.episodes if ep.trusted_success() is not None]
    if episodes:
        labels = np.array([ep.trusted_success() for ep in episodes], bool)
        logits = detector.logits(episodes)
        detector.temperature, detector.bias = fit_calibration(logits, labels)
        detector.per_task = fit_task_calibrations(logits, labels, [ep.task for ep in episodes])
        if calibration.target_precision > 0:
            detector.threshold = threshold_for_precision(detector.score(episodes), labels,
                                                         calibration.target_precision, calibration.base_rate)
    return len(episodes)


def _train_member(ex: Examples, cfg: DetectorNetConfig, init: tuple[dict[str, np.ndarray] | None, tuple[str, ...]],
                  t: Training, progress: Callable[[int, int, float], None] | None, where: Path | None) -> DetectorNet:
    """One member of the ensemble, from seed ``t.seed``; ``init``: the policy's weights (or None) and sensors its
    encoder starts from. ``where``: its resumable state (``partial.pt`` while training, ``done.pt`` once trained, so
    that a training stopped at a later member does not train this one again)."""
    seed, steps, batch_size, lr = t.seed, t.steps, t.batch_size, t.lr
    torch.manual_seed(seed)
    net = DetectorNet(cfg)
    if where is not None and (where / "done.pt").exists():
        net.load_state_dict(torch.load(where / "done.pt", weights_only=True))
        return net.eval()
    if init[0] is not None:
        init_from_policy(net, *init)
    ids = torch.from_numpy(net.tokenizer(ex.texts)[0])
    frames_t, ys_t, to_go_t = torch.from_numpy(ex.frames), torch.from_numpy(ex.labels), torch.from_numpy(ex.to_go)
    aux_t, has_aux_t = torch.from_numpy(ex.aux), torch.from_numpy(ex.has_aux)
    judged = ex.labels[~np.isnan(ex.labels)]
    pos_weight = torch.tensor(max(1.0, float((judged == 0).sum()) / max(1.0, float(judged.sum()))))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=min(0.5, max(0.1, 2.0 / steps)))  # >= 2 warm-up steps
    gen = torch.Generator().manual_seed(seed)
    first = 1
    resume = where / "partial.pt" if where is not None else None
    if resume is not None and resume.exists():  # an interrupted training of this same member: continue it
        state = torch.load(resume, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        first = int(state["step"]) + 1
    net.train()
    for step in range(first, steps + 1):
        idx = torch.randint(0, len(ys_t), (batch_size,), generator=gen)
        img, aux_y = frames_t[idx], aux_t[idx]
        if t.augment:
            img, aux_y = dihedral(img, aux_y, int(torch.randint(0, 8, (1,), generator=gen)))
        logits, aux_pred, to_go_logits = net(img, ids[idx], with_aux=True)
        y, to_go = ys_t[idx], to_go_t[idx]
        judge, timed = ~torch.isnan(y), to_go >= 0
        loss = torch.zeros(())
        if judge.any():
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[judge], y[judge], pos_weight=pos_weight)
        if timed.any():
            loss = loss + PROGRESS_WEIGHT * torch.nn.functional.cross_entropy(to_go_logits[timed], to_go[timed])
        mask = has_aux_t[idx]
        if mask.any():  # privileged positions teach the encoder to find the named objects (as for the policy)
            err = (aux_pred - (aux_y - 0.5)).pow(2).mean(dim=1)
            loss = loss + AUX_WEIGHT * (err * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, steps, float(loss.item()))
        if resume is not None and (step % t.checkpoint_every == 0) and step < steps:
            _atomic_save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step}, resume)
    if where is not None:
        _atomic_save(net.state_dict(), where / "done.pt")
        if resume.exists():
            resume.unlink()
    return net.eval()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous file


def evaluate_detector(detector: LearnedSuccessDetector, episodes: list[Episode]) -> dict[str, float]:
    """Precision / recall / AUROC of the detector's last-frame judgement against the episodes' trusted labels."""
    labelled = [ep for ep in episodes if ep.trusted_success() is not None]
    if not labelled:
        raise ValueError("no labelled held-out episodes to evaluate the detector on")
    scores = detector.score(labelled)
    labels = np.array([ep.trusted_success() for ep in labelled], bool)
    return classification_metrics(scores, labels, detector.threshold)
