"""A team's own policy and environment, defined here and nowhere in flywheel: what tests/test_plugins.py plugs in.

- ``make_env``: "Reach", a gymnasium env of its own: a point moves on a plane toward a target; observations are a
  small picture and proprio (the point's and the target's x, y); it judges itself (``info["success"]``) and has a
  scripted expert (``expert_action``), so flywheel can make demonstrations and train a detector on it.
- ``make_policy``: a Gaussian MLP policy with the ``TrainablePolicy`` contract (imitation loss, exact
  log-probabilities of its draws; no indicator, residual or auxiliary head), and the ``Policy`` that acts with it.
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from flywheel.contracts import PolicyBundle, Sampling

SIZE, CHUNK, ACTION_DIM, PROPRIO = 16, 4, 2, 4
STEP = 0.08  # how far one action of 1 moves the point
EXPLORE = 0.5  # the std of practice draws at practice_noise 1


class Reach(gym.Env):
    """Move the point (proprio[:2]) to the target (proprio[2:]) within ``max_steps``: success within 0.08."""

    def __init__(self, max_steps: int = 24, family: str = "any"):
        self.max_steps = int(max_steps)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8),
            "proprio": gym.spaces.Box(0.0, 1.0, (PROPRIO,), np.float32)})

    def reset(self, *, seed: int | None = None, options=None):
        rng = np.random.default_rng(seed)
        self.point, self.target = rng.uniform(0.1, 0.9, 2), rng.uniform(0.1, 0.9, 2)
        self.t = 0
        return self._obs(), self._info()

    def step(self, action):
        self.point = np.clip(self.point + STEP * np.clip(np.asarray(action, np.float64), -1, 1), 0.0, 1.0)
        self.t += 1
        success = self._reached()
        return self._obs(), float(success), success, self.t >= self.max_steps, self._info()

    def expert_action(self, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
        rng = rng or np.random.default_rng()
        direction = (self.target - self.point) / STEP
        return np.clip(direction + noise * rng.standard_normal(2), -1, 1).astype(np.float32)

    def _reached(self) -> bool:
        return bool(np.linalg.norm(self.point - self.target) < 0.08)

    def _obs(self):
        image = np.zeros((SIZE, SIZE, 3), np.uint8)
        for (x, y), channel in ((self.point, 0), (self.target, 1)):
            image[min(SIZE - 1, int(y * SIZE)), min(SIZE - 1, int(x * SIZE)), channel] = 255
        return {"image": image, "proprio": np.concatenate([self.point, self.target]).astype(np.float32)}

    def _info(self):
        return {"instruction": "reach the target", "family": "reach", "success": self._reached()}


def make_env(max_steps: int = 24, **_):
    """The env plug-in: ``env.name=byo:make_env``; of the env config it reads ``max_steps`` alone."""
    return Reach(max_steps=max_steps)


class GaussianMLP(nn.Module):
    """A chunk of actions from proprio by an MLP; practice draws around it (std ``flow_noise``), which gives each
    chunk an exact log-probability, as the ``TrainablePolicy`` contract's "log_prob" capability asks."""

    capabilities = frozenset({"log_prob"})
    chunk, action_dim, sensors, action_head, feature_dim = CHUNK, ACTION_DIM, ("overhead",), "flow", 64

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(PROPRIO, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, CHUNK * ACTION_DIM)

    @property
    def device(self):
        return self.head.weight.device

    def token_ids(self, instructions):
        return np.zeros((len(instructions), 1), np.int64)  # one task: the instruction carries nothing

    def context(self, images, ids, proprio):
        return self.body(proprio.float())

    @torch.no_grad()
    def features(self, images, ids, proprio):
        return self.context(None, None, torch.as_tensor(proprio, device=self.device))

    def backbone_parameters(self):
        return list(self.body.parameters())

    def mean(self, ctx):
        return torch.tanh(self.head(ctx)).view(-1, CHUNK, ACTION_DIM)

    def imitation_loss(self, ctx, actions, weights=None, indicator=None, generator=None):
        per_sample = (self.mean(ctx) - actions).pow(2).mean(dim=(1, 2))
        return per_sample.mean() if weights is None else (per_sample * weights).sum() / weights.sum().clamp_min(1e-8)

    def log_prob(self, ctx, recorded, flow_noise=0.0):
        return torch.distributions.Normal(self.mean(ctx), flow_noise).log_prob(recorded["drawn"])

    def get_weights(self):
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}

    def load_weights(self, weights):
        self.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, strict=False)


class GaussianActor:
    """The ``Policy`` that acts with a GaussianMLP's weights: its mean, or a draw around it in practice."""

    def __init__(self):
        self.model = GaussianMLP().eval()
        self.chunk, self.action_dim, self.sensors = CHUNK, ACTION_DIM, ("overhead",)
        self.explore, self.sampling, self.last_extras = False, Sampling(), {}

    def act(self, images, proprio, instructions, seed=None):
        with torch.no_grad():
            mean = self.model.mean(self.model.context(None, None, torch.from_numpy(proprio)))
        self.last_extras = {}
        s = self.sampling
        std = s.flow_noise or EXPLORE * s.practice_noise  # PPO's draw, or filtered BC's practice noise
        if self.explore and std > 0:
            gen = torch.Generator().manual_seed(int(seed or 0))
            drawn = mean + std * torch.randn(mean.shape, generator=gen)
            if s.flow_noise > 0:  # the exact log-probability PPO asks for
                logp = torch.distributions.Normal(mean, std).log_prob(drawn)
                self.last_extras = {"drawn": drawn.numpy(), "logp": logp.numpy()}
            mean = drawn
        return mean.clamp(-1, 1).numpy().astype(np.float32)

    def get_weights(self):
        return self.model.get_weights()

    def load_weights(self, weights, sampling: Sampling | None = None):
        self.model.load_weights(weights)
        self.sampling = sampling or Sampling()


def make_policy(checkpoint: str = "", eval_noise: float | None = None) -> PolicyBundle:
    """The policy plug-in: ``policy.name=byo:make_policy``. It starts from its own random weights (a real one
    would load ``checkpoint``)."""
    return PolicyBundle(weights=GaussianMLP().get_weights(), sensors=("overhead",), make_model=GaussianMLP,
                        make_actor=functools.partial(GaussianActor), meta={"description": "byo Gaussian MLP"})


class ReachJudge:
    """A team's own reward model, hand-written: success where the point ended within 0.08 of the target."""

    version, threshold = "byo-judge", 0.5

    def score(self, episodes):
        return np.array([float(np.linalg.norm(ep.observations["proprio"][-1, :2] - ep.observations["proprio"][-1, 2:])
                               < 0.08) for ep in episodes], np.float32)


def make_detector(ctx):
    """The detector plug-in: ``detector.name=byo:make_detector`` (audited against the simulator like any other)."""
    ctx.say("detector: byo's hand-written reach judge")
    return ReachJudge()
