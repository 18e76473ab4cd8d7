"""The contracts every part of flywheel speaks. This module imports nothing else of the project.

The loop, as data (``flywheel.loop.run_loop`` turns it)::

    collect  : Rollouts run the published Policy in environments    -> Episode
    store    : EpisodeStore.add(Episode)                            (durable, append-only)
    label    : SuccessDetector scores Episode                       -> Label (appended, never rewritten)
    audit    : a sample of labels against trusted ones              -> alarm: retrain the detector, roll back
    update   : Learner.update(labelled episodes)                    -> training stats
    gate     : the candidate against the deployed version           -> promote, or roll back
    publish  : Learner.snapshot()                                   -> PolicySnapshot v+1 -> every actor
    log      : one metrics row per iteration; held-out evaluation   -> success rate with a 95% interval

What a team brings enters here: a ``Policy`` to act (a ``TrainablePolicy`` to be trained by the built-in learners),
an environment (gymnasium), a ``SuccessDetector``, a ``Learner``; ``Rollouts`` is what the run builds from the first
two. Optional capabilities (asynchronous collection, usage and fault reports) are protocols of their own, checked
with ``isinstance``.

Shapes and dtypes (B = batch, T = steps, H x W = image, P = proprio dims, C = chunk length, A = action dims):

- ``observations["image"]``:   uint8   (T+1, H, W, 3)  RGB, the overhead camera, one frame per state
- ``observations["proprio"]``: float32 (T+1, P)        end-effector x, y in [0, 1] and gripper closed in {0, 1}
- optional sensors, where on:  ``"wrist"`` uint8 (T+1, H, W, 3) (a camera on the hand), ``"depth"`` float32
                               (T+1, H, W) (distance from the overhead camera), ``"touch"`` float32 (T+1, 1)
- what a model reads of them:  ``sensor_inputs`` -> the image channels of its sensors, stacked, and proprio (+ touch)
- ``actions``:                 float32 (T, A)          as executed, each in [-1, 1]
- a policy's action chunk:     float32 (B, C, A)
- ``extras``: what the policy drew besides its actions, and what the rollout recorded (``Extras`` names the keys)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

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
        """A hard example the scripted expert made for the detector (actors/expert.py HARD_EXAMPLES): not what a
        detector will meet, and, up to the step where it turns away, no different from a success."""
        return bool(self.info.get("hard"))

    def intervened(self) -> np.ndarray:
        """Bool (T,): True at the steps where a person took over and acted instead of the policy (``extras[
        INTERVENTION]``; all False where the episode records none). On a robot, the host's teleoperation writes it;
        in simulation the scripted expert stands in for the person (``rollout.corrections``). Learners clone those
        steps as demonstrations, and do not credit the policy with an episode it needed help to finish."""
        mask = self.extras.get(INTERVENTION)
        return np.zeros(self.num_steps, bool) if mask is None else np.asarray(mask, bool)

    def coached(self) -> np.ndarray:
        """Bool (T,): True at the steps where a person's words were in force (``extras[COACHING]``): from the
        decision at which they said what the policy should be doing, until that subtask ended. What they said, who
        and when, is ``info["coaching"]`` (actors/coach.py)."""
        said = self.extras.get(Extras.COACHING)
        return np.zeros(self.num_steps, bool) if said is None else np.asarray(said) >= 0


class Extras:
    """The keys of ``Episode.extras``: what a rollout recorded besides observations and actions.

    Every policy episode has ``CHUNKS`` float32 (K, C, A), every chunk the policy sampled, and ``CHUNK_STEPS``
    int64 (K,), the step at which it sampled each. What else is there depends on how the policy sampled
    (``Sampling``): ``LOGP`` (the log-probability of each number drawn: (K, C, A) for tokens or a draw at the output,
    (K, S, C, A) for a draw at every one of S flow steps), ``FLOW_CHAIN`` (K, S+1, C, A) or ``DRAWN`` (K, C, A)
    (the draw before clamping), and for a residual policy ``BASE_CHUNKS``, ``RESIDUALS`` (K, C, A) and
    ``RESIDUAL_LOGP`` (K,). A policy with a subtask head records ``PROMPT`` (K, L), the token ids of the subtask
    it named at each decision, which its chunk was drawn for. Simulated episodes add ``AUX_POSITIONS`` float32
    (T+1, 4), the named block's and target's true x, y: privileged state for auxiliary losses, never shown to the
    learner (``learner_view``), and
    ``SUBTASK`` int64 (T+1,), which of ``info["subtasks"]`` the simulator saw under way at each observation (its
    changes are the subtask boundaries; privileged too). ``NARRATION`` int64 (T,) is what the demonstrator said it
    was doing at each step it acted (an index into ``info["subtasks"]``; -1 where it did not act): the scripted
    expert narrates its subtasks. ``INTERVENTION`` bool (T,) marks the steps a person acted
    (``Episode.intervened``). ``COACHING`` int64 (T,) is, at each step, which of ``info["coaching"]`` (a person's
    words: {"step", "words", "who", "time"}) was in force, -1 where none was (``Episode.coached``): verbal coaching,
    the subtask the policy should have been doing. An episode a coach stood by in names it, ``info["coach"]``, even
    where it said nothing."""

    CHUNKS = "chunks"
    CHUNK_STEPS = "chunk_steps"
    LOGP = "logp"
    FLOW_CHAIN = "flow_chain"
    DRAWN = "drawn"
    BASE_CHUNKS = "base_chunks"
    RESIDUALS = "residuals"
    RESIDUAL_LOGP = "residual_logp"
    AUX_POSITIONS = "aux_positions"
    SUBTASK = "subtask"
    NARRATION = "narration"
    PROMPT = "prompt"
    INTERVENTION = "intervention"
    COACHING = "coaching"
    PRIVILEGED = (AUX_POSITIONS, SUBTASK)  # what the learner never sees


INTERVENTION = Extras.INTERVENTION  # the extras key of Episode.intervened


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a learner wants its policy version sampled, carried by ``PolicySnapshot.sampling`` to every actor.

    In practice (``Policy.explore``) a flow policy starts from ``practice_noise`` times its noise and, with
    ``flow_noise`` > 0, draws around the flow at every step (``noise_at="steps"``) or only at its output
    (``"output"``): either gives a chunk an exact log-probability. Outside practice it starts from ``noise`` times
    its noise, unless the run's ``eval.noise`` says otherwise. ``indicator`` conditions on an advantage (RECAP;
    0 = none) and ``guidance`` > 1 applies classifier-free guidance. ``residual``: "explore" draws a residual
    correction in practice and takes its mean in evaluation; "off" has none. A policy ignores what it cannot do."""

    indicator: int = 0
    guidance: float = 1.0
    practice_noise: float = 1.0
    flow_noise: float = 0.0
    noise_at: str = "steps"
    noise: float = 1.0
    residual: str = "off"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PolicySnapshot:
    """One published version of the trainable weights, as numpy arrays (cheap to ``ray.put`` and to send)."""

    version: int
    weights: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded with the checkpoint (algorithm, ...)
    sampling: Sampling = Sampling()


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
    """Observation batch + instructions -> action chunk.

    Optional: ``sensors`` (what ``act`` is given, by ``sensor_inputs``; default the overhead camera) and
    ``last_extras`` (what the last ``act`` drew besides its actions, each (B, ...) by row: the rollout records them
    as the episode's ``Extras``, which a learner such as PPO needs)."""

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

    def load_weights(self, weights: dict[str, np.ndarray], sampling: Sampling | None = None) -> None:
        """Apply weights: all of them, or only the arrays that changed (a delta; the rest stay as they are).
        ``sampling`` carries how the learner wants this version sampled (``PolicySnapshot.sampling``). A policy may keep
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
    """Turns labelled episodes into better weights, one version per update.

    The loop calls ``update`` with the iteration's episodes as ``learner_view`` shows them (labels, never the
    simulator's truth), then ``snapshot`` to publish; ``restore`` on a rollback. The run checkpoints
    ``training_state`` beside every published version's weights, and a resumed run (or a recovery from NaN) calls
    ``resume_from`` with both, then ``refill`` with the stored episodes it had already learned from."""

    version: int

    def update(self, episodes: list[Episode]) -> dict[str, float]:
        """One RL update from newly labelled episodes; returns training statistics."""
        ...

    def snapshot(self) -> PolicySnapshot: ...

    def restore(self, weights: dict[str, np.ndarray]) -> None:
        """Go back to earlier weights, as a new version (a rollback)."""
        ...

    def training_state(self) -> dict[str, Any]:
        """Everything but the policy weights that a resumed learner needs to go on as this one would: version,
        optimizer, generators, moving averages. Nested dicts of tensors, arrays and plain values."""
        ...

    def resume_from(self, weights: dict[str, np.ndarray], training: dict[str, Any]) -> None:
        """Become a checkpoint again, version and optimizer included (a resumed run; recovery after a fault)."""
        ...

    def refill(self, episodes: list[Episode]) -> None:
        """Put episodes it had learned from before a resume back in its replay, without training on them."""
        ...


@runtime_checkable
class Closes(Protocol):
    """A part holding processes or files (a learner actor, rollout actors): the run closes it at the end."""

    def close(self) -> None: ...


@runtime_checkable
class Restarts(Protocol):
    """A part that replaces a process it lost (Ray actors), and says so: the run's summary reports both."""

    restarts: int
    faults: list[dict[str, Any]]


