"""Third-party simulators behind flywheel's observation contract: Meta-World (MuJoCo) and gymnasium-robotics Fetch.

Every adapter is a gymnasium env that a rollout actor steps like the built-in tabletop:

- observation ``{"image": uint8 (S, S, 3) from an offscreen camera, "proprio": float32 (4,)}`` (hand x, y, z and
  the gripper's opening);
- ``info`` with ``instruction`` (made from the task: these simulators carry no language), ``family`` (the task)
  and ``success`` (the simulator's own flag);
- ``reset(seed=...)`` deterministic: the same seed gives the same goal and the same first frame;
- actions float32 (4,) in [-1, 1] (hand velocity x, y, z and the gripper), so a VLA for them is built with
  ``VLAConfig(action_dim=4, proprio_dim=4)``.

Install: ``pip install -e ".[sims]"`` (Meta-World 3.1.1 pins MuJoCo 3.3.0: install them in one resolve). They
render offscreen on the CPU through EGL (``MUJOCO_GL=egl``, set here unless already set) or OSMesa (Debian's
``libosmesa6``, with ``MUJOCO_GL=osmesa``). Use them in a run by passing ``make_env=make_sim_env`` with
``family="metaworld:reach-v3"`` or ``family="fetch:FetchReach-v4"`` to ``actors.rollout.run_episodes``.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo is imported: offscreen rendering without a display

INSTALL = 'pip install -e ".[sims]"   (Meta-World 3.1.1, gymnasium-robotics, MuJoCo 3.3.0)'
GL_HELP = ("MuJoCo could not render offscreen. With MUJOCO_GL=egl it needs libEGL (Debian: libegl1, "
           "libgl1-mesa-dri); with MUJOCO_GL=osmesa it needs Debian's libosmesa6 (apt-get install libosmesa6).")

# Meta-World tasks carry no language: one instruction per task, from what the task is.
METAWORLD_INSTRUCTIONS = {
    "reach-v3": "reach the goal",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button",
    "window-open-v3": "open the window",
}
FETCH_INSTRUCTIONS = {
    "FetchReach-v4": "reach the red goal",
    "FetchPush-v4": "push the block to the red goal",
    "FetchSlide-v4": "slide the puck to the red goal",
    "FetchPickAndPlace-v4": "pick up the block and place it at the red goal",
}


def _missing(what: str, e: Exception) -> ImportError:
    return ImportError(f"{what} is not installed ({e}). Install the simulators with: {INSTALL}")


class MetaWorldAdapter(gym.Env):
    """One Meta-World task (an MT1 benchmark: 50 goal variations; the seed picks one)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str = "reach-v3", image_size: int = 64, max_steps: int = 150, camera: str = "corner2"):
        try:
            import metaworld
        except ImportError as e:
            raise _missing("Meta-World", e) from e
        if task not in metaworld.MT1.ENV_NAMES:
            raise ValueError(f"unknown Meta-World task {task!r}: choose one of metaworld.MT1.ENV_NAMES")
        self.task, self.image_size, self.max_steps, self.camera = task, int(image_size), int(max_steps), camera
        self._metaworld = metaworld
        self.instruction = METAWORLD_INSTRUCTIONS.get(task, task.rsplit("-", 1)[0].replace("-", " "))
        s = self.image_size
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self._env = None
        self._seed = None
        self.steps = 0

    def _make(self, seed: int) -> None:
        # MT1 with a seed fixes its 50 goal variations; building it per seed keeps resets deterministic (Meta-World's
        # own reset ignores the seed).
        benchmark = self._metaworld.MT1(self.task, seed=int(seed))
        if self._env is not None:
            self._env.close()
        self._env = benchmark.train_classes[self.task](render_mode="rgb_array", width=self.image_size,
                                                       height=self.image_size, camera_name=self.camera)
        self._env.set_task(benchmark.train_tasks[int(seed) % len(benchmark.train_tasks)])
        self._env.model.vis.quality.offsamples = 0  # no multisampling: 4 ms a frame instead of 73
        self._seed = seed

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        seed = 0 if seed is None else int(seed)
        self._make(seed)
        obs, _ = self._env.reset()
        self.steps, self._success = 0, False
        return self._obs(obs), self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(4), -1.0, 1.0)
        obs, _, _, _, info = self._env.step(a)
        self.steps += 1
        self._success = bool(info.get("success", 0.0))
        terminated = self._success
        truncated = not terminated and self.steps >= self.max_steps
        return self._obs(obs), float(terminated), terminated, truncated, self._info()

    def _image(self) -> np.ndarray:
        try:
            frame = self._env.render()
        except Exception as e:  # MuJoCo's GL errors are of several types
            raise RuntimeError(f"{GL_HELP} ({type(e).__name__}: {e})") from e
        return np.ascontiguousarray(frame[::-1])  # MuJoCo's offscreen frames come out upside down

    def _obs(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        # Meta-World's state: hand xyz, gripper opening, then objects and the goal (never shown to the policy).
        return {"image": self._image(), "proprio": np.asarray(obs[:4], np.float32)}

    def _info(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "family": f"metaworld:{self.task}", "success": self._success,
                "steps": self.steps}

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None


class FetchAdapter(gym.Env):
    """One gymnasium-robotics Fetch task (a 7-DoF arm; the goal is drawn as a red sphere)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str = "FetchReach-v4", image_size: int = 64, max_steps: int = 50):
        try:
            import gymnasium_robotics
        except ImportError as e:
            raise _missing("gymnasium-robotics", e) from e
        gym.register_envs(gymnasium_robotics)
        self.task, self.image_size, self.max_steps = task, int(image_size), int(max_steps)
        self.instruction = FETCH_INSTRUCTIONS.get(task, task)
        self._env = gym.make(task, render_mode="rgb_array", width=self.image_size, height=self.image_size,
                             max_episode_steps=self.max_steps)
        s = self.image_size
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs, _ = self._env.reset(seed=seed)
        self.steps, self._success = 0, False
        return self._obs(obs), self._info()

    def step(self, action):
        obs, _, _, truncated, info = self._env.step(np.clip(np.asarray(action, np.float32).reshape(4), -1.0, 1.0))
        self.steps += 1
        self._success = bool(info.get("is_success", 0.0))
        terminated = self._success
        return self._obs(obs), float(terminated), terminated, bool(truncated) and not terminated, self._info()

    def _obs(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            frame = self._env.render()
        except Exception as e:
            raise RuntimeError(f"{GL_HELP} ({type(e).__name__}: {e})") from e
        state = obs["observation"]
        # grip position xyz, then the two finger joints' sum as the gripper's opening
        proprio = np.array([*state[:3], state[9] + state[10]] if len(state) > 10 else [*state[:3], 0.0], np.float32)
        return {"image": np.ascontiguousarray(frame), "proprio": proprio}

    def _info(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "family": f"fetch:{self.task}", "success": self._success,
                "steps": self.steps}

    def close(self):
        self._env.close()


def make_sim_env(family: str, image_size: int = 64, max_steps: int = 150, **_: Any) -> gym.Env:
    """``family`` = "metaworld:<task>" or "fetch:<env id>" -> the adapter (other run_episodes arguments, which
    only the built-in tabletop understands, are ignored)."""
    kind, _, task = family.partition(":")
    if kind == "metaworld":
        return MetaWorldAdapter(task or "reach-v3", image_size=image_size, max_steps=max_steps)
    if kind == "fetch":
        return FetchAdapter(task or "FetchReach-v4", image_size=image_size, max_steps=max_steps)
    raise ValueError(f"unknown simulator {family!r}: use 'metaworld:<task>' or 'fetch:<env id>'")
