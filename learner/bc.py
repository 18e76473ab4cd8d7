"""Behaviour cloning of action chunks with the flow-matching loss: the update both pretraining and the RL
algorithms build on.

A sample is (image at step t, proprio at t, instruction, a chunk of C actions from t).

- Demonstrations: every step starts a sample, with the executed actions t..t+C-1 as the target (more samples from
  the same data; the policy learns to act from any state). Chunks that run past the episode's end are padded with
  "stay still, keep the gripper as it was", which is what the robot does after success.
- A policy's own episodes, two ways (``ChunkDataset.add(executed=)``, ``learner.clone``):
  - executed (the run's default): as a demonstration is, every step with the actions that followed it. With
    noiseless practice (``learner.practice_noise=0``) consecutive chunks come from one deterministic policy, and
    these clean trajectories are what teaches;
  - chunks: the chunks it actually sampled, at the steps it sampled them (``extras["chunks"]``). With sampled
    practice, executed actions splice two independent draws together at every replanning step: in a trial, cloning
    those left the policy worse (0.42 -> 0.37) even with ground-truth success labels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from typing import NamedTuple

from flywheel.contracts import Episode, Extras, TrainablePolicy, sensor_inputs


def action_chunks(actions: np.ndarray, chunk: int) -> np.ndarray:
    """actions (T, A) -> chunks (T, C, A): chunk t holds actions t..t+C-1, padded past the end."""
    t_len, a_dim = actions.shape
    pad = np.zeros((chunk, a_dim), np.float32)
    pad[:, -1] = actions[-1, -1] if t_len else -1.0
    padded = np.concatenate([actions.astype(np.float32), pad], axis=0)
    idx = np.arange(t_len)[:, None] + np.arange(chunk)[None]
    return padded[idx]


def narrated(ep: Episode, steps: np.ndarray) -> np.ndarray:
    """int64 (n,): which of ``ep.info["subtasks"]`` a demonstrator said it was doing at each of ``steps`` (-1: none
    said; ``Extras.NARRATION``)."""
    said = ep.extras.get(Extras.NARRATION)
    if said is None or not ep.info.get("subtasks"):
        return np.full(len(steps), -1, np.int64)
    return np.asarray(said, np.int64)[steps]


def prompt_ids(model: TrainablePolicy, ep: Episode, steps: np.ndarray) -> np.ndarray:
    """int64 (n, L): the words the actions at each of ``steps`` were drawn for. The task instruction; for a policy
    with a subtask head, the subtask it named at the decision the step belongs to (``Extras.PROMPT``), or the one
    the demonstrator narrated there (a person's correction, a demonstration): hierarchical imitation, as π0.5's low
    level learns to act on the subtask rather than on the whole task."""
    ids = np.repeat(model.token_ids([ep.instruction]), len(steps), axis=0)
    if "subtask" not in model.capabilities:
        return ids
    prompts = ep.extras.get(Extras.PROMPT)
    if prompts is not None:
        decision = np.searchsorted(ep.extras[Extras.CHUNK_STEPS], steps, side="right") - 1
        ids[decision >= 0] = np.asarray(prompts, np.int64)[decision[decision >= 0]]
    said = narrated(ep, steps)
    for k in np.unique(said[said >= 0]):
        ids[said == k] = model.token_ids([ep.info["subtasks"][k]])[0]
    return ids


def subtask_targets(model: TrainablePolicy, ep: Episode, steps: np.ndarray, ids: np.ndarray,
                    own: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The subtask head's targets at ``steps`` of ``ep`` -> (token ids (n, L), weight (n,); 0 where there is none).
    Where a coach's words were in force (``Episode.coached``), those words: what the policy should have been doing
    there, in hindsight, whatever it named. Else what the demonstrator narrated, or, where the policy itself acted,
    the words it acted on (``ids``, from ``prompt_ids``) with weight ``own``: an episode of its own cloned for its
    success (self-imitation, filtered BC) teaches the head its words as well as the low level its actions."""
    said = narrated(ep, steps)
    targets, weight = ids.copy(), (said >= 0).astype(np.float32)
    if Extras.PROMPT in ep.extras:
        mine = (said < 0) & ~ep.intervened()[np.minimum(steps, ep.num_steps - 1)]
        weight = np.where(mine, np.clip(np.broadcast_to(np.asarray(own, np.float32), weight.shape), 0, None), weight)
    words = ep.extras.get(Extras.COACHING)
    if words is not None:
        at = np.asarray(words, np.int64)[np.minimum(steps, ep.num_steps - 1)]
        for k in np.unique(at[at >= 0]):
            targets[at == k] = model.token_ids([ep.info["coaching"][k]["words"]])[0]
        weight = np.where(at >= 0, 1.0, weight).astype(np.float32)
    return targets, weight


class _Entry(NamedTuple):
    """One episode's samples, ready to concatenate."""

    key: str  # the episode id, or ``ID/corrections`` for a person's steps in it
    episode: str  # the episode id: an episode's entries count once against ``max_episodes``, and leave together
    inputs: dict[str, np.ndarray]  # per sample: images uint8 (S,H,W,3), proprio, aux (S,4), aux_mask (S,), ids
    #                                (S,L); or, with the backbone frozen, its context ctx float32 (S,D) alone
    actions: np.ndarray  # float32 (S, C, A) target chunks
    weights: np.ndarray  # float32 (S,)
    pinned: bool
    indicators: np.ndarray  # int64 (S,)


class ChunkDataset:
    """In-memory samples from a set of episodes, each episode with a sample weight; sampled uniformly by step.

    ``max_episodes`` bounds memory: past it, the oldest non-pinned episodes are dropped first (pinned ones, such as
    the demonstrations, stay).

    ``encode=True`` (the backbone is frozen): each sample is stored as the backbone's context, computed once when it
    arrives, instead of its image. Training the action expert alone then costs no encoder pass at all.
    """

    def __init__(self, model: TrainablePolicy, max_episodes: int = 4000, encode: bool = False):
        self.model = model
        self.chunk = model.chunk
        self.max_episodes = max_episodes
        self.encode = encode
        self._eps: list[_Entry] = []
        self._cache: dict[str, torch.Tensor] | None = None
        self.added = 0  # samples ever added: what a learner counts as new since its last look

    def __len__(self) -> int:
        return sum(len(e.actions) for e in self._eps)

    @property
    def num_episodes(self) -> int:
        return len({e.episode for e in self._eps})

    def keys(self) -> set[str]:
        """The ids of the episodes held (the oldest unpinned ones leave past ``max_episodes``)."""
        return {e.key for e in self._eps}

    def add(self, episodes: list[Episode], weight: float | np.ndarray = 1.0, pinned: bool = False,
            indicator: int | np.ndarray = 0, executed: bool = False) -> None:
        """``weight`` and ``indicator`` (the advantage indicator: 0 none, 1 positive, 2 negative) hold for every
        sample of the episodes, or, given as arrays, per sample of a single episode (one per sampled chunk).
        ``executed``: a policy's own episode is cloned as a demonstration is, from what it executed at every step,
        rather than from the chunks it sampled."""
        for ep in episodes:
            if Extras.CHUNKS in ep.extras and not executed:
                # A policy's own episode: clone the chunks it sampled, at the steps it sampled them.
                steps, targets = ep.extras[Extras.CHUNK_STEPS], ep.extras[Extras.CHUNKS].astype(np.float32)
            else:
                # Demonstrations: every step starts a chunk of the executed actions (a policy's own episode: every
                # step it acted, not those a person took over; add_corrections has those).
                steps = np.flatnonzero(~ep.intervened())
                targets = action_chunks(ep.actions, self.chunk)[steps]
            self._add(ep.id, ep, steps, targets, weight, pinned, indicator)
        self._trim()

    def add_corrections(self, episodes: list[Episode], indicator: int = 0) -> int:
        """The steps where a person took over (``Episode.intervened``), cloned as a demonstration is (every step,
        the actions that followed) with weight 1 and ``indicator``; each episode's corrections are their own
        entry (key ``ID/corrections``), which relabelling leaves alone. Returns how many episodes had any."""
        corrected = [ep for ep in episodes if ep.intervened().any()]
        for ep in corrected:
            steps = np.flatnonzero(ep.intervened())
            self._add(f"{ep.id}/corrections", ep, steps, action_chunks(ep.actions, self.chunk)[steps], 1.0, False,
                      indicator)
        self._trim()
        return len(corrected)

    def add_coaching(self, episodes: list[Episode]) -> int:
        """The decisions of the episodes a coach stood by in (``info["coach"]``) or a person spoke in, each episode's
        its own entry (key ``ID/coaching``), for the subtask head alone: where they spoke, their words, in hindsight
        (what the policy should have been doing); where a coach standing by let the policy's words be, those words,
        which it judged right. The low level learns nothing from them (weight 0: the coach judged the words, not the
        actions). Returns how many episodes."""
        watched = [ep for ep in episodes if (ep.info.get("coach") or ep.coached().any())
                   and Extras.CHUNK_STEPS in ep.extras]
        for ep in watched:  # a person who spoke at a robot now and then approved nothing by their silence
            steps = ep.extras[Extras.CHUNK_STEPS]
            self._add(f"{ep.id}/coaching", ep, steps, ep.extras[Extras.CHUNKS].astype(np.float32), 0.0, False, 0,
                      words_weight=float(bool(ep.info.get("coach"))))
        self._trim()
        return len(watched)

    def _add(self, key: str, ep: Episode, steps: np.ndarray, targets: np.ndarray, weight: float | np.ndarray,
             pinned: bool, indicator: int | np.ndarray, words_weight: float | None = None) -> None:
        """One entry: the samples of ``ep`` at ``steps`` with their target chunks. ``words_weight``: the subtask
        head's weight on the words the policy acted on there (default: the samples' own weight, none for a negative
        example's)."""
        n = len(steps)
        if n == 0:
            return
        ids = prompt_ids(self.model, ep, steps)
        images, proprio = sensor_inputs(ep.observations, self.model.sensors, steps)
        if self.encode:
            inputs = {"ctx": self.model.features(images, ids, proprio).cpu().numpy()}
        else:
            aux = ep.extras.get(Extras.AUX_POSITIONS)
            inputs = {
                "images": images, "proprio": proprio, "ids": ids,
                "aux": aux[steps].astype(np.float32) if aux is not None else np.zeros((n, 4), np.float32),
                "aux_mask": np.full(n, aux is not None, np.float32),
            }
            if "subtask" in self.model.capabilities:  # the subtask head learns what was said or done there
                own = np.where(np.asarray(indicator) == 2, 0.0, weight) if words_weight is None else words_weight
                words, mask = subtask_targets(self.model, ep, steps, ids, own)
                inputs.update(task_ids=np.repeat(self.model.token_ids([ep.instruction]), n, axis=0),
                              subtask_ids=np.where(mask[:, None] > 0, words, 0), subtask_mask=mask)
        self.added += n
        self._eps.append(_Entry(key, ep.id, inputs, targets, np.broadcast_to(np.asarray(weight, np.float32), (n,)),
                                pinned, np.broadcast_to(np.asarray(indicator, np.int64), (n,))))
        self._cache = None

    def _trim(self) -> None:
        """Past ``max_episodes`` episodes, drop the oldest that are not pinned, with all their entries."""
        episodes = list(dict.fromkeys(e.episode for e in self._eps))  # oldest first
        overflow = len(episodes) - self.max_episodes
        if overflow > 0:
            pinned = {e.episode for e in self._eps if e.pinned}
            dropped = set([k for k in episodes if k not in pinned][:overflow])
            self._eps = [e for e in self._eps if e.episode not in dropped]
        self._cache = None

    def relabel(self, labels: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """New per-sample (weights, indicators) for the episodes named by id; RECAP relabels every advantage after
        each refit of its value."""
        self._eps = [
            e._replace(weights=np.asarray(labels[e.key][0], np.float32), indicators=np.asarray(labels[e.key][1], np.int64))
            if e.key in labels else e
            for e in self._eps
        ]
        self._cache = None

    def _tensors(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            eps = self._eps
            cat = lambda arrays: torch.from_numpy(np.concatenate(arrays))  # noqa: E731
            self._cache = {k: cat([e.inputs[k] for e in eps]) for k in eps[0].inputs}
            self._cache.update(
                actions=cat([e.actions for e in eps]),
                weights=cat([e.weights for e in eps]),
                indicator=cat([e.indicators for e in eps]),
            )
            pinned = np.repeat(np.array([e.pinned for e in eps], bool), [len(e.actions) for e in eps])
            self._pinned_idx = torch.from_numpy(np.flatnonzero(pinned))
            self._other_idx = torch.from_numpy(np.flatnonzero(~pinned))
        return self._cache

    def sample(self, batch_size: int, generator: torch.Generator, pinned_fraction: float | None = None
               ) -> dict[str, torch.Tensor]:
        """A batch drawn uniformly over samples, or with ``pinned_fraction`` of it from the pinned episodes (the
        demonstrations) and the rest from the others, whatever their sizes."""
        data = self._tensors()
        if pinned_fraction is None or len(self._pinned_idx) == 0 or len(self._other_idx) == 0:
            idx = torch.randint(0, data["actions"].shape[0], (batch_size,), generator=generator)
        else:
            n_pin = int(round(batch_size * pinned_fraction))
            pick = lambda pool, n: pool[torch.randint(0, len(pool), (n,), generator=generator)]  # noqa: E731
            idx = torch.cat([pick(self._pinned_idx, n_pin), pick(self._other_idx, batch_size - n_pin)])
        return {k: v[idx] for k, v in data.items()}


def fit_subtask_head(model: TrainablePolicy, episodes: list[Episode], steps: int, lr: float = 1e-3,
                     batch_size: int = 256, generator: torch.Generator | None = None) -> list[float]:
    """Train a policy's subtask head alone on the narrated and coached steps of ``episodes`` (``subtask_targets``),
    the rest of it frozen: each step's context of (observation, task instruction) is computed once, so that a step
    costs no pass of the encoder's trunk. What teaches a policy that already has the skills to chain them (a subtask
    head on a base that can put a block in a bowl, for a task made of such moves). -> the loss of every step."""
    images, tasks, targets, contexts = [], [], [], []
    for ep in episodes:
        every = np.arange(ep.num_steps)
        # a coach's silence judged the policy's own words right; elsewhere they are no target
        approved = float(bool(ep.info.get("coach")))
        words, weight = subtask_targets(model, ep, every, prompt_ids(model, ep, every), approved)
        said = np.flatnonzero(weight > 0)
        if not len(said):
            continue
        frames, proprio = sensor_inputs(ep.observations, model.sensors, said)
        task = np.repeat(model.token_ids([ep.instruction]), len(said), axis=0)
        contexts.append(model.features(frames, task, proprio).cpu())
        images.append(torch.from_numpy(np.ascontiguousarray(frames)))
        tasks.append(torch.from_numpy(task))
        targets.append(torch.from_numpy(words[said]))
    if not contexts:
        raise ValueError("no narrated or coached steps to learn subtasks from: the episodes need extras['narration'] "
                         "(a scripted demonstrator's, or a person's corrections) or extras['coaching'], and "
                         "info['subtasks']")
    ctx, images, tasks, targets = (torch.cat(x) for x in (contexts, images, tasks, targets))
    head, device = model.subtasker, model.device
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    losses, everything = [], torch.ones(batch_size, device=device)
    head.train()
    for _ in range(steps):
        pick = torch.randint(0, len(ctx), (batch_size,), generator=generator)
        with torch.no_grad():
            patches = model.patches(images[pick].to(device))
        loss = head.loss(ctx[pick].to(device), patches, tasks[pick].to(device), targets[pick].to(device), everything)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    head.eval()
    return losses


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then cosine decay
    to 10% (the last steps settle the weights)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def imitation_loss(model: TrainablePolicy, batch: dict[str, torch.Tensor], weights: torch.Tensor | None,
                   indicator: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """The policy's imitation loss on a batch of raw inputs (``ChunkDataset.sample``'s), plus its auxiliary loss on
    the privileged positions where it has one."""
    ctx = model.context(batch["images"], batch["ids"], batch["proprio"])
    loss = model.imitation_loss(ctx, batch["actions"], weights, indicator, generator)
    if "aux" in model.capabilities:
        loss = loss + model.auxiliary_loss(ctx, batch["aux"], batch["aux_mask"])
    if "subtask" in model.capabilities and "subtask_mask" in batch:
        loss = loss + model.subtask_loss(batch["images"], batch["task_ids"], batch["proprio"], batch["subtask_ids"],
                                         batch["subtask_mask"])
    return loss


def augment_images(images: torch.Tensor, generator: torch.Generator | None, pad: int = 4,
                   brightness: float = 0.2) -> torch.Tensor:
    """DrQ's random shift, each image moved by up to ``pad`` pixels (its edges repeated), and its brightness scaled
    by 1 +- ``brightness``: what a nudged camera and other lighting do to a frame. uint8 (B, H, W, C) in and out."""
    b, h, w, _ = images.shape
    draw = lambda *shape, high=None: (torch.randint(0, high, shape, generator=generator) if high else  # noqa: E731
                                      torch.rand(shape, generator=generator))
    x = torch.nn.functional.pad(images.permute(0, 3, 1, 2).float(), (pad,) * 4, mode="replicate")
    rows = torch.arange(h)[None, :] + draw(b, 1, high=2 * pad + 1)
    cols = torch.arange(w)[None, :] + draw(b, 1, high=2 * pad + 1)
    x = x[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    x = x * (1 + brightness * (2 * draw(b, 1, 1, 1) - 1))
    return x.clamp(0, 255).round().to(torch.uint8)


class BCTrainer:
    """AdamW on the flow-matching loss, gradient-clipped. Holds the optimizer so that training can resume."""

    def __init__(self, model: TrainablePolicy, lr: float = 3e-4, weight_decay: float = 1e-4, grad_clip: float = 1.0,
                 indicator_dropout: float = 0.0, indicator_lr: float | None = None,
                 generator: torch.Generator | None = None, augment: bool = False):
        """``indicator_lr``: the advantage indicator's own learning rate. It starts at zero and must grow to the
        scale of the context; at a fine-tuning rate (1e-4) Adam moves it by at most ~0.1 in 1,000 steps.
        ``generator``: draws the flow's noise and times and the indicator's dropout (the learner's own, which its
        checkpoints keep, so that a resumed run trains as the uninterrupted one would); without one, torch's global
        stream (pretraining saves that). ``augment``: every batch's images go through ``augment_images``."""
        self.model = model
        self.augment = augment
        self.generator = generator
        self.indicator_dropout = indicator_dropout
        self.grad_clip = grad_clip
        # Only what requires grad trains (a learner with a frozen backbone turns the encoder's off).
        conditioning = model.conditioning_parameters() if "indicator" in model.capabilities else []
        own = {id(p) for p in conditioning}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
        groups = [{"params": rest, "lr": lr}, *([{"params": conditioning, "lr": indicator_lr or lr}] if conditioning
                                                else [])]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        for group in self.optimizer.param_groups:
            group["peak_lr"] = group["lr"]

    def schedule(self, multiplier: float) -> None:
        """Set every parameter group's learning rate to ``multiplier`` times its peak."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * multiplier

    def _drop(self, indicator: torch.Tensor) -> torch.Tensor:
        """Replace the indicator by "none" at random, so that the unconditional policy stays trained (needed for
        classifier-free guidance)."""
        if self.indicator_dropout <= 0:
            return indicator
        draw = torch.rand(indicator.shape, device=indicator.device) if self.generator is None else \
            torch.rand(indicator.shape, generator=self.generator).to(indicator.device)
        keep = draw >= self.indicator_dropout
        return torch.where(keep, indicator, torch.zeros_like(indicator))

    def step(self, batch: dict[str, torch.Tensor], weighted: bool = False) -> float:
        """One gradient step on a batch (CPU tensors, as ChunkDataset.sample draws them: moved to the model's
        device here)."""
        self.model.train()
        device = self.model.device
        if self.augment and "images" in batch:
            batch = {**batch, "images": augment_images(batch["images"], self.generator)}
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        weights, indicator = batch["weights"] if weighted else None, self._drop(batch["indicator"])
        if "indicator" not in self.model.capabilities:
            indicator = None
        if "ctx" in batch:  # the backbone is frozen: train the action expert on cached contexts
            loss = self.model.imitation_loss(batch["ctx"], batch["actions"], weights, indicator, self.generator)
        else:
            loss = imitation_loss(self.model, batch, weights, indicator, self.generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"behaviour-cloning loss is {loss.item()}: the weights or the batch hold NaN/inf. "
                "Lower the learning rate or restore the last good checkpoint."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.model.eval()
        return float(loss.item())
