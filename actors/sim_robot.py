"""The tabletop as a robot (a ``Robot`` driver, actors/robot.py), for tests, benchmarks and a robot host with no arm
behind it. Like a velocity-controlled arm, it keeps moving at the last command on a clock of its own
(``rate_hz``) until told otherwise: which is what the safety layer's watchdog is there to stop. With
``rate_hz=None`` it moves one physics step per command instead (reproducible, for learning tests).

Its cameras have a real camera's sensor noise (one intensity level, here and there): a simulated arm held still
would otherwise show the very same bytes frame after frame, which is what a frozen camera shows.

Faults can be injected (``inject``): a camera that freezes, a clock that stops (stale frames), a state that turns
NaN, a driver that dies. A robot knows no success; ``success()`` is the simulator's, for a scripted person to read.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from actors.robot import RobotFrame
from actors.tabletop import TabletopEnv

FAULTS = ("freeze_camera", "stale_camera", "nan_state", "die", "estop")  # estop: a person presses the arm's


class RobotDied(ConnectionError):
    """The driver lost its robot (an injected ``die``)."""


class SimRobot:
    action_dim = 3

    def __init__(self, family: str = "button", image_size: int = 64, sensors: tuple[str, ...] | list[str] =
                 ("overhead",), rate_hz: float | None = 50.0, scripted_reset: bool = True):
        """``scripted_reset``: False makes ``reset`` return None, as a robot whose scene a person resets."""
        self.env = TabletopEnv(family=family, image_size=image_size, max_steps=10**9, sensors=tuple(sensors))
        self.sensors = tuple(sensors)
        self.scripted_reset = scripted_reset
        self.command = np.zeros(3, np.float32)
        self.sent: list[np.ndarray] = []  # every command the robot received
        self.holds = 0
        self.resets, self.seed, self.sent_at_reset = 0, None, 0  # which episode it is on, for a scripted person
        self.estopped = False
        self.faults: dict[str, int] = {}  # fault -> after how many more observations it starts
        self._frozen: RobotFrame | None = None
        self._noise = np.random.default_rng(0)
        self._stamp: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = False  # nothing to move before the first reset
        self._clock = None
        if rate_hz:
            self._clock = threading.Thread(target=self._run, args=(1.0 / rate_hz,), name="sim-robot", daemon=True)
            self._clock.start()

    def _run(self, period: float) -> None:
        tick = time.perf_counter()
        while not self._stop.is_set():
            tick += period
            time.sleep(max(0.0, tick - time.perf_counter()))
            with self._lock:
                if self._ready and not self.estopped and self.command.any():
                    self.env.step(self.command)

    def inject(self, fault: str, after: int = 0) -> None:
        """Start ``fault`` (``FAULTS``) after ``after`` more observations."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: one of {FAULTS}")
        self.faults[fault] = after

    def _due(self, fault: str) -> bool:
        left = self.faults.get(fault)
        return left is not None and left <= 0

    def observe(self) -> RobotFrame:
        for f in self.faults:
            self.faults[f] -= 1
        if self._due("die"):
            del self.faults["die"]  # once: a robot that is restarted comes back
            raise RobotDied("the simulated robot died (injected)")
        with self._lock:
            obs = self.env._obs()
        now = time.monotonic()
        if self._due("stale_camera"):
            self._stamp = self._stamp if self._stamp is not None else now
        frame = RobotFrame(images={s: self._sensor_noise(obs[_KEYS[s]]) for s in self.sensors if s in _KEYS},
                           state=np.asarray(obs["proprio"], np.float32), stamp=self._stamp or now)
        if self._due("freeze_camera"):
            self._frozen = self._frozen or frame
            frame = RobotFrame(images=self._frozen.images, state=frame.state, stamp=frame.stamp)
        if self._due("nan_state"):
            frame.state = np.full_like(frame.state, np.nan)
        if self._due("estop"):
            del self.faults["estop"]
            self.estop()
        frame.estopped = self.estopped
        return frame

    def _sensor_noise(self, image: np.ndarray) -> np.ndarray:
        flicker = self._noise.random(image.shape[:2]) < 0.01  # 1% of the pixels one level up
        return np.where(flicker[..., None], np.minimum(image, 254) + 1, image).astype(np.uint8)

    def send(self, action: np.ndarray) -> None:
        a = np.asarray(action, np.float32).reshape(3)
        with self._lock:
            if self.estopped:
                return
            self.sent.append(a.copy())
            self.command = a
            if self._clock is None:
                self.env.step(a)

    def hold(self) -> None:
        """Stop where it is, the gripper as it was."""
        with self._lock:
            self.holds += 1
            self.command = np.array([0.0, 0.0, self.command[2]], np.float32)

    def estop(self) -> None:
        with self._lock:
            self.estopped = True
            self.command = np.array([0.0, 0.0, self.command[2]], np.float32)

    def reset(self, seed: int | None) -> dict[str, Any] | None:
        with self._lock:
            # the faults that started end with the episode; those still to come stay
            self.faults = {f: n for f, n in self.faults.items() if n > 0}
            self.estopped, self._frozen, self._stamp = False, None, None
            self.command = np.zeros(3, np.float32)
            _, info = self.env.reset(seed=seed)
            self._ready = True
            self.resets, self.seed, self.sent_at_reset = self.resets + 1, seed, len(self.sent)
        told = {"instruction": info["instruction"], "family": info["family"]}
        return told if self.scripted_reset else None

    def effector(self) -> np.ndarray:
        with self._lock:
            return self.env.effector.copy()

    def success(self) -> bool:
        with self._lock:
            return bool(self.env.is_success())

    def close(self) -> None:
        self._stop.set()
        if self._clock is not None:
            self._clock.join(timeout=1.0)


