"""The contracts every part of flywheel speaks. This module imports nothing else of the project.

The loop, as data (see ``flywheel.loop.run_loop``)::

    collect  : Policy (a PolicySnapshot) acts in environments      -> Episode
    store    : EpisodeStore.add(Episode)                            (durable, append-only)
    label    : SuccessDetector scores Episode                       -> Label (appended, never rewritten)
    update   : Learner.update(labelled episodes)                    -> training stats
    publish  : Learner.snapshot()                                   -> PolicySnapshot v+1 -> every actor
    evaluate : held-out seeds, simulator ground truth               -> success rate with a 95% interval

Shapes and dtypes (B = batch, T = steps, H x W = image, P = proprio dims, C = chunk length, A = action dims):

- ``observations["image"]``:   uint8   (T+1, H, W, 3)  RGB, the overhead camera, one frame per state
- ``observations["proprio"]``: float32 (T+1, P)        end-effector x, y in [0, 1] and gripper closed in {0, 1}
- optional sensors, where on:  ``"wrist"`` uint8 (T+1, H, W, 3) (a camera on the hand), ``"depth"`` float32
                               (T+1, H, W) (distance from the overhead camera), ``"touch"`` float32 (T+1, 1)
- what a model reads of them:  ``sensor_inputs`` -> the image channels of its sensors, stacked, and proprio (+ touch)
- ``actions``:                 float32 (T, A)          as executed, each in [-1, 1]
- a policy's action chunk:     float32 (B, C, A)
- ``extras["chunks"]``:        float32 (K, C, A)        policy episodes: every chunk the policy sampled ...
- ``extras["chunk_steps"]``:   int64 (K,)               ... and the step at which it sampled each
- ``extras["aux_positions"]``: float32 (T+1, 4)        simulated episodes: the named block's and target's true x, y
                                                        (privileged state, for auxiliary training losses only)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "eval", "holdout")
LABEL_SOURCES = ("detector", "human", "ground_truth", "demo")


@dataclasses.dataclass(frozen=True)
class Label:
    """One judgement of an episode. An episode may carry many; relabelling appends, it never rewrites."""

    source: str  # one of LABEL_SOURCES
    success: bool
    version: str = ""  # detector version ("detector-3"), a human's name, or "" for ground truth / demo markers
    score: float | None = None  # P(success) for a detector
    threshold: float | None = None
    created: float = dataclasses.field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.source not in LABEL_SOURCES:
            raise ValueError(f"label source {self.source!r} is not one of {LABEL_SOURCES}")


@dataclasses.dataclass
class Episode:
    """One attempt at one instruction, with its lineage.

    ``ground_truth`` holds the simulator's own success predicate. It is kept apart from ``labels``: the learner reads
    labels only, and sees ground truth only where a config says so explicitly.
    """

    id: str
    task: str  # task family, e.g. "push"
    instruction: str
    env_id: str
    seed: int
    split: str  # one of SPLITS
    policy_version: int  # -1 for the scripted expert
    observations: dict[str, np.ndarray]
    actions: np.ndarray
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ground_truth: dict[str, Any] | None = None  # {"success": bool} where the environment knows
    labels: list[Label] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # created, interventions, resets, ...

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"episode split {self.split!r} is not one of {SPLITS}")

    @property
    def num_steps(self) -> int:
        return int(self.actions.shape[0])

    def latest_label(self, source: str | None = None) -> Label | None:
        """The newest label, optionally only from one source."""
        chosen = [lab for lab in self.labels if source is None or lab.source == source]
        return max(chosen, key=lambda lab: lab.created) if chosen else None

    def trusted_success(self) -> bool | None:
        """The verdict to judge a detector by: the newest label that is not a detector's (a human's, the
        simulator's, a demonstration marker), else the simulator's ground truth; None where there is neither."""
        trusted = [lab for lab in self.labels if lab.source != "detector"]
        if trusted:
            return max(trusted, key=lambda lab: lab.created).success
        if self.ground_truth and "success" in self.ground_truth:
            return bool(self.ground_truth["success"])
        return None

    def collection_order(self) -> tuple[int, int, int]:
        """Where the episode stood in the collection that made it (``collection_order``)."""
        return collection_order(self.seed, self.info)

    def made_on_purpose(self) -> bool:
        """A hard example the scripted expert made for the detector (actors/expert.py HARD_EXAMPLES; ``near_miss``
        in stores from before the other kinds): not what a detector will meet, and, up to the step where it turns
        away, no different from a success."""
        return bool(self.info.get("hard") or self.info.get("near_miss"))

    def intervened(self) -> np.ndarray:
        """Bool (T,): True at the steps where a person took over and acted instead of the policy (``extras[
        INTERVENTION]``; all False where the episode records none). On a robot, the host's teleoperation writes it;
        in simulation the scripted expert stands in for the person (``rollout.corrections``). Learners clone those
        steps as demonstrations, and do not credit the policy with an episode it needed help to finish."""
        mask = self.extras.get(INTERVENTION)
        return np.zeros(self.num_steps, bool) if mask is None else np.asarray(mask, bool)


INTERVENTION = "intervention"  # the extras key of Episode.intervened


@dataclasses.dataclass(frozen=True)
class PolicySnapshot:
    """One published version of the trainable weights, as numpy arrays (cheap to ``ray.put`` and to send)."""

    version: int
    weights: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"sampling": {"indicator": 1, "guidance": 2}}


CAMERA_CHANNELS = {"overhead": ("image", 3), "wrist": ("wrist", 3), "depth": ("depth", 1)}
DEPTH_NEAR, DEPTH_FAR = 0.75, 1.0  # depth readings mapped to image bytes 255 .. 0 (nearer is brighter)


def collection_order(seed: int, info: dict) -> tuple[int, int, int]:
    """An episode's place in the collection that made it: its seed, then the sampling seed of the worker's share and
    its place among that share's seeds (actors/rollout.py records both). A collection's episodes sorted by it are in
    the order of its seed list, whether they come from the actors or back from the store: the learner's buffer fills
    in the same order in a run and in that run resumed. (Episodes stored before both were recorded sort by seed
    alone.)"""
    return int(seed), int(info.get("sample_seed", 0)), int(info.get("position", 0))


def sensor_inputs(observations: dict[str, np.ndarray], sensors: tuple[str, ...] | list[str],
                  index: Any = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """What a model with ``sensors`` reads from observations (an episode's, or a batch's), at ``index`` along the
    first axis: (image uint8 (..., H, W, channels), proprio float32 (..., P [+1 with touch])).

    The image stacks, in this order, the overhead RGB, the wrist RGB and the depth (as one byte channel). With the
    overhead camera alone it is ``observations["image"]`` itself (a view, not a copy)."""
    missing = [s for s in sensors if sensor_key(s) not in observations]
    if missing:
        raise KeyError(f"the model reads sensors {list(sensors)}, but these observations lack {missing}: turn them "
                       f"on with env.sensors")
    parts = []
    for s in sensors:
        if s not in CAMERA_CHANNELS:
            continue
        x = observations[CAMERA_CHANNELS[s][0]][index]
        if s == "depth":
            x = np.clip((DEPTH_FAR - x) / (DEPTH_FAR - DEPTH_NEAR) * 255.0, 0, 255).astype(np.uint8)[..., None]
        parts.append(x)
    image = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    proprio = observations["proprio"][index]
    if "touch" in sensors:
        proprio = np.concatenate([proprio, observations["touch"][index]], axis=-1)
    return image, np.asarray(proprio, np.float32)


def sensor_key(sensor: str) -> str:
    """The observation key a sensor is recorded under ("overhead" -> "image")."""
    return CAMERA_CHANNELS[sensor][0] if sensor in CAMERA_CHANNELS else sensor


def observation_keys(sensors: tuple[str, ...] | list[str]) -> set[str]:
    """Every observation key a model with ``sensors`` reads (proprioception is always among them)."""
    return {"proprio", *(sensor_key(s) for s in sensors)}


def image_channels(sensors: tuple[str, ...] | list[str]) -> int:
    return sum(CAMERA_CHANNELS[s][1] for s in sensors if s in CAMERA_CHANNELS)


def camera_channels(sensors: tuple[str, ...] | list[str]) -> dict[str, slice]:
    """Where each camera's channels lie in the image ``sensor_inputs`` stacks for ``sensors``."""
    out, start = {}, 0
    for s in sensors:
        if s in CAMERA_CHANNELS:
            out[s] = slice(start, start + CAMERA_CHANNELS[s][1])
            start += CAMERA_CHANNELS[s][1]
    return out


