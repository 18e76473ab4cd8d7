"""PPO with exact log-probabilities, for both kinds of VLA (``learner.algorithm=ppo``).

- **Action tokens** (RT-2 / OpenVLA style): a chunk is a draw from categoricals, so its probability is exact
  (``TokenActionHead.log_prob``).
- **The flow head** (pi0 style), with one of two stochastic samplers (``learner.noise_at``), ``learner.flow_noise``
  the std of their Gaussian draws; evaluation integrates the flow as always, without them:
  - "steps", flow-noise as in piRL (Chen et al. 2025): every Euler step is a Gaussian draw around where the flow
    would go, so the chunk ends a chain of Gaussian steps whose log-probability is exact, and PPO trains the
    velocity field at each step;
  - "output": the flow runs deterministically from its mean and only the chunk draws around it, a Gaussian policy
    whose mean is the whole flow (the gradient goes through every Euler step). A chunk has K = ``flow_steps``
    times fewer random numbers to credit, and its numbers are independent given the observation.

The rollout records the log-probability of every number it drew (``extras["logp"]``: (C, A) per chunk for tokens
and output noise, (K, C, A) for the flow's K steps) and what it drew ("chunks", "drawn", "flow_chain"), and the
clipped PPO ratio pi_new / pi_behaviour is computed exactly, number by number, as PPO for language models does it
token by token. A ratio of whole chunks (a product of 24 token ratios) swings so far that nearly every chunk was
clipped in a trial (clip fraction 0.95-0.98, KL 2.6-6 nats a chunk). Where a chunk's numbers are independent given
the observation (tokens, output noise), only the actions the robot executed are credited: the rest of the chunk
never reached the environment, so their draws could only add noise to the gradient.

Credit is GRPO's (Shao et al. 2024), which needs no critic: an episode's advantage is its judged success minus the
mean of the attempts at the same layout (``rollout.group_size`` of them), divided by their standard deviation, and
every decision of the episode shares it. Layouts where every attempt ended alike teach nothing and are skipped.

Episodes carry the version that acted. Those more than ``max_staleness`` versions old are dropped; younger late
ones are corrected by the ratio itself, whose denominator is the probability under the policy that acted. A
behaviour-cloning loss on the replayed pretraining demonstrations (weight ``anchor``) keeps the policy from
drifting away from what it could already do.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import nn

from flywheel.contracts import Episode, Extras, PolicySnapshot, Sampling, TrainablePolicy, sensor_inputs
from learner.base import LearnerBase
from learner.bc import ChunkDataset, prompt_ids
from learner.critic import Critic


def executed(chunk_steps: np.ndarray, num_actions: int, chunk: int, intervened: np.ndarray | None = None
             ) -> np.ndarray:
    """(decisions, chunk) booleans: which actions of each decision's chunk the robot executed. A decision made at step
    ``chunk_steps[i]`` runs until the next one, a person taking over (``intervened``, per step) or the episode's end
    (``num_actions`` steps in all)."""
    ends = np.append(chunk_steps[1:], num_actions)
    if intervened is not None and intervened.any():
        taken = np.append(np.flatnonzero(intervened), num_actions)
        ends = np.minimum(ends, taken[np.searchsorted(taken, chunk_steps)])
    ran = ends - np.asarray(chunk_steps)
    return np.arange(chunk)[None] < ran[:, None]


@dataclasses.dataclass
class PPOOptions:
    """PPO's keys (``learner.*`` with ``learner=ppo``), checked when made.

    ``flow_noise``: the flow head's std in practice (its exploration), at each Euler step (``noise_at`` "steps",
    flow-noise as in piRL) or of the chunk alone ("output": a Gaussian policy whose mean is the flow, with K =
    ``flow_steps`` times fewer numbers to credit). ``advantage``: "group" (GRPO, over the attempts at each layout)
    or "gae" (a critic on a frozen copy of the starting encoder, GAE with ``gamma`` and ``gae_lambda`` per decision,
    learner/critic.py: every episode is credited, one attempt a layout is enough).

    ``anchor``, ``batch_size``, ``self_imitation``, ``max_episodes``: the behaviour cloning beside PPO's loss
    (``Anchor``). ``words_lr``: a subtask head's learning rate; it learns by supervision, from the words of the
    anchor's replay (``PPOLearner.learn_words``), where PPO's rate is for the low level's policy gradient.
    ``unsure``: the detector's P(success) range [low, high) in which its verdict counts neither way
    (``PPOLearner.group_advantages``)."""

    ppo_lr: float = 3e-4
    ppo_epochs: int = 8
    ppo_clip: float = 0.2
    ppo_minibatch: int = 256
    anchor: float = 0.5
    max_staleness: int = 2
    batch_size: int = 64
    flow_noise: float = 0.2
    noise_at: str = "output"
    advantage: str = "group"
    gamma: float = 0.95
    gae_lambda: float = 0.95
    value_epochs: int = 20
    self_imitation: float = 0.0
    max_episodes: int = 4000
    words_lr: float = 1e-3
    unsure: tuple[float, float] | list[float] = (0.0, 0.0)

    def __post_init__(self):
        if self.noise_at not in ("steps", "output"):
            raise ValueError(f"learner.noise_at={self.noise_at!r}: choose steps (each Euler step draws, flow-noise) or "
                             f"output (the chunk draws around the flow)")
        if len(self.unsure) != 2 or not 0.0 <= self.unsure[0] <= self.unsure[1] <= 1.0:
            raise ValueError(f"learner.unsure={list(self.unsure)}: the detector's P(success) range [low, high) whose "
                             f"verdicts count neither way, with 0 <= low <= high <= 1; [0, 0] counts every verdict")
        self.unsure = (float(self.unsure[0]), float(self.unsure[1]))
        if self.advantage not in ("group", "gae"):
            raise ValueError(f"learner.advantage={self.advantage!r}: choose group (GRPO) or gae (a critic)")


class PPOLearner(LearnerBase):
    """The ``Learner`` contract: ``update(labelled episodes) -> stats``; ``snapshot() -> PolicySnapshot``."""

    Options = PPOOptions  # the keys it takes besides version and seed (learner/registry.py accepted_options)

    def __init__(self, model: TrainablePolicy, demos: list[Episode] | None = None, *, version: int = 0, seed: int = 0,
                 **options):
        """``options``: ``PPOOptions``' fields.

        The flow VLA's policy under PPO is its flow from the mean (starting noise 0), in practice and in evaluation
        alike, as a Gaussian policy is evaluated at its mean: the steps' draws are its only randomness, so every
        difference between attempts at a layout is one PPO can credit. From the usual standard normal start, most
        of that difference came from the start, whose density does not depend on the weights: in a trial the
        approved direction moved 0.00-0.08 against 0.10 from the mean."""
        o = PPOOptions(**options)
        if "log_prob" not in model.capabilities:
            raise ValueError(f"ppo needs a policy that gives the exact log-probability of what it drew (the "
                             f"'log_prob' capability); {type(model).__name__} offers {sorted(model.capabilities)}: "
                             f"use filtered_bc")
        if model.action_head == "flow" and o.flow_noise <= 0:
            raise ValueError(f"learner.flow_noise={o.flow_noise}: PPO on a flow VLA needs its practice noise (> 0) for "
                             f"the exact log-probability of what it drew; e.g. 0.2 (0.03 with noise_at=steps)")
        self.model, self.version = model, version
        self.flow_noise, self.noise_at, self.unsure = o.flow_noise, o.noise_at, o.unsure
        self.generator = torch.Generator().manual_seed(seed)
        head = {id(p) for p in getattr(model, "subtasker", None).parameters()} if "subtask" in model.capabilities \
            else set()
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head]}]
        if head:
            groups.append({"params": [p for p in model.subtasker.parameters() if p.requires_grad], "lr": o.words_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=o.ppo_lr, weight_decay=1e-4)
        self.epochs, self.clip, self.minibatch = o.ppo_epochs, o.ppo_clip, o.ppo_minibatch
        self.max_staleness = o.max_staleness
        self.anchor = Anchor(model, list(demos or []), o.anchor, o.batch_size, o.self_imitation, o.max_episodes)
        self.critic = Critic(model, gamma=o.gamma, lam=o.gae_lambda, epochs=o.value_epochs, minibatch=o.ppo_minibatch,
                             seed=seed) if o.advantage == "gae" else None

    def group_advantages(self, episodes: list[Episode]) -> np.ndarray:
        """(success - mean) / std over the attempts at each layout (env seed); 0 where they all ended alike. An
        attempt the detector was unsure of (``unsure``) sits out: advantage 0, and not in its layout's mean."""
        success = self.verdicts(episodes, self.unsure)
        adv = np.zeros(len(episodes))
        for members in self.layout_groups(episodes):
            s = success[members]
            known = np.asarray(members)[~np.isnan(s)]
            if len(known) > 1 and success[known].std() > 0:
                adv[known] = (success[known] - success[known].mean()) / success[known].std()
        return adv

    def _decisions(self, episodes: list[Episode], adv: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Every decision of the episodes with a nonzero advantage: its inputs, the chunk drawn, the log-probability
        of each number drawn, its advantage (``adv``: one array per episode, one value per decision), and which of
        its chunk's actions were executed ("executed" (C,)): only those are credited where the numbers of a chunk are
        drawn independently given the observation (action tokens; noise at the flow's output), since the rest never
        reached the environment and their draws would only add noise to the gradient. Flow-noise at the steps
        chains the chunk's numbers together, so every number of it counts."""
        flow = self.model.action_head == "flow"
        drawn = (Extras.DRAWN if self.noise_at == "output" else Extras.FLOW_CHAIN) if flow else Extras.CHUNKS
        independent = not flow or self.noise_at == "output"
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("images", "proprio", "ids", drawn, "logp", "adv",
                                                              "executed")}
        for ep, a in zip(episodes, adv):
            if not np.any(a):
                continue
            steps = ep.extras[Extras.CHUNK_STEPS]
            helped = ep.intervened() | ep.coached()
            # A coach's words end the policy's own attempt as a person's takeover does: credited up to the first
            own = steps < (np.argmax(helped) if ep.coached().any() else len(ep.actions))
            if not own.any():
                continue
            steps = steps[own]
            images, proprio = sensor_inputs(ep.observations, self.model.sensors, steps)
            cols["images"].append(np.ascontiguousarray(images))
            cols["proprio"].append(proprio)
            cols["ids"].append(prompt_ids(self.model, ep, steps))
            cols[drawn].append(ep.extras[drawn][own].astype(np.float32))
            cols["logp"].append(ep.extras[Extras.LOGP][own].astype(np.float32))
            cols["adv"].append(np.broadcast_to(np.asarray(a, np.float32), own.shape)[own])
            cols["executed"].append(executed(steps, len(ep.actions), self.model.chunk, helped)
                                    if independent else np.ones((len(steps), self.model.chunk), bool))
        device = self.model.device
        return {k: torch.from_numpy(np.concatenate(v)).to(device) for k, v in cols.items()} if cols["adv"] else {}

    def update(self, episodes: list[Episode]) -> dict[str, float]:
        acted = [ep for ep in episodes if Extras.LOGP in ep.extras and len(ep.extras.get(Extras.CHUNK_STEPS, ()))]
        if episodes and not acted:
            raise ValueError("ppo needs episodes that record each chunk's log-probability (extras 'logp'): were they "
                             "acted by this learner's snapshot (its sampling asks for it)?")
        fresh = [ep for ep in acted if ep.policy_version >= self.version - self.max_staleness]
        value_loss: list[float] = []
        if self.critic is not None and fresh:
            feats = self.critic.features(fresh)
            flat, returns = self.critic.advantages(feats, [self.judged_success(ep) for ep in fresh])
            flat = (flat - flat.mean()) / (flat.std() + 1e-8)
            adv = np.split(flat, np.cumsum([len(f) - 1 for f in feats])[:-1])
            ctx = torch.cat([f[:-1] for f in feats])
            value_loss = self.critic.fit(ctx, torch.from_numpy(returns.astype(np.float32)).to(ctx.device),
                                         self.generator)  # for the next update: this one's advantages are made
        else:
            adv = list(self.group_advantages(fresh)) if fresh else []
        data = self._decisions(fresh, adv)
        added = self.anchor.data.added
        imitated = self.anchor.keep(fresh, adv)
        stats: dict[str, list[float]] = {"policy_loss": [], "anchor_loss": [], "clip_fraction": [], "approx_kl": []}
        n = len(data["adv"]) if data else 0
        self.model.train()
        for _ in range(self.epochs if n else 0):
            for idx in torch.randperm(n, generator=self.generator).split(self.minibatch):
                ctx = self.model.context(data["images"][idx], data["ids"][idx], data["proprio"][idx])
                recorded = {k: data[k][idx] for k in (Extras.CHUNKS, Extras.FLOW_CHAIN, Extras.DRAWN) if k in data}
                logp = self.model.log_prob(ctx, recorded, self.flow_noise)  # (b, [K,] C, A)
                log_ratio = (logp - data["logp"][idx]).clamp(-20.0, 20.0)
                ratio = log_ratio.exp()
                a = data["adv"][idx].view(-1, *[1] * (ratio.dim() - 1))
                ran = data["executed"][idx].view(len(idx), *[1] * (ratio.dim() - 3), -1, 1).expand_as(ratio).float()
                per_number = torch.min(ratio * a, ratio.clamp(1 - self.clip, 1 + self.clip) * a)
                loss = -(per_number * ran).sum() / ran.sum()
                anchor = self.anchor.loss(self.generator, ctx.device) if self.anchor.weight > 0 else \
                    loss.new_zeros(())
                self._descend(loss + self.anchor.weight * anchor, "ppo loss", "learner.ppo_lr")
                with torch.no_grad():
                    stats["policy_loss"].append(float(loss))
                    stats["anchor_loss"].append(float(anchor))
                    stats["clip_fraction"].append(float((((ratio - 1).abs() > self.clip) * ran).sum() / ran.sum()))
                    stats["approx_kl"].append(float((-log_ratio * ran).flatten(1).sum(1).mean()))  # per chunk
        words = self.learn_words(self.anchor.data.added - added) if "subtask" in self.model.capabilities else []
        self.model.eval()
        self.version += 1
        return {**{k: float(np.mean(v)) if v else 0.0 for k, v in stats.items()}, "decisions": n,
                **({"words_loss": float(np.mean(words)), "words_steps": len(words)} if words else {}),
                "stale_dropped": len(acted) - len(fresh), "informative_episodes": sum(bool(np.any(a)) for a in adv),
                **({"value_loss": float(np.mean(value_loss))} if value_loss else {}),
                **({"imitated_episodes": imitated, "replayed_successes": self.anchor.replayed}
                   if self.anchor.share > 0 else {}),
                "judged_success": float(np.mean([self.judged_success(ep) for ep in fresh])) if fresh else 0.0}

    def learn_words(self, fresh: int) -> list[float]:
        """The subtask head's own steps, by supervision, on the words of the anchor's batches (what the
        demonstrators narrated, what a coach said or let be, the policy's words in its replayed successes), the trunk
        frozen for them: a pass's worth of steps over the ``fresh`` samples this update added. The anchor's steps
        ride on PPO's minibatches, which are few where most practice was coached (credited to no one) -> the
        losses."""
        losses = []
        for _ in range(math.ceil(fresh / self.anchor.batch_size)):
            b = {k: v.to(self.model.device) for k, v in self.anchor.batch(self.generator).items()}
            loss = self.model.subtask_loss(b["images"], b["task_ids"], b["proprio"], b["subtask_ids"],
                                           b["subtask_mask"], head_only=True)
            self._descend(loss, "the subtask head's loss", "learner.words_lr")
            losses.append(loss.item())
        return losses

    def _descend(self, loss: torch.Tensor, what: str, rate: str) -> None:
        """One clipped optimizer step on ``loss``; a loss that is not finite stops the update, naming the fix."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what} is {loss.item()}: the weights or the batch hold NaN/inf. Lower {rate} "
                                     f"or restore the last good checkpoint.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()

    def refill(self, episodes: list[Episode]) -> None:
        """A resumed run: the replayed successes again (a layout's attempts share its seed, so their groups are
        found again among the stored episodes)."""
        if episodes:
            self.anchor.keep(episodes, list(self.group_advantages(episodes)))

    def snapshot(self) -> PolicySnapshot:
        sampling = Sampling(flow_noise=self.flow_noise, noise_at=self.noise_at, noise=0.0, practice_noise=0.0) \
            if self.model.action_head == "flow" else Sampling()
        return PolicySnapshot(version=self.version, weights=self.model.get_weights(),
                              meta={"algorithm": type(self).__name__}, sampling=sampling)


class Anchor:
    """Behaviour cloning beside PPO's loss (weight ``weight``, ``batch_size`` samples a step), which keeps the policy
    near what it could already do: on the replayed demonstrations and, with ``share`` > 0 (``learner.self_imitation``),
    that share of every batch from the policy's own approved successes that beat their layout's other attempts,
    weighted by that group advantage and replayed from every update so far (up to ``max_episodes``). This is
    self-imitation learning (Oh et al. 2018), which imitates past returns above the value: a success where the policy
    usually fails is the coverage its demonstrations lacked (bench/RESULTS.md, "Demo coverage"), and unlike PPO's
    on-policy loss it keeps teaching in every later update. A person's corrections (``Episode.intervened``) join the
    replay too, cloned as demonstrations are, and a coach's words (``Episode.coached``) as the subtask head's
    targets where they were in force."""

    def __init__(self, model: TrainablePolicy, demos: list[Episode], weight: float, batch_size: int, share: float,
                 max_episodes: int):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"learner.self_imitation={share}: the share of each anchor batch from the policy's own "
                             f"successes, in [0, 1)")
        self.model, self.weight, self.batch_size, self.share = model, weight, batch_size, share
        self.data = ChunkDataset(model, max_episodes=max_episodes)
        self.data.add(demos, pinned=True)
        self.num_demos = self.data.num_episodes

    @property
    def replayed(self) -> int:
        """The policy's own successes held (the oldest leave past ``max_episodes``)."""
        return len({k for k in self.data.keys() if not k.endswith(("/corrections", "/coaching"))}) - self.num_demos

    def keep(self, episodes: list[Episode], adv: list[np.ndarray]) -> int:
        """A person's corrections into the replay, as demonstrations (HIL-SERL keeps its interventions with its
        demonstrations: they show what to do where the policy went wrong); with a share, also the approved successes
        with a positive advantage, weighted by it (their executed actions, as a demonstration is cloned) -> how many
        successes."""
        if self.weight > 0:
            self.data.add_corrections(episodes)
            self.data.add_coaching(episodes)
        if self.share <= 0:
            return 0
        kept = [(ep, float(np.mean(a))) for ep, a in zip(episodes, adv)
                if LearnerBase.judged_success(ep) and np.mean(a) > 0]
        for ep, a in kept:
            self.data.add([ep], weight=a, executed=True)
        return len(kept)

    def batch(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``share`` of it from the replay (the policy's successes and a person's corrections), the rest
        demonstrations; without a share, drawn uniformly from both."""
        return self.data.sample(self.batch_size, generator, 1.0 - self.share if self.share > 0 else None)

    def loss(self, generator: torch.Generator, device) -> torch.Tensor:
        """The imitation loss on one ``batch``."""
        if not self.data.num_episodes:
            return torch.zeros((), device=device)
        b = {k: v.to(device) for k, v in self.batch(generator).items()}
        ctx = self.model.context(b["images"], b["ids"], b["proprio"])
        loss = self.model.imitation_loss(ctx, b["actions"], b["weights"], generator=generator)
        if "subtask_mask" in b:  # a subtask head keeps learning what the demonstrators and people said they did
            loss = loss + self.model.subtask_loss(b["images"], b["task_ids"], b["proprio"], b["subtask_ids"],
                                                  b["subtask_mask"])
        return loss
