"""A learned success detector: a window of an episode's last frames (every camera that is on) + its instruction ->
P(success).

The window shows what one frame cannot: a hand that has just let go of the block over the bowl, against one still
holding it there at time-out (from above they differ only in the ring's shade).

It reuses the VLA's vision-language encoder (instruction tokens cross-attending over image patches), and starts from
the starting policy's encoder weights, because judging "is the *red* block on the *green* pad" is the same
grounding problem as acting on it. (Trained from scratch on a few hundred episodes it reached AUROC 0.76 after 600
steps.) It has no proprioception
input: it judges what the camera shows, as it would on a robot.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from flywheel.checkpoint import numpy_state
from flywheel.contracts import Episode, camera_channels, image_channels, sensor_inputs
from flywheel.vla.model import VisionLanguageEncoder, VLAConfig
from flywheel.vla.tokenizer import Tokenizer


@dataclasses.dataclass
class DetectorNetConfig:
    """The detector network's shape (the run's detector settings are flywheel/config.py DetectorConfig)."""

    image_size: int = 64
    patch: int = 8
    dim: int = 64
    heads: int = 4
    ground_layers: int = 2
    trunk_layers: int = 2
    max_tokens: int = 12
    sensors: tuple[str, ...] = ("overhead",)  # the cameras it judges from (flywheel/contracts.py sensor_inputs)
    window: int = 1  # frames judged together: the judged step and the window - 1 before it, ``stride`` apart
    stride: int = 2
    horizon: int = 40  # the progress head's steps-to-go bins: 0 .. horizon, and one more for "not before the end"

    def __post_init__(self):
        self.sensors = tuple(s for s in self.sensors if s != "touch")  # it has no proprioception


class DetectorNet(nn.Module):
    def __init__(self, cfg: DetectorNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or DetectorNetConfig()
        c = self.cfg
        enc_cfg = VLAConfig(
            image_size=c.image_size, patch=c.patch, dim=c.dim, heads=c.heads, ground_layers=c.ground_layers,
            trunk_layers=c.trunk_layers, max_tokens=c.max_tokens, sensors=c.sensors, frames=c.window,
        )
        self.tokenizer = Tokenizer(c.max_tokens)
        self.encoder = VisionLanguageEncoder(enc_cfg, self.tokenizer.vocab_size, use_proprio=False)
        # Where the named block and the named target are (B,4); supervised where simulated episodes record them.
        # It reads only the keypoints (not the rest of the context): a probe showed positions learn ~50x faster so.
        self.keypoint_start = 2 * c.dim
        self.aux_head = nn.Linear(self.encoder.out_dim - self.keypoint_start, 4)
        # The success head reads the context plus those positions, their offset and distance: "is the named block
        # on the named target" is then close to a linear decision once grounding is learned.
        self.head = nn.Sequential(nn.Linear(self.encoder.out_dim + 9, c.dim), nn.GELU(), nn.Linear(c.dim, 1))
        # Progress: a distribution over steps to success (0 .. horizon, or not before the episode ends), read from
        # the same features. Its expectation is a value the learner can shape with (progress_value).
        self.progress_head = nn.Sequential(nn.Linear(self.encoder.out_dim + 9, c.dim), nn.GELU(),
                                           nn.Linear(c.dim, c.horizon + 2))

    def features(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features both heads read, predicted positions of the named block and target (B,4))."""
        ctx = self.encoder(images, ids)
        pos = self.aux_head(ctx[:, self.keypoint_start :])
        rel = pos[:, :2] - pos[:, 2:]
        return torch.cat([ctx, pos, rel, rel.abs(), rel.norm(dim=-1, keepdim=True)], dim=-1), pos

    def forward(self, images: torch.Tensor, ids: torch.Tensor, with_aux: bool = False):
        """images uint8 (B,H,W,C), ids int64 (B,L) -> success logits (B,) [, predicted positions (B,4), progress
        logits (B, horizon + 2)]."""
        feats, pos = self.features(images, ids)
        logits = self.head(feats).squeeze(-1)
        return (logits, pos, self.progress_head(feats)) if with_aux else logits

    def progress_value(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """1 - E[steps to go] / (horizon + 1), in [0, 1]: 1 at success, 0 where success is not expected before the
        episode ends."""
        probs = self.progress_head(self.features(images, ids)[0]).softmax(-1)
        steps = torch.arange(probs.shape[-1], dtype=probs.dtype)
        return 1.0 - (probs * steps).sum(-1) / (probs.shape[-1] - 1)


def window_frames(observations: dict[str, np.ndarray], sensors: tuple[str, ...], t: int, window: int = 1,
                  stride: int = 2) -> np.ndarray:
    """The frames a detector judges step ``t`` (>= 0) by: steps t, t - stride, ... (``window`` of them, clamped at
    the first step), newest first, stacked on the channels: uint8 (H, W, channels x window)."""
    steps = [max(0, t - k * stride) for k in range(window)]
    frames = sensor_inputs(observations, sensors, steps)[0]  # (window, H, W, C)
    return np.concatenate(list(frames), axis=-1) if window > 1 else frames[0]


def init_from_policy(net: DetectorNet, policy_weights: dict[str, np.ndarray],
                     policy_sensors: tuple[str, ...] | list[str] = ("overhead",)) -> int:
    """Start the detector's encoder from a policy's encoder (every tensor whose name matches).

    The policy has already learned to find the objects an instruction names; the detector then only learns the
    judgement. The tensors that read pixels have more input channels when the detector judges a window of frames,
    or from cameras the policy does not read (``policy_sensors``: the policy's): each of the policy's cameras gives
    its weights to the same camera's channels in the newest frame (the coordinate planes keep theirs), and the older
    frames and the other cameras start at zero, so the detector starts by judging the newest frame as the policy
    sees it. Returns the number of tensors copied.
    """
    own = net.encoder.state_dict()
    mine, theirs = camera_channels(net.cfg.sensors), camera_channels(policy_sensors)
    policy_channels = image_channels(policy_sensors)
    copied = {}
    for name, value in policy_weights.items():
        key = name[8:]
        if not name.startswith("encoder.") or key not in own:
            continue
        value = torch.from_numpy(np.array(value))
        target = own[key]
        if tuple(target.shape) != tuple(value.shape):
            if (target.ndim < 2 or target.shape[0] != value.shape[0]
                    or value.shape[1] not in (policy_channels, policy_channels + 2)):
                continue
            widened = torch.zeros_like(target)
            for camera, where in theirs.items():
                if camera in mine:
                    widened[:, mine[camera]] = value[:, where]
            if value.shape[1] == policy_channels + 2:  # the x/y coordinate planes come last
                widened[:, -2:] = value[:, -2:]
            value = widened
        copied[key] = value
    net.encoder.load_state_dict(copied, strict=False)
    return len(copied)


class LearnedSuccessDetector:
    """The ``SuccessDetector`` contract: an ensemble of frozen DetectorNets (one or more ``members``), its version,
    its decision threshold and its calibration: P(success) = sigmoid(mean member logit / temperature + bias)
    (reward/metrics.py fit_calibration), with a (temperature, bias) of its own for each task family in
    ``per_task``. The members' spread is its uncertainty (``uncertainty``)."""

    def __init__(self, nets: DetectorNet | list[DetectorNet], version: str, threshold: float = 0.5,
                 temperature: float = 1.0, bias: float = 0.0,
                 per_task: dict[str, tuple[float, float]] | None = None):
        self.members = [n.eval() for n in (nets if isinstance(nets, list) else [nets])]
        self.net = self.members[0]  # the shape, tokenizer and window every member shares
        self.version = version
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.bias = float(bias)
        self.per_task = {t: (float(a), float(b)) for t, (a, b) in (per_task or {}).items()}

    def weights(self) -> dict[str, np.ndarray]:
        """Every member's tensors, as numpy (member k's under ``member{k}.`` when there are several)."""
        if len(self.members) == 1:
            return numpy_state(self.net)
        return {f"member{i}.{k}": v for i, net in enumerate(self.members) for k, v in numpy_state(net).items()}

    @classmethod
    def from_weights(cls, weights: dict[str, np.ndarray], meta: dict) -> tuple["LearnedSuccessDetector", list[str]]:
        """The detector a checkpoint's tensors and metadata describe -> (detector, tensors it lacked). Only a
        detector from before the progress head may lack tensors (its progress_head's); anything else is an error."""
        cfg = DetectorNetConfig(**meta.get("config", {}))
        count = int(meta.get("members", 1))
        nets, missing = [], []
        for i in range(count):
            prefix = f"member{i}." if count > 1 else ""
            own = {k[len(prefix):]: torch.from_numpy(np.array(v)) for k, v in weights.items() if k.startswith(prefix)}
            net = DetectorNet(cfg)
            lacked, unexpected = net.load_state_dict(own, strict=False)
            if unexpected or any(not k.startswith("progress_head.") for k in lacked):
                raise ValueError(f"these weights are not a detector of the shape their metadata names (missing "
                                 f"{lacked[:3]}, unexpected {unexpected[:3]})")
            nets.append(net)
            missing += lacked
        return cls(nets, meta.get("version", "detector"), meta.get("threshold", 0.5), meta.get("temperature", 1.0),
                   meta.get("bias", 0.0), meta.get("per_task")), missing

    @torch.no_grad()
    def member_logits_frames(self, frames: np.ndarray, instructions: list[str], batch: int = 256) -> np.ndarray:
        """Each member's raw logits: float32 (members, N)."""
        out = np.zeros((len(self.members), len(frames)), np.float32)
        for i in range(0, len(frames), batch):
            ids = torch.from_numpy(self.net.tokenizer(instructions[i : i + batch])[0])
            images = torch.from_numpy(frames[i : i + batch])
            for k, net in enumerate(self.members):
                out[k, i : i + batch] = net(images, ids).numpy()
        return out

    def logits_frames(self, frames: np.ndarray, instructions: list[str], batch: int = 256) -> np.ndarray:
        return self.member_logits_frames(frames, instructions, batch).mean(0)

    def _calibrated(self, logits: np.ndarray, tasks: list[str] | None = None) -> np.ndarray:
        """Logits (..., N) -> calibrated P(success), each episode by its task family's fit where there is one."""
        n = logits.shape[-1]
        fits = [self.per_task.get(t, (self.temperature, self.bias)) for t in tasks] if tasks is not None else \
            [(self.temperature, self.bias)] * n
        temperature, bias = (np.array(x, np.float64) for x in zip(*fits)) if n else (1.0, 0.0)
        z = logits.astype(np.float64) / temperature + bias
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def score_frames(self, frames: np.ndarray, instructions: list[str], batch: int = 256,
                     tasks: list[str] | None = None) -> np.ndarray:
        return self._calibrated(self.logits_frames(frames, instructions, batch), tasks)

    def frames(self, ep: Episode, t: int) -> np.ndarray:
        """The window of ``ep``'s frames this detector judges step ``t`` by."""
        c = self.net.cfg
        return window_frames(ep.observations, c.sensors, t, c.window, c.stride)

    def last_frames(self, episodes: list[Episode]) -> np.ndarray:
        return np.stack([self.frames(ep, ep.num_steps) for ep in episodes]) if episodes else np.zeros((0,))

    def logits(self, episodes: list[Episode], instructions: list[str] | None = None) -> np.ndarray:
        """Raw logits of each episode's last window, under its own instruction or the ``instructions`` given."""
        return self.logits_frames(self.last_frames(episodes), instructions or [ep.instruction for ep in episodes])

    @torch.no_grad()
    def progress(self, ep: Episode, steps: np.ndarray | None = None, batch: int = 256) -> np.ndarray:
        """The progress head's value (DetectorNet.progress_value) at ``steps`` of ``ep`` (default: every frame)."""
        steps = np.arange(ep.num_steps + 1) if steps is None else np.asarray(steps)
        frames = np.stack([self.frames(ep, int(t)) for t in steps])
        ids = torch.from_numpy(self.net.tokenizer([ep.instruction] * len(steps))[0])
        return np.concatenate([
            np.mean([net.progress_value(torch.from_numpy(frames[i:i + batch]), ids[i:i + batch]).numpy()
                     for net in self.members], axis=0)
            for i in range(0, len(steps), batch)])

    def uncertainty(self, episodes: list[Episode], instructions: list[str] | None = None) -> np.ndarray:
        """How much the members disagree on each episode: the standard deviation of their calibrated P(success)
        (0 for a single member, which cannot say)."""
        logits = self.member_logits_frames(self.last_frames(episodes),
                                           instructions or [ep.instruction for ep in episodes])
        return self._calibrated(logits, [ep.task for ep in episodes]).std(0)

    def score(self, episodes: list[Episode], instructions: list[str] | None = None) -> np.ndarray:
        """P(success) of each episode, under its own instruction or the ``instructions`` given (a swapped one)."""
        return self.score_frames(self.last_frames(episodes), instructions or [ep.instruction for ep in episodes],
                                 tasks=[ep.task for ep in episodes])