@runtime_checkable
class Policy(Protocol):
    """Observation batch + instructions -> action chunk."""

    chunk: int  # C: steps per predicted chunk
    action_dim: int  # A
    explore: bool  # set by the rollout worker: True while practising (train split), False in evaluation

    def act(
        self, images: np.ndarray, proprio: np.ndarray, instructions: list[str], seed: int | None = None
    ) -> np.ndarray:
        """images uint8 (B, H, W, channels), proprio float32 (B, P) -> actions float32 (B, C, A) in [-1, 1].
        Both as ``sensor_inputs`` builds them for the policy's ``sensors`` (default: the overhead camera)."""
        ...

    def get_weights(self) -> dict[str, np.ndarray]: ...

    def load_weights(self, weights: dict[str, np.ndarray], sampling: dict[str, Any] | None = None) -> None:
        """Apply weights: all of them, or only the arrays that changed (a delta; the rest stay as they are).
        ``sampling`` carries how the learner wants this version sampled (PolicySnapshot.meta). A policy may keep
        the arrays it is given rather than copy them: the caller must not write to them afterwards."""
        ...


@runtime_checkable
class SuccessDetector(Protocol):
    """An episode's frames + its instruction -> P(success). Frozen while it labels one iteration."""

    version: str
    threshold: float

    def score(self, episodes: list[Episode]) -> np.ndarray:
        """P(success) per episode, float32 (N,)."""
        ...


@runtime_checkable
class Learner(Protocol):
    """Turns labelled episodes into better weights."""

    version: int

    def update(self, episodes: list[Episode]) -> dict[str, float]:
        """One RL update from newly labelled episodes; returns training statistics."""
        ...

    def snapshot(self) -> PolicySnapshot: ...

    def restore(self, weights: dict[str, np.ndarray]) -> None:
        """Go back to earlier weights, as a new version (a rollback)."""
        ...

    def resume_from(self, weights: dict[str, np.ndarray], training: dict[str, Any]) -> None:
        """Become a checkpoint again, version and optimizer included (a resumed run; recovery after a fault)."""
        ...


class LearnerLost(RuntimeError):
    """The learner's process died (or missed its deadline) during an update. The update is lost; the learner has
    been restarted and restored from the checkpoint of the deployed version, so the loop goes on from there."""
