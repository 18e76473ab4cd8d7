"""Robots: the contract a robot driver implements, and the safety layer every robot environment passes through.

    policy chunk -> RobotEnv.step(action)
                      guard   NaN/inf action: hold, end the episode (cut short)
                      clamp   to [action_low, action_high], each step's change to max_delta, the workspace box
                      rate    wait for the control period's tick; overruns counted, the tick error measured
                      send    -> Robot.send (the robot side's watchdog holds it still if no command comes in time)
                      observe <- Robot.observe: NaN/inf state, a frozen or stale camera end the episode (cut short)
                      e-stop  a person's (``Operator``) or the robot's: Robot.estop, the episode ends (cut short)

A driver is anything with ``Robot``'s methods: a LeRobot arm through its adapter, a robot host over the network
(actors/robot_host.py), or the tabletop as a simulated robot (actors/sim_robot.py). Its camera names are flywheel's
sensors (overhead, wrist). Every event is recorded on the episode (``info["safety"]``); an episode cut short says so
(``info["cut_short"]``) and the loop keeps it in the store but trains nothing on it as if it were a normal failure.
A robot judges nothing itself: ``info["success"]`` is what a person said (``Operator.verdict``), else None.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from flywheel.contracts import CAMERA_CHANNELS

# Events. Those in CUTS end the episode (kept and marked); the others are corrected and counted.
OVERRUN, CLAMP, DELTA_LIMIT, WORKSPACE, WATCHDOG = "overrun", "clamp", "delta_limit", "workspace", "watchdog"
NAN_ACTION, NAN_OBSERVATION, CAMERA_FROZEN, CAMERA_STALE, ESTOP = (
    "nan_action", "nan_observation", "camera_frozen", "camera_stale", "estop")
CUTS = (NAN_ACTION, NAN_OBSERVATION, CAMERA_FROZEN, CAMERA_STALE, ESTOP)
EVENTS = (OVERRUN, CLAMP, DELTA_LIMIT, WORKSPACE, WATCHDOG) + CUTS


@dataclasses.dataclass
class RobotFrame:
    """One observation: camera name -> uint8 (H, W, 3), the joint/effector state float32 (P,), and when it was
    captured (``time.monotonic()`` on this machine's clock: a host over the network maps its own)."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    stamp: float
    estopped: bool = False  # the robot's own e-stop is pressed (a button on the arm, or on its host)
    verdict: bool | None = None  # a person at the robot judged the episode (its host's /operator)
    said: dict | None = None  # a person's words to the policy ({"words", "who", "time"}: Operator.say)


class Robot(Protocol):
    """What a robot driver implements. ``send`` is a command the robot acts on until the next (a velocity or a
    target); it returns None, or the action a person applied instead (a takeover at the robot); ``hold`` stops it where it is; ``estop`` stops it and keeps it stopped until the next ``reset``; these two may be called from any
    thread (the watchdog's, a person's e-stop) while another call is in flight.
    ``reset`` runs a scripted reset and returns the task's info (``instruction`` at least), or returns None when
    a person must reset the scene (the layer then waits for ``Operator.scene_reset``)."""

    action_dim: int

    def observe(self) -> RobotFrame: ...

    def send(self, action: np.ndarray) -> np.ndarray | None: ...

    def hold(self) -> None: ...

    def estop(self) -> None: ...

    def reset(self, seed: int | None) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class SafetySettings:
    """The safety layer's settings (``env.safety.*``).

    ``rate_hz``: the control rate the layer keeps. ``action_low``/``action_high``: the clamp (a number or one per
    action dim). ``max_delta``: the largest change of any action dim from one step to the next (None: no limit).
    ``workspace_low``/``workspace_high``: the box the effector stays in, over the state dims
    ``workspace_state_dims``, which the action dims ``workspace_action_dims`` move as velocities: a command that
    would carry the effector out of the box along a dim is zeroed along it. ``watchdog_s``: the robot side holds
    still when no command comes within it (a robot host keeps its own: ``flywheel robot-host robot.watchdog_s``). ``freeze_frames``: this many identical camera frames in a row are a frozen
    camera; ``stale_s``: a frame older than this is stale. ``reset_timeout_s``: how long a reset waits for a person.
    """

    rate_hz: float = 10.0
    action_low: float | tuple[float, ...] = -1.0
    action_high: float | tuple[float, ...] = 1.0
    max_delta: float | None = None
    workspace_low: tuple[float, ...] | None = None
    workspace_high: tuple[float, ...] | None = None
    workspace_state_dims: tuple[int, ...] = (0, 1)
    workspace_action_dims: tuple[int, ...] = (0, 1)
    watchdog_s: float = 0.5
    freeze_frames: int = 5
    stale_s: float = 0.5
    reset_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.rate_hz <= 0:
            raise ValueError(f"env.safety.rate_hz={self.rate_hz}: the control rate must be positive")
        if (self.workspace_low is None) != (self.workspace_high is None):
            raise ValueError("env.safety: give both workspace_low and workspace_high, or neither")
        if self.watchdog_s <= 0 or self.freeze_frames < 2 or self.stale_s <= 0:
            raise ValueError("env.safety: watchdog_s and stale_s must be positive and freeze_frames at least 2")

    @property
    def period(self) -> float:
        return 1.0 / self.rate_hz


class Operator:
    """The person beside the robot, as the layer hears them (the web page, or a script in tests): e-stop, "the
    scene is reset", and a verdict on the episode. Thread-safe: the page's handlers call it from their own
    threads."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._estop = False
        self._reset = False
        self._verdict: bool | None = None
        self._said: dict | None = None

    def press_estop(self) -> None:
        with self._lock:
            self._estop = True
            self._lock.notify_all()

    def release_estop(self) -> None:
        with self._lock:
            self._estop = False

    @property
    def estopped(self) -> bool:
        return self._estop

    def scene_reset(self) -> None:
        with self._lock:
            self._reset = True
            self._lock.notify_all()

    def wait_for_reset(self, timeout: float) -> bool:
        """Whether a person said the scene is reset within ``timeout`` seconds (and the e-stop is released)."""
        with self._lock:
            done = self._lock.wait_for(lambda: self._reset and not self._estop, timeout)
            self._reset = False
            return bool(done)

    def judge(self, success: bool) -> None:
        with self._lock:
            self._verdict = bool(success)

    def take_verdict(self) -> bool | None:
        with self._lock:
            verdict, self._verdict = self._verdict, None
            return verdict

    def say(self, words: str, who: str = "") -> None:
        """Verbal coaching: what the policy should be doing now ("the blue one", "now close the drawer"), in force
        from its next decision until the person says something else; empty words withdraw it (actors/coach.py)."""
        with self._lock:
            self._said = {"words": str(words).strip(), "who": str(who) or "person", "time": time.time()}

    def take_words(self) -> dict | None:
        with self._lock:
            said, self._said = self._said, None
            return said


class Watchdog:
    """The command watchdog, on the robot side: ``fed`` at every command; if none comes within ``deadline_s`` the
    robot is held still (once per silence) and the trip recorded with how long after the deadline the hold came."""

    def __init__(self, robot: Robot, deadline_s: float, poll_s: float | None = None):
        self.robot, self.deadline = robot, float(deadline_s)
        self.poll = poll_s if poll_s is not None else min(0.005, self.deadline / 10)
        self.trips: list[float] = []  # seconds past the deadline at which each hold came
        self._last = time.monotonic()
        self._armed = False  # no command since the last hold (or the start): nothing to stop
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="robot-watchdog", daemon=True)
        self._thread.start()

    def fed(self) -> None:
        with self._lock:
            self._last, self._armed = time.monotonic(), True

    def disarm(self) -> None:
        """Between episodes: the robot is held or resetting, and silence is expected."""
        with self._lock:
            self._armed = False

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            with self._lock:
                late = time.monotonic() - self._last - self.deadline
                if not self._armed or late < 0:
                    continue
                self._armed = False
            self.robot.hold()
            with self._lock:
                self.trips.append(time.monotonic() - self._last - self.deadline)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


class ReportedWatchdog:
    """A robot that has its watchdog on its own side (a robot host: ``watchdog_trips``, how late each of its holds
    came) is not watched a second time from here, where a second caller on its connection would race the first."""

    def __init__(self, robot: Robot):
        self.robot = robot

    @property
    def trips(self) -> list[float]:
        return list(self.robot.watchdog_trips)

    def fed(self) -> None: ...

    def disarm(self) -> None: ...

    def close(self) -> None: ...


class SafetyLayer:
    """The per-step checks of ``RobotEnv``, apart from the robot, so that a benchmark can time them alone."""

    def __init__(self, settings: SafetySettings, action_dim: int):
        self.s = settings
        self.low = np.broadcast_to(np.asarray(settings.action_low, np.float32), (action_dim,)).copy()
        self.high = np.broadcast_to(np.asarray(settings.action_high, np.float32), (action_dim,)).copy()
        self.box = None if settings.workspace_low is None else (np.asarray(settings.workspace_low, np.float32),
                                                                 np.asarray(settings.workspace_high, np.float32))
        self.previous: np.ndarray | None = None
        self.last_frames: dict[str, tuple[bytes, int]] = {}  # camera -> (a digest of its last frame, repeats)

    def start(self) -> None:
        self.previous, self.last_frames = None, {}

    def filter(self, action: np.ndarray, state: np.ndarray | None) -> tuple[np.ndarray | None, list[str]]:
        """The action the robot may be sent (None: not finite, hold instead) and the events it raised."""
        a = np.asarray(action, np.float32).reshape(-1)
        if not np.isfinite(a).all():
            return None, [NAN_ACTION]
        events = []
        clamped = np.clip(a, self.low, self.high)
        if not np.array_equal(clamped, a):
            events.append(CLAMP)
        if self.s.max_delta is not None and self.previous is not None:
            limited = np.clip(clamped, self.previous - self.s.max_delta, self.previous + self.s.max_delta)
            if not np.array_equal(limited, clamped):
                events.append(DELTA_LIMIT)
            clamped = limited
        if self.box is not None and state is not None:
            clamped, outward = self._keep_in_box(clamped, state)
            if outward:
                events.append(WORKSPACE)
        self.previous = clamped
        return clamped, events

    def _keep_in_box(self, a: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, bool]:
        low, high = self.box
        where = np.asarray(state, np.float32)[list(self.s.workspace_state_dims)]
        dims = list(self.s.workspace_action_dims)
        v = a[dims]
        outward = ((where <= low) & (v < 0)) | ((where >= high) & (v > 0))
        if not outward.any():
            return a, False
        a = a.copy()
        a[dims] = np.where(outward, 0.0, v)
        return a, True

    def check(self, frame: RobotFrame, now: float) -> list[str]:
        """The events an observation raises: the robot's e-stop, a non-finite state, a camera frozen or stale."""
        events = [ESTOP] if frame.estopped else []
        if not np.isfinite(np.asarray(frame.state, np.float64)).all():
            events.append(NAN_OBSERVATION)
        if now - frame.stamp > self.s.stale_s:
            events.append(CAMERA_STALE)
        for name, image in frame.images.items():
            digest = _digest(image)
            last, repeats = self.last_frames.get(name, (b"", 0))
            repeats = repeats + 1 if digest == last else 1
            self.last_frames[name] = (digest, repeats)
            if repeats >= self.s.freeze_frames and CAMERA_FROZEN not in events:
                events.append(CAMERA_FROZEN)
        return events


def _digest(image: np.ndarray) -> bytes:
    # A sampled strided view: a frozen camera repeats every byte, a live one changes some of these (sensor noise
    # alone does), and hashing a 1/16 sample costs ~2 us rather than ~30 for a whole 224-px frame.
    view = np.ascontiguousarray(np.asarray(image)[::4, ::4])
    return view.tobytes()[:4096] + view.sum(dtype=np.uint64).tobytes()


class RobotEnv(gym.Env):
    """A robot as a gymnasium environment, through the safety layer (module docstring). ``sensors``: the cameras
    the driver's frames carry, as flywheel's sensor names; ``instruction``: the task, where the robot's reset does
    not say; ``max_steps``: the episode's length in control steps."""

    metadata = {"render_modes": []}

    def __init__(self, robot: Robot, settings: SafetySettings | None = None, operator: Operator | None = None,
                 sensors: tuple[str, ...] | list[str] = ("overhead",), instruction: str = "", max_steps: int = 100,
                 task: str = "robot"):
        self.robot, self.s = robot, settings or SafetySettings()
        sends = getattr(robot, "sensors", None)
        if sends is not None and set(sensors) - set(sends) - {"touch", "depth"}:
            raise ValueError(f"the robot sends the cameras {list(sends)}, but env.sensors={list(sensors)}: give "
                             f"env.sensors={list(sends)} (or add the camera to the robot's driver/host)")
        self.operator = operator or Operator()
        self.sensors, self.instruction, self.max_steps, self.task = tuple(sensors), instruction, int(max_steps), task
        self.layer = SafetyLayer(self.s, robot.action_dim)
        self.watchdog = ReportedWatchdog(robot) if hasattr(robot, "watchdog_trips") else \
            Watchdog(robot, self.s.watchdog_s)
        self.action_space = gym.spaces.Box(self.layer.low, self.layer.high, (robot.action_dim,), np.float32)
        self._tick = 0.0
        self._frame: RobotFrame | None = None
        self._record: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.watchdog.disarm()
        self.robot.hold()
        told = self.robot.reset(seed)
        if told is None and not self.operator.wait_for_reset(self.s.reset_timeout_s):
            raise TimeoutError(f"no one said the scene was reset within env.safety.reset_timeout_s="
                               f"{self.s.reset_timeout_s} s: press 'scene is reset' on the robot page, or give the "
                               f"robot a scripted reset")
        told = told or {}
        self.operator.take_verdict()  # a verdict left over from the last episode is not this one's
        self.operator.take_words()  # and words said to it
        self.layer.start()
        self._record = {"events": [], "counts": {e: 0 for e in EVENTS}, "tick_error_s": [], "layer_s": []}
        self._instruction = str(told.get("instruction", self.instruction))
        self._frame = self.robot.observe()
        self.steps, self._trips_before = 0, len(self.watchdog.trips)  # after observing: a host reports its trips then
        self._tick = time.perf_counter()
        return self._observation(self._frame), self._info(None, told)

    def step(self, action):
        self.steps += 1
        state = self._frame.state if self._frame is not None else None
        started = time.perf_counter()
        safe, events = self.layer.filter(action, state)
        cost = time.perf_counter() - started
        if self.operator.estopped:
            events.append(ESTOP)
        cut = next((e for e in events if e in CUTS), None)
        if cut is not None:
            (self.robot.estop if cut == ESTOP else self.robot.hold)()
            self.watchdog.disarm()
            return self._end(events, cut, self._frame)
        self._wait_for_tick(events)
        applied = self.robot.send(safe)
        self.watchdog.fed()
        frame = self.robot.observe()
        started = time.perf_counter()
        seen = self.layer.check(frame, time.monotonic())
        self._record["layer_s"].append(cost + time.perf_counter() - started)
        events += seen
        cut = next((e for e in seen if e in CUTS), None)
        if cut is not None:
            (self.robot.estop if cut == ESTOP else self.robot.hold)()
            self.watchdog.disarm()
            return self._end(events, cut, frame)
        self._frame = frame
        self._note(events)
        verdict = self.operator.take_verdict()
        verdict = frame.verdict if verdict is None else verdict
        done = verdict is not None
        truncated = not done and self.steps >= self.max_steps
        if done or truncated:
            self.robot.hold()
            self.watchdog.disarm()
        info = self._info(verdict, end=done or truncated)
        said = self.operator.take_words() or frame.said
        if said is not None:  # a person's words to the policy (the rollout records them: Extras.COACHING)
            info["said"] = said
        if applied is not None:  # a person took over: theirs is the step's action (Episode.intervened)
            info.update(intervention=True, applied_action=np.asarray(applied, np.float32))
        return self._observation(frame), float(bool(verdict)), done, truncated, info

    def _wait_for_tick(self, events: list[str]) -> None:
        """Keep the control period: sleep to the next tick, then spin its last half millisecond (sleep alone wakes
        up to ~0.1 ms late, more under load). A tick already missed is an overrun; the clock restarts from now."""
        self._tick += self.s.period
        while (left := self._tick - time.perf_counter()) > 0:
            if left > 5e-4:
                time.sleep(left - 5e-4)
        now = time.perf_counter()
        error = now - self._tick
        self._record["tick_error_s"].append(error)
        if error > self.s.period:
            events.append(OVERRUN)
            self._tick = now

    def _note(self, events: list[str]) -> None:
        trips = len(self.watchdog.trips) - self._trips_before
        if trips > self._record["counts"][WATCHDOG]:
            events.append(WATCHDOG)
        for e in events:
            self._record["counts"][e] += 1
            if len(self._record["events"]) < 100:  # the first hundred, with their steps; counts cover the rest
                self._record["events"].append({"event": e, "step": self.steps})

    def _end(self, events: list[str], cut: str, frame: RobotFrame):
        """The episode cut short by ``cut``: the robot already stopped; the last frame closes the record."""
        self._note(events)
        return self._observation(frame), 0.0, False, True, self._info(None, cut_short=cut, end=True)

    def _observation(self, frame: RobotFrame) -> dict[str, np.ndarray]:
        obs = {CAMERA_CHANNELS[name][0]: frame.images[name] for name in self.sensors}
        obs["proprio"] = np.nan_to_num(np.asarray(frame.state, np.float32))
        return obs

    def _info(self, verdict: bool | None, told: dict | None = None, cut_short: str | None = None,
              end: bool = False) -> dict[str, Any]:
        """The step's info; the safety record (``safety_record``) with the episode's last step, where the rollout
        reads it, and in between its counts alone."""
        safety = self.safety_record() if end else {"counts": {k: v for k, v in self._record["counts"].items() if v}}
        return {**(told or {}), "instruction": self._instruction, "family": self.task, "success": verdict,
                "safety": safety, **({"cut_short": cut_short} if cut_short else {})}

    def safety_record(self) -> dict[str, Any]:
        """What the layer saw this episode: events (the first hundred, with their steps), counts by event, the
        control period's tick error (p50/p99/max, seconds) and the layer's own checks' time per step (mean, p99)."""
        errors = np.asarray(self._record.get("tick_error_s") or [0.0])
        layer = np.asarray(self._record.get("layer_s") or [0.0])
        return {"events": list(self._record.get("events", [])),
                "counts": {k: v for k, v in self._record.get("counts", {}).items() if v},
                "tick_error_p50_s": float(np.percentile(errors, 50)),
                "tick_error_p99_s": float(np.percentile(errors, 99)), "tick_error_max_s": float(errors.max()),
                "layer_mean_s": float(layer.mean()), "layer_p99_s": float(np.percentile(layer, 99)),
                "watchdog_late_s": [float(t) for t in self.watchdog.trips[self._trips_before:]]
                if hasattr(self, "_trips_before") else []}

    def close(self) -> None:
        self.watchdog.close()
        try:
            self.robot.hold()
        except ConnectionError:  # a host that is gone holds its robot itself (its watchdog, its lost controller)
            pass
        finally:
            self.robot.close()


def make_robot_env(robot: str = "sim", family: str = "button", image_size: int = 64, max_steps: int = 100,
                   sensors: tuple[str, ...] | list[str] = ("overhead",), safety: dict | None = None,
                   instruction: str = "", api_key: str | None = None, timeout_s: float = 2.0,
                   sim_rate_hz: float | None = 50.0) -> RobotEnv:
    """``env.name=robot``: a robot through the safety layer. ``robot`` (``env.options.robot``): "sim" (the tabletop
    as a robot, in this process: ``family``, ``image_size``, its clock ``sim_rate_hz``), ``ws://host:port`` (a
    robot host, actors/robot_host.py; ``api_key``, ``timeout_s`` per reply), or a robot plug-in: a registered name or
    an import path ``module:factory`` returning a ``Robot`` driver (given those of family, image_size, sensors and
    rate_hz it declares); a list of them, one per rollout actor (``robot_of_worker``). ``safety``:
    ``SafetySettings``' fields (``env.options.safety``)."""
    settings = SafetySettings(**(safety or {}))
    if isinstance(robot, (list, tuple)):  # a run's own check (flywheel/parts.py check_env): the first robot
        robot = robot[0]
    if robot.startswith(("ws://", "wss://")):
        from actors.robot_host import RemoteRobot

        driver: Any = RemoteRobot(robot, api_key=api_key, timeout_s=timeout_s, reset_timeout_s=settings.reset_timeout_s)
    else:
        from flywheel import plugins

        driver = plugins.call_with_accepted(plugins.resolve("robot", robot), {
            "family": family, "image_size": image_size, "sensors": tuple(sensors), "rate_hz": sim_rate_hz})
    return RobotEnv(driver, settings, sensors=sensors, instruction=instruction, max_steps=max_steps)


def robot_of_worker(env_kwargs: dict, worker: int) -> dict:
    """A rollout actor's environment settings: where ``env.options.robot`` lists several robots (hosts), actor
    ``worker`` drives the one at ``worker`` modulo their number (``rollout.num_workers``: as many as robots)."""
    options = env_kwargs.get("options") or {}
    robots = options.get("robot")
    if not isinstance(robots, (list, tuple)) or not robots:
        return dict(env_kwargs)
    return {**env_kwargs, "options": {**options, "robot": robots[worker % len(robots)]}}


make_robot_env.max_parallel = 1  # one robot, one episode at a time (a host takes one controller)
