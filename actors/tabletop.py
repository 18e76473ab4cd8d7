"""The built-in tabletop: a top-down camera over a table with coloured blocks, pads and bowls.

Pure numpy (no GL, no physics engine), so that it runs everywhere and is never the bottleneck. The world is the
unit square seen from above. A round end effector moves in the plane. With its gripper open it hovers over the
table; closing it over a block grasps and carries that block; closed on nothing, it is a fist that pushes the
blocks it runs into.

Task families (the instruction names one block and one target, so the policy must read it):

- ``push``:  "push the red block onto the green pad"   two blocks, two pads
- ``place``: "put the blue block in the yellow bowl"   two blocks, two bowls

Colours are drawn so that object kinds differ by appearance as well as shape: blocks are saturated, pads pastel,
bowls dark rings. An episode ends on success (terminated) or after ``max_steps`` (truncated).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
FAMILIES = ("push", "place")
TABLE_RGB = (200, 190, 170)
EFFECTOR_RGB = (60, 60, 60)
GRIPPING_RGB = (10, 10, 10)

MAX_SPEED = 0.06  # world units per step at |action| = 1
EFFECTOR_R = 0.035
BLOCK_HALF = 0.045
PAD_HALF = 0.09
BOWL_R_OUT, BOWL_R_IN = 0.095, 0.065
GRASP_R = 0.05
# Seeds for each split live in disjoint ranges, so "held-out" is never a matter of luck.
SPLIT_SEED_BASE = {"train": 0, "eval": 10_000_000, "holdout": 20_000_000}


def split_seed(split: str, index: int) -> int:
    """The environment seed of the ``index``-th episode of ``split``."""
    return SPLIT_SEED_BASE[split] + int(index)


class TabletopEnv(gym.Env):
    """One tabletop scene. ``reset(seed=...)`` fixes the layout, the task family and the instruction.

    Observation: ``{"image": uint8 (S, S, 3), "proprio": float32 (3,)}`` with proprio = effector x, y, gripper closed.
    Action: float32 (3,) in [-1, 1]: velocity x, velocity y, gripper (> 0 closes).
    The instruction and the ground-truth success are in ``info`` (``info["instruction"]``, ``info["success"]``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, family: str = "any", image_size: int = 64, max_steps: int = 40, render_mode: str | None = None):
        if family != "any" and family not in FAMILIES:
            raise ValueError(f"unknown task family {family!r}: choose one of {FAMILIES} or 'any'")
        self.family_choice = family
        self.image_size = int(image_size)
        self.max_steps = int(max_steps)
        self.render_mode = render_mode
        s = self.image_size
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
                "proprio": gym.spaces.Box(0.0, 1.0, (3,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self._centers = (np.arange(s, dtype=np.float32) + 0.5) / s  # pixel-centre coordinates, for drawing
        self._reset_state()

    # ----------------------------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.family = "push"
        self.blocks = np.zeros((2, 2), np.float64)
        self.block_colors: list[str] = []
        self.targets = np.zeros((2, 2), np.float64)
        self.target_colors: list[str] = []
        self.target_block = 0
        self.target_index = 0
        self.effector = np.zeros(2, np.float64)
        self.holding: int | None = None
        self.gripper_closed = False
        self.steps = 0
        self.instruction = ""
        self._static: np.ndarray | None = None  # the table with its targets, drawn on first render

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self._reset_state()
        self.family = self.family_choice if self.family_choice != "any" else FAMILIES[int(rng.integers(len(FAMILIES)))]
        names = list(COLORS)
        self.block_colors = [names[i] for i in rng.choice(len(names), 2, replace=False)]
        self.target_colors = [names[i] for i in rng.choice(len(names), 2, replace=False)]
        # Rejection-sample a layout with every object well apart, and the effector clear of them all.
        for _ in range(1000):
            pts = rng.uniform(0.14, 0.86, size=(5, 2))
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(5)
            if d.min() > 0.24:
                break
        self.blocks = pts[0:2].copy()
        self.targets = pts[2:4].copy()
        self.effector = pts[4].copy()
        self.target_block = int(rng.integers(2))
        self.target_index = int(rng.integers(2))
        b, t = self.block_colors[self.target_block], self.target_colors[self.target_index]
        if self.family == "push":
            self.instruction = f"push the {b} block onto the {t} pad"
        else:
            self.instruction = f"put the {b} block in the {t} bowl"
        return self._obs(), self._info()

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(3), -1.0, 1.0)
        close = bool(a[2] > 0.0)
        if self.holding is not None and not close:
            self.holding = None
        if self.holding is None and close and not self.gripper_closed:
            # Grasp only on the closing edge, and only a block under the effector.
            dist = np.linalg.norm(self.blocks - self.effector, axis=1)
            i = int(dist.argmin())
            if dist[i] < GRASP_R:
                self.holding = i
        self.gripper_closed = close
        self.effector = np.clip(self.effector + a[:2] * MAX_SPEED, 0.03, 0.97)
        for i in range(len(self.blocks)):
            if i == self.holding:
                self.blocks[i] = self.effector
                continue
            if not close:  # an open hand hovers over the blocks
                continue
            delta = self.blocks[i] - self.effector
            dist = float(np.hypot(*delta))
            reach = EFFECTOR_R + BLOCK_HALF
            if dist < reach:  # pushed out of the effector's way, along the line between their centres
                direction = delta / dist if dist > 1e-9 else np.array([1.0, 0.0])
                self.blocks[i] = np.clip(self.effector + direction * reach, 0.05, 0.95)
        self.steps += 1
        success = self.is_success()
        terminated = success
        truncated = (not terminated) and self.steps >= self.max_steps
        reward = 1.0 if success else 0.0  # for gymnasium users; flywheel itself never reads it
        return self._obs(), reward, terminated, truncated, self._info()

    # ----------------------------------------------------------------------------------------------------------------
    def is_success(self) -> bool:
        """The ground-truth predicate: the named block rests (not held) on/in the named target."""
        if self.holding == self.target_block:
            return False
        block, target = self.blocks[self.target_block], self.targets[self.target_index]
        if self.family == "push":
            return bool(np.all(np.abs(block - target) < PAD_HALF - 0.01))
        return bool(np.hypot(*(block - target)) < BOWL_R_IN)

    def _info(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "family": self.family,
            "success": self.is_success(),
            "steps": self.steps,
        }

    def _obs(self) -> dict[str, np.ndarray]:
        proprio = np.array([self.effector[0], self.effector[1], float(self.gripper_closed)], np.float32)
        return {"image": self.render_image(), "proprio": proprio}

    def render(self):
        return self.render_image()

    def render_image(self) -> np.ndarray:
        """Draw the scene: the table with its pads or bowls, then the blocks, then the effector ring on top.

        Pads and bowls never move, so they are drawn once per episode; each frame copies that and draws only what
        moves, the effector ring inside its bounding box (bench/env_throughput.py measures the cost)."""
        if self._static is None:
            self._static = self._draw_static()
        img = self._static.copy()
        order = [i for i in range(len(self.blocks)) if i != self.holding] + (
            [self.holding] if self.holding is not None else []
        )
        for i in order:
            self._box(img, self.blocks[i], BLOCK_HALF, self._block_rgb[i])
        s, c, r = self.image_size, self._centers, EFFECTOR_R
        ex, ey = float(self.effector[0]), float(self.effector[1])
        x0, x1 = max(int((ex - r) * s) - 1, 0), min(int((ex + r) * s) + 2, s)
        y0, y1 = max(int((ey - r) * s) - 1, 0), min(int((ey + r) * s) + 2, s)
        d2 = np.add.outer((c[y0:y1] - ey) ** 2, (c[x0:x1] - ex) ** 2)
        ring = (d2 < r**2) & (d2 >= (r * 0.45) ** 2)
        img[y0:y1, x0:x1][ring] = GRIPPING_RGB if self.gripper_closed else EFFECTOR_RGB
        return img

    def _draw_static(self) -> np.ndarray:
        self._block_rgb = [np.array(COLORS[name], np.uint8) for name in self.block_colors]
        img = np.empty((self.image_size, self.image_size, 3), np.uint8)
        img[:] = TABLE_RGB
        c = self._centers
        for center, name in zip(self.targets, self.target_colors):
            rgb = np.array(COLORS[name], np.float32)
            if self.family == "push":
                self._box(img, center, PAD_HALF, (0.5 * rgb + 0.5 * 255).astype(np.uint8))  # pastel pad
            else:
                d2 = (c[None, :] - center[0]) ** 2 + (c[:, None] - center[1]) ** 2
                ring = (d2 < BOWL_R_OUT**2) & (d2 >= BOWL_R_IN**2)
                img[ring] = (0.55 * rgb).astype(np.uint8)  # dark bowl rim
        return img

    def _box(self, img: np.ndarray, center: np.ndarray, half: float, rgb) -> None:
        s, cx, cy = self.image_size, float(center[0]), float(center[1])
        x0, x1 = round((cx - half) * s), round((cx + half) * s)  # Python's round: half to even, as NumPy's
        y0, y1 = round((cy - half) * s), round((cy + half) * s)
        img[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = rgb

    # Ground-truth state, for the scripted expert and for tests only (policies see pixels and proprio).
    def state(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "effector": self.effector.copy(),
            "block": self.blocks[self.target_block].copy(),
            "target": self.targets[self.target_index].copy(),
            "holding_target": self.holding == self.target_block,
            "gripper_closed": self.gripper_closed,
        }


def reference_image(env: TabletopEnv) -> np.ndarray:
    """The picture ``render_image`` must give, drawn the plain way: every shape over the whole pixel grid each time.
    Tests check that the fast renderer matches it pixel for pixel; ``bench/env_throughput.py`` times both."""
    s = env.image_size
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    px, py = np.meshgrid(c, c, indexing="xy")
    img = np.empty((s, s, 3), np.uint8)
    img[:] = TABLE_RGB

    def fill(mask, rgb):
        img[mask] = rgb

    def box(center, half):  # the pixels whose index range rounds from the square's edges
        x0, x1 = int(round((center[0] - half) * s)), int(round((center[0] + half) * s))
        y0, y1 = int(round((center[1] - half) * s)), int(round((center[1] + half) * s))
        cols, rows = np.arange(s)[None, :], np.arange(s)[:, None]
        return (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)

    def ring(center, r_out, r_in):
        d2 = (px - center[0]) ** 2 + (py - center[1]) ** 2
        return (d2 < r_out**2) & (d2 >= r_in**2)

    for center, name in zip(env.targets, env.target_colors):
        rgb = np.array(COLORS[name], np.float32)
        if env.family == "push":
            fill(box(center, PAD_HALF), (0.5 * rgb + 0.5 * 255).astype(np.uint8))
        else:
            fill(ring(center, BOWL_R_OUT, BOWL_R_IN), (0.55 * rgb).astype(np.uint8))
    order = [i for i in range(len(env.blocks)) if i != env.holding] + ([env.holding] if env.holding is not None else [])
    for i in order:
        fill(box(env.blocks[i], BLOCK_HALF), COLORS[env.block_colors[i]])
    fill(ring(env.effector, EFFECTOR_R, EFFECTOR_R * 0.45), GRIPPING_RGB if env.gripper_closed else EFFECTOR_RGB)
    return img


def make_env(family: str = "any", image_size: int = 64, max_steps: int = 40) -> TabletopEnv:
    return TabletopEnv(family=family, image_size=image_size, max_steps=max_steps)


gym.register(id="flywheel/Tabletop-v0", entry_point="actors.tabletop:TabletopEnv")
