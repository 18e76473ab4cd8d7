"""PPO with exact log-probabilities, for a VLA that acts in discrete action tokens (RT-2 / OpenVLA style).

A token VLA's chunk is a draw from categoricals, so its probability is exact (``TokenActionHead.log_prob``): the
rollout records the log-probability of every token it drew (``extras["logp"]``, (C, A) per chunk), and the clipped
PPO ratio pi_new / pi_behaviour is computed exactly, token by token, as PPO for language models does. A ratio of
whole chunks (a product of 24 token ratios) swings so far that nearly every chunk was clipped in a trial
(clip fraction 0.95-0.98, KL 2.6-6 nats a chunk).

Credit is GRPO's (Shao et al. 2024), which needs no critic: an episode's advantage is its judged success minus the
mean of the attempts at the same layout (``rollout.group_size`` of them), divided by their standard deviation, and
every decision of the episode shares it. Layouts where every attempt ended alike teach nothing and are skipped.

Episodes carry the version that acted. Those more than ``max_staleness`` versions old are dropped; younger late
ones are corrected by the ratio itself, whose denominator is the probability under the policy that acted. A
behaviour-cloning loss on the replayed pretraining demonstrations (weight ``anchor``) keeps the policy from
drifting away from what it could already do.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flywheel.contracts import Episode, PolicySnapshot, sensor_inputs
from flywheel.vla.model import SmallVLA
from learner.base import LearnerBase
from learner.bc import ChunkDataset


class TokenPPOLearner(LearnerBase):
    """The ``Learner`` contract: ``update(labelled episodes) -> stats``; ``snapshot() -> PolicySnapshot``."""

    def __init__(
        self,
        model: SmallVLA,
        demos: list[Episode] | None = None,
        *,
        version: int = 0,
        seed: int = 0,
        ppo_lr: float = 3e-4,
        ppo_epochs: int = 8,
        ppo_clip: float = 0.2,
        ppo_minibatch: int = 256,
        anchor: float = 0.5,
        max_staleness: int = 2,
        batch_size: int = 64,
    ):
        if model.cfg.action_head != "tokens":
            raise ValueError(
                "token_ppo needs a VLA with action tokens (exact log-probabilities), and this one has a "
                f"{model.cfg.action_head!r} head: pretrain one with `flywheel pretrain action_head=tokens` and give it "
                "as policy.checkpoint, or choose another learner.algorithm")
        self.model, self.version = model, version
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ppo_lr,
                                           weight_decay=1e-4)
        self.epochs, self.clip, self.minibatch = ppo_epochs, ppo_clip, ppo_minibatch
        self.anchor, self.max_staleness, self.batch_size = anchor, max_staleness, batch_size
        self.demos = ChunkDataset(model)
        self.demos.add(list(demos or []), pinned=True)

    @classmethod
    def group_advantages(cls, episodes: list[Episode]) -> np.ndarray:
        """(success - mean) / std over the attempts at each layout (env seed); 0 where they all ended alike."""
        success = np.array([float(cls.judged_success(ep)) for ep in episodes])
        adv = np.zeros_like(success)
        for members in cls.layout_groups(episodes):
            s = success[members]
            if len(members) > 1 and s.std() > 0:
                adv[members] = (s - s.mean()) / s.std()
        return adv

    def _decisions(self, episodes: list[Episode], adv: np.ndarray) -> dict[str, torch.Tensor]:
        """Every decision of the episodes with a nonzero advantage: its inputs, the chunk drawn, the log-probability
        of each of its tokens when drawn, and the episode's advantage."""
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "proprio", "ids", "chunks", "logp", "adv")}
        for ep, a in zip(episodes, adv):
            if a == 0:
                continue
            steps = ep.extras["chunk_steps"]
            images, proprio = sensor_inputs(ep.observations, self.model.cfg.sensors, steps)
            cols["images"].append(np.ascontiguousarray(images))
            cols["proprio"].append(proprio)
            cols["ids"].append(np.repeat(self.model.tokenizer([ep.instruction])[0], len(steps), axis=0))
            cols["chunks"].append(ep.extras["chunks"].astype(np.float32))
            cols["logp"].append(ep.extras["logp"].astype(np.float32))
            cols["adv"].append(np.full(len(steps), a, np.float32))
        device = self.model.cls_device
        return {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in cols.items()} if cols["adv"] else {}

    def update(self, episodes: list[Episode]) -> dict[str, float]:
        acted = [ep for ep in episodes if "logp" in ep.extras and len(ep.extras.get("chunk_steps", ()))]
        if episodes and not acted:
            raise ValueError("token_ppo needs episodes that record each chunk's log-probability (extras 'logp'): "
                             "were they acted by this learner's token VLA?")
        fresh = [ep for ep in acted if ep.policy_version >= self.version - self.max_staleness]
        adv = self.group_advantages(fresh) if fresh else np.zeros(0)
        data = self._decisions(fresh, adv)
        stats: dict[str, list[float]] = {"policy_loss": [], "anchor_loss": [], "clip_fraction": [], "approx_kl": []}
        n = len(data["adv"]) if data else 0
        self.model.train()
        for _ in range(self.epochs if n else 0):
            for idx in torch.randperm(n, generator=self.generator).split(self.minibatch):
                ctx = self.model.encoder(data["images"][idx], data["ids"][idx], data["proprio"][idx])
                logp = self.model.head.log_prob(self.model.head(ctx), data["chunks"][idx])  # (b, C, A)
                log_ratio = (logp - data["logp"][idx]).clamp(-20.0, 20.0)
                ratio, a = log_ratio.exp(), data["adv"][idx][:, None, None]
                loss = -torch.min(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a).mean()
                anchor = loss.new_zeros(())
                if self.anchor > 0 and self.demos.num_episodes:
                    b = {k: v.to(ctx.device) for k, v in self.demos.sample(self.batch_size, self.generator).items()}
                    anchor = self.model.action_loss(b["images"], b["ids"], b["proprio"], b["actions"])
                total = loss + self.anchor * anchor
                if not torch.isfinite(total):
                    raise FloatingPointError(f"token_ppo loss is {total.item()}: the weights or the batch hold "
                                             "NaN/inf. Lower learner.ppo_lr or restore the last good checkpoint.")
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"].append(float(loss))
                    stats["anchor_loss"].append(float(anchor))
                    stats["clip_fraction"].append(float(((ratio - 1).abs() > self.clip).float().mean()))
                    stats["approx_kl"].append(float((-log_ratio).sum(dim=(1, 2)).mean()))  # per chunk
        self.model.eval()
        self.version += 1
        return {**{k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}, "decisions": n,
                "stale_dropped": len(acted) - len(fresh), "informative_episodes": int((adv != 0).sum()),
                "judged_success": float(np.mean([self.judged_success(ep) for ep in fresh])) if fresh else 0.0}

    def snapshot(self) -> PolicySnapshot:
        return PolicySnapshot(version=self.version, weights=self.model.get_weights(),
                              meta={"algorithm": type(self).__name__, "sampling": {}})