@runtime_checkable
class Rollouts(Protocol):
    """The actors: run the published policy on environments, one episode per seed.

    ``collect`` returns the episodes in seed order, less any lost to a crashing environment; ``split`` is the
    episodes' (practice is "train", evaluation and the gate "eval"; "robust" is an evaluation in the scenes of the
    held-out randomisation, its episodes stamped "eval"). ``sample_seed`` seeds the policy's draws, so
    a collection is reproducible from its seeds. ``corrected=False``: no person steps in, even in practice."""

    published_version: int  # the newest snapshot the actors hold (-1: none yet)

    def collect(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True) -> list[Episode]: ...

    def publish(self, snapshot: PolicySnapshot) -> list[int]:
        """Send a snapshot to every actor; returns the version each holds."""
        ...


@runtime_checkable
class CollectsAsync(Protocol):
    """Rollouts that collect while the driver does something else (``rollout.overlap``)."""

    def collect_async(self, seeds: list[int], split: str, sample_seed: int = 0, corrected: bool = True,
                      more: Iterator[tuple[list[int], int]] | None = None) -> Callable[[], list[Episode]]:
        """Start ``collect`` and return at once; calling the result waits for the episodes. ``more``: rounds of
        practice ``(seeds, sample seed)`` beyond ``seeds`` that idle actors go on with until the next ``publish``;
        every round started comes back in the result."""
        ...