_KEYS = {"overhead": "image", "wrist": "wrist"}


class GymRobot:
    """Any gymnasium simulator as a robot driver, one physics step per command (for a robot host with a simulated
    arm behind it). ``cameras``: flywheel sensor -> the image's path in the observation ("pixels/front");
    ``state``: the proprio's key; ``hold``: the action that keeps the arm where it is (zero motion, for delta
    control, with the gripper as last commanded: ``gripper_dim``)."""

    def __init__(self, env, cameras: dict[str, str], state: str, gripper_dim: int | None = None):
        self.env, self.cameras, self.state_key, self.gripper_dim = env, cameras, state, gripper_dim
        self.action_dim = int(np.prod(env.action_space.shape))
        self.sensors = tuple(cameras)
        self.estopped = False
        self.command = np.zeros(self.action_dim, np.float32)
        self.sent: list[np.ndarray] = []
        self._obs: dict | None = None
        self._info: dict = {}

    def _image(self, path: str) -> np.ndarray:
        value: Any = self._obs
        for part in path.split("/"):
            value = value[part]
        return np.asarray(value, np.uint8)

    def observe(self) -> RobotFrame:
        return RobotFrame(images={name: self._image(path) for name, path in self.cameras.items()},
                          state=np.asarray(self._obs[self.state_key], np.float32), stamp=time.monotonic(),
                          estopped=self.estopped)

    def send(self, action: np.ndarray) -> None:
        if self.estopped:
            return
        self.command = np.asarray(action, np.float32).reshape(self.action_dim)
        self.sent.append(self.command.copy())
        self._obs, _, _, _, self._info = self.env.step(self.command)

    def hold(self) -> None:
        still = np.zeros(self.action_dim, np.float32)
        if self.gripper_dim is not None:
            still[self.gripper_dim] = self.command[self.gripper_dim]
        self.command = still

    def estop(self) -> None:
        self.hold()
        self.estopped = True

    def reset(self, seed: int | None) -> dict[str, Any] | None:
        self.estopped = False
        self._obs, self._info = self.env.reset(seed=seed)
        return {"instruction": getattr(self.env.unwrapped, "instruction", "") or "pick up the cube"}

    def success(self) -> bool:
        return bool(self._info.get("succeed", self._info.get("success", False)))

    def close(self) -> None:
        self.env.close()


def so101() -> GymRobot:
    """LeRobot's SO-101 arm as a MuJoCo twin (the registry's ``lerobot-env-so101``: pick up the cube; delta x, y, z
    and a gripper in [0, 1]), as a robot driver: ``flywheel robot-host robot.driver=so101``. Its front camera is
    flywheel's overhead sensor; its 14 joint and effector readings the proprio."""
    import os

    import gymnasium as gym

    os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen, before MuJoCo loads (actors/thirdparty.py)
    try:
        import lerobot_env_so101  # noqa: F401 (registers the env)
    except ImportError as e:
        raise ImportError("robot.driver=so101 needs lerobot-env-so101: pip install -e '.[sims]'") from e
    env = gym.make("lerobot_env_so101/SO101PickCube-v0", render_mode="rgb_array", image_obs=True)
    return GymRobot(env, cameras={"overhead": "pixels/front"}, state="agent_pos", gripper_dim=3)
