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
``libosmesa6``, with ``MUJOCO_GL=osmesa``). A run uses them as environment plug-ins: ``env.name=metaworld env.family=<task>`` (for example
``button-press-topdown-v3``) or ``env.name=fetch env.family=<env id>`` (``FetchReach-v4``). Each adapter's ``expert_action`` is the scripted expert that ``flywheel demos`` and
``flywheel pretrain`` record (Meta-World's own scripted policies; a reach for Fetch).
"""

from __future__ import annotations

import os
from typing import Any, Callable

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


def offscreen_frame(env) -> np.ndarray:
    """One RGB frame of a gymnasium MuJoCo env, made current first: every adapter has its own GL context, and a
    rollout renders many adapters in turn (without this, a frame comes from whichever context was current)."""
    import mujoco

    try:
        viewer = env.unwrapped.mujoco_renderer._get_viewer("rgb_array")
        viewer.make_context_current()
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            viewer.scn.flags[flag] = 0  # shadows and reflections cost 40 of 45 ms a frame on a CPU renderer
        return env.render()  # the env's own render: Fetch draws its goal there
    except Exception as e:  # MuJoCo's GL errors are of several types
        raise RuntimeError(f"{GL_HELP} ({type(e).__name__}: {e})") from e


def _missing(what: str, e: Exception) -> ImportError:
    return ImportError(f"{what} is not installed ({e}). Install the simulators with: {INSTALL}")


class MetaWorldAdapter(gym.Env):
    """One Meta-World task; the seed draws its layout (goal and object positions) from the task's own ranges."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str = "button-press-topdown-v3", image_size: int = 64, max_steps: int = 150,
                 camera: str = "corner3"):
        try:
            import metaworld
        except ImportError as e:
            raise _missing("Meta-World", e) from e
        if task not in metaworld.MT1.ENV_NAMES:
            raise ValueError(f"unknown Meta-World task {task!r}: choose one of metaworld.MT1.ENV_NAMES")
        self.task, self.image_size, self.max_steps, self.camera = task, int(image_size), int(max_steps), camera
        self.instruction = METAWORLD_INSTRUCTIONS.get(task, task.rsplit("-", 1)[0].replace("-", " "))
        s = self.image_size
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        # One MuJoCo env (and one GL context) for the adapter's life. MT1's task marks the env as set up and fully
        # observed (the scripted expert reads the goal from the state); each reset then draws the layout from the
        # env's own generator, seeded with the episode's seed, so the same seed gives the same layout.
        benchmark = metaworld.MT1(task, seed=0)
        self._env = benchmark.train_classes[task](render_mode="rgb_array", width=s, height=s, camera_name=camera)
        self._env.set_task(benchmark.train_tasks[0])
        self._env.model.vis.quality.offsamples = 0  # no multisampling
        self._expert = None
        self._raw = None
        self.steps, self._success = 0, False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        env = self._env
        env._freeze_rand_vec, env.seeded_rand_vec = False, True
        env.seed(0 if seed is None else int(seed) % 2**32)
        self._raw, _ = env.reset()
        self.steps, self._success = 0, False
        return self._obs(), self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, np.float64).reshape(4), -1.0, 1.0)
        self._raw, _, _, _, info = self._env.step(a)
        self.steps += 1
        self._success = bool(info.get("success", 0.0))
        terminated = self._success
        truncated = not terminated and self.steps >= self.max_steps
        return self._obs(), float(terminated), terminated, truncated, self._info()

    def expert_action(self, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
        """Meta-World's own scripted policy for the task (``metaworld.policies``), plus Gaussian motion noise."""
        if self._expert is None:
            from metaworld import policies

            name = "Sawyer" + "".join(w.capitalize() for w in self.task.split("-")[:-1]) + "V3Policy"
            if not hasattr(policies, name):
                raise NotImplementedError(f"Meta-World ships no scripted policy {name} for {self.task!r}")
            self._expert = getattr(policies, name)()
        a = np.clip(self._expert.get_action(self._raw), -1.0, 1.0).astype(np.float32)
        if noise and rng is not None:
            a[:3] = np.clip(a[:3] + rng.normal(0.0, noise, 3), -1.0, 1.0)
        return a

    def _obs(self) -> dict[str, np.ndarray]:
        # Meta-World's state: hand xyz, gripper opening, then objects and the goal (never shown to the policy).
        frame = offscreen_frame(self._env)[::-1]  # MuJoCo's offscreen frames come out upside down here
        return {"image": np.ascontiguousarray(frame), "proprio": np.asarray(self._raw[:4], np.float32)}

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
                             max_episode_steps=10**9)  # the adapter counts steps itself: a pooled one may change
        s = self.image_size
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            "proprio": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
        })
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.steps, self._raw = 0, None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs, _ = self._env.reset(seed=seed)
        self._raw = obs
        self.steps, self._success = 0, False
        return self._obs(obs), self._info()

    def step(self, action):
        obs, _, _, _, info = self._env.step(np.clip(np.asarray(action, np.float32).reshape(4), -1.0, 1.0))
        self._raw = obs
        self.steps += 1
        self._success = bool(info.get("is_success", 0.0))
        terminated = self._success
        truncated = not terminated and self.steps >= self.max_steps
        return self._obs(obs), float(terminated), terminated, truncated, self._info()

    def expert_action(self, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
        """A scripted reach: full speed toward the goal, proportional near it (Fetch moves 5 cm per unit action).
        The tasks with an object have no scripted expert here."""
        if not self.task.startswith("FetchReach"):
            raise NotImplementedError(f"no scripted expert for {self.task!r}: only FetchReach has one")
        a = np.zeros(4, np.float32)
        a[:3] = np.clip((self._raw["desired_goal"] - self._raw["observation"][:3]) / 0.05, -1.0, 1.0)
        if noise and rng is not None:
            a[:3] = np.clip(a[:3] + rng.normal(0.0, noise, 3), -1.0, 1.0)
        return a

    def _obs(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frame = offscreen_frame(self._env)
        state = obs["observation"]
        # grip position xyz, then the two finger joints' sum as the gripper's opening
        proprio = np.array([*state[:3], state[9] + state[10]] if len(state) > 10 else [*state[:3], 0.0], np.float32)
        return {"image": np.ascontiguousarray(frame), "proprio": proprio}

    def _info(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "family": f"fetch:{self.task}", "success": self._success,
                "steps": self.steps}

    def close(self):
        self._env.close()


# Adapters that one rollout steps at once: each holds a MuJoCo model and a GL context (~150 MB with Meta-World).
MAX_PARALLEL = 16

# Adapters given back with ``release()``, by (simulator, task, image size): building one costs ~0.7 s (MuJoCo model, task
# sampling, a GL context) against ~6 ms a step, and a rollout wants one per episode it steps in lock-step.
_FREE: dict[tuple[str, str, int], list[gym.Env]] = {}


def make_metaworld(family: str = "any", image_size: int = 64, max_steps: int = 150) -> gym.Env:
    """``env.name=metaworld``: ``env.family`` is the task ("any": button-press-topdown-v3). A released adapter of the
    same task is reused."""
    task = "button-press-topdown-v3" if family == "any" else family.removeprefix("metaworld:")  # as episodes name it
    return pooled("metaworld", task, image_size, max_steps, MetaWorldAdapter)


def make_fetch(family: str = "any", image_size: int = 64, max_steps: int = 50) -> gym.Env:
    """``env.name=fetch``: ``env.family`` is the gymnasium-robotics env id ("any": FetchReach-v4)."""
    task = "FetchReach-v4" if family == "any" else family.removeprefix("fetch:")
    return pooled("fetch", task, image_size, max_steps, FetchAdapter)


make_metaworld.max_parallel = make_fetch.max_parallel = MAX_PARALLEL  # actors/rollout.py steps them in waves


def pooled(kind: str, task: str, image_size: int, max_steps: int, adapter: Callable[..., gym.Env]) -> gym.Env:
    """A released adapter of this simulator, task and image size, else ``adapter(task, image_size=,
    max_steps=)``, made releasable (``release()``: back to the pool, where the next rollout takes it)."""
    free = _FREE.get((kind, task, int(image_size)))
    if free:
        env = free.pop()
        env.max_steps = int(max_steps)
        return env
    env = adapter(task, image_size=image_size, max_steps=max_steps)
    env.release = lambda: _FREE.setdefault((kind, task, int(image_size)), []).append(env)  # reset() makes it new
    return env