@runtime_checkable
class ReportsUsage(Protocol):
    """Rollouts that report each actor's ``{"busy_s", "alive_s"}``, and what the last ``publish`` cost."""

    last_sync: dict[str, float]

    def usage(self) -> list[dict[str, float]]: ...


@runtime_checkable
class TrainablePolicy(Protocol):
    """What the built-in learners need of a model: a ``torch.nn.Module`` (parameters, ``train``/``eval``, ``to``)
    with the methods below. The ``Policy`` that acts in the actors is built from the same weights.

    Batches are torch tensors on ``device``: ``images`` uint8 (B, H, W, channels) and ``proprio`` float32 (B, P) as
    ``sensor_inputs`` builds them for ``sensors``; ``ids`` int64 (B, L) from ``token_ids``; ``actions`` float32
    (B, C, A) in [-1, 1]. The context ``ctx`` float32 (B, D) is what its action head reads; a value or critic head
    reads the same features (``features``), and a learner that freezes the backbone caches them.

    ``capabilities`` names what it offers beyond imitation, and the learners that need it check:
    "log_prob" (``log_prob``: PPO), "indicator" (an advantage indicator: RECAP; ``conditioning_parameters``,
    ``start_conditioning`` and ``imitation_loss(indicator=)``), "residual" (a ``residual`` head: residual PPO),
    "aux" (``auxiliary_loss`` on privileged positions, in simulation), "subtask" (a subtask head: it names the
    next subtask in words and acts on them; ``subtask_loss`` trains it on narration, and its episodes record
    ``Extras.PROMPT``, the words each chunk was drawn for)."""

    chunk: int  # C
    action_dim: int  # A
    sensors: tuple[str, ...]
    action_head: str  # "flow" (continuous chunks) or "tokens" (discrete bins)
    capabilities: frozenset[str]
    feature_dim: int  # D
    device: Any  # torch.device

    def token_ids(self, instructions: list[str]) -> np.ndarray:
        """int64 (B, L)."""
        ...

    def context(self, images: Any, ids: Any, proprio: Any) -> Any:
        """(B, D), with gradients."""
        ...

    def features(self, images: np.ndarray, ids: np.ndarray, proprio: np.ndarray) -> Any:
        """(B, D) of numpy inputs, without gradients."""
        ...

    def backbone_parameters(self) -> list[Any]:
        """What computes the context (frozen when a learner trains the action head alone)."""
        ...

    def imitation_loss(self, ctx: Any, actions: Any, weights: Any | None = None, indicator: Any | None = None,
                       generator: Any | None = None) -> Any:
        """Its own imitation objective (flow matching, token cross-entropy) on target chunks, averaged with
        per-sample ``weights`` (B,); ``generator`` (CPU) draws any noise it needs: a scalar tensor."""
        ...

    def log_prob(self, ctx: Any, recorded: dict[str, Any], flow_noise: float = 0.0) -> Any:
        """The exact log-probability, under the current weights, of each number a practice draw recorded
        (``recorded``: its ``Extras``, batched) -> (B, ..., C, A). Only with the "log_prob" capability."""
        ...

    def get_weights(self) -> dict[str, np.ndarray]: ...

    def load_weights(self, weights: dict[str, np.ndarray]) -> None: ...


@dataclasses.dataclass
class PolicyBundle:
    """What a policy plug-in (``policy.name``) gives the run: the starting weights (version 0) and how to build
    the two sides that use them. ``make_model()`` builds the ``TrainablePolicy`` the learner trains (weights not yet
    loaded), ``make_actor()`` a ``Policy`` that acts in a rollout actor; both must pickle (Ray sends them to other
    processes). ``meta`` is the checkpoint's record; ``record`` goes beside every checkpoint the run writes, so that
    it can be loaded again as this policy."""

    weights: dict[str, np.ndarray]
    sensors: tuple[str, ...]
    make_model: Callable[[], Any]
    make_actor: Callable[[], Policy]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)


class LearnerLost(RuntimeError):
    """The learner's process died (or missed its deadline) during an update. The update is lost; the learner has
    been restarted and restored from the checkpoint of the deployed version, so the loop goes on from there."""
