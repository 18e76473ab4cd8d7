"""The built-in tabletop: a top-down camera over a table with coloured blocks, pads, bowls, buttons and drawers.

Pure numpy (no GL, no physics engine), so that it runs everywhere and is never the bottleneck. The world is the
unit square seen from above. A round end effector moves in the plane. With its gripper open it hovers over the
table; closing it over a block grasps and carries that block, over a drawer's handle holds the handle (the drawer
then slides with the hand along its rail), over a button presses it; closed on nothing, it is a fist that pushes
the blocks it runs into.

Task families (every instruction names what to act on, among distractors, so the policy must read it):

- ``push``:   "push the red block onto the green pad"        two blocks, two pads
- ``place``:  "put the blue block in the yellow bowl"        two blocks, two bowls
- ``stack``:  "put the red block on the blue block"          three blocks
- ``button``: "press the green button"                       three buttons, two blocks in the way
- ``drawer``: "open the red drawer" / "close the blue drawer" two drawers
- ``sort``:   "put each block in the bowl of its colour"     two blocks, two bowls of the same colours
- ``clear``:  "put each block in its bowl" (clear the table) three blocks, three bowls of the same colours
- ``stow``:   "put the red block in the blue drawer and close it"  two shut drawers, two blocks: open it, put the
              block in (a block let go over an open drawer rests in it and slides with it), close it

``family="any"`` draws push or place per seed: the pair the shipped base was trained on, unchanged seed for seed.
``family="suite"`` draws any of the first six; a comma-separated list draws among those named (``clear`` too).

Sort, clear and stow are long-horizon: made of named subtasks (one a block, "put the red block in the red bowl";
stow's "open the blue drawer", "put the red block in the blue drawer", "close the blue drawer"), which the scripted
expert does in order. ``subtasks()`` names them and ``subtask_index()`` says which is under way (the
first not yet done); every step's ``info["subtask"]`` is that index, so an episode records the boundaries the
simulator saw (actors/rollout.py). A one-move family has one subtask: its instruction. Instruction wording and
which colour pairings occur are set by ``phrasing`` and ``combos`` (actors/instructions.py: held-out phrasings and
held-out combinations measure generalisation).

Domain randomisation (``randomize``; all off by default, so the default scenes stay those the shipped base
learned) jitters what a real camera and table vary: colours, lighting, the camera's pose, block size, and friction
(how far a pushed block slides on). Each episode's draw is in ``info["randomization"]``.

Colours are drawn so that object kinds differ by appearance as well as shape: blocks are saturated, pads pastel,
bowls dark rings, buttons discs with a rim, drawers coloured boxes in a dark cabinet with a black handle. An episode
ends on success (terminated) or after ``max_steps`` (truncated).
"""

from __future__ import annotations

from typing import Any

import math

import gymnasium as gym
import numpy as np

from actors.instructions import COMBOS, PHRASINGS, combo_allowed, templates

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
FAMILIES = ("push", "place")  # family="any": the shipped base's pair
SUITE = ("push", "place", "stack", "button", "drawer", "sort")  # family="suite"
LONG_HORIZON = ("sort", "clear", "stow")  # made of named subtasks (subtasks())
FAMILY_NAMES = (*SUITE, "clear", "stow")  # every family a run can name
TABLE_RGB = (200, 190, 170)
EFFECTOR_RGB = (60, 60, 60)
GRIPPING_RGB = (10, 10, 10)
CABINET_RGB = (90, 80, 70)
HANDLE_RGB = (20, 20, 20)
PRESSED_RGB = (250, 250, 250)

MAX_SPEED = 0.06  # world units per step at |action| = 1
EFFECTOR_R = 0.035
BLOCK_HALF = 0.045
PAD_HALF = 0.09
BOWL_R_OUT, BOWL_R_IN = 0.095, 0.065
GRASP_R = 0.05  # a closing hand grasps a block (or a handle) whose centre is this close
BUTTON_R = 0.05  # button disc radius; a closing hand this close to its centre presses it
CABINET_HALF = 0.07  # the cabinet a drawer slides out of (a square)
DRAWER_HALF_WIDTH = 0.05  # across the rail
DRAWER_TRAVEL = 0.15  # handle travel from shut (opening 0) to fully open (1)
HANDLE_HALF = 0.02
OPEN_AT, SHUT_AT = 0.9, 0.1  # openings that count as open / shut
HORIZON_SCALE = {"sort": 2, "clear": 3, "stow": 3}  # families with several moves to make get this many times max_steps
AXES = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # directions a drawer can open toward
RANDOMIZE_KEYS = ("colour", "lighting", "camera", "size", "friction")
# Sensors. "overhead": the RGB camera above the table (observation key "image"); "wrist": an RGB camera on the hand,
# looking down, WRIST_SPAN table widths across; "depth": the overhead camera's distance to the nearest surface,
# float32 (S, S), table at CAMERA_HEIGHT; "touch": 1.0 while the hand holds something or its fist pushes a block.
# Proprioception is always on.
SENSORS = ("overhead", "wrist", "depth", "touch")
SENSOR_KEYS = {"overhead": "image", "wrist": "wrist", "depth": "depth", "touch": "touch"}
WRIST_SPAN = 0.4
NO_JITTER = (0.0, 0.0, 1.0)  # the camera's view shift x, y and zoom when it is not jittered
CAMERA_HEIGHT = 1.0
HEIGHTS = {"pad": 0.002, "bowl": 0.04, "button": 0.015, "pressed": 0.005, "cabinet": 0.08, "drawer": 0.06,
           "handle": 0.07, "lifted": 0.12, "effector": 0.15}  # above the table; a block is 2 half-sizes tall
# Seeds for each split live in disjoint ranges, so "held-out" is never a matter of luck.
SPLIT_SEED_BASE = {"train": 0, "eval": 10_000_000, "holdout": 20_000_000}


def split_seed(split: str, index: int) -> int:
    """The environment seed of the ``index``-th episode of ``split``."""
    return SPLIT_SEED_BASE[split] + int(index)


def parse_families(family: str) -> tuple[str, ...]:
    """``"any"``, ``"suite"``, one family, or a comma-separated list of them ("suite,clear,stow") -> the families to
    draw from."""
    if family == "any":
        return FAMILIES
    if family == "suite":
        return SUITE
    names = tuple(n for f in family.split(",") for n in (SUITE if f.strip() == "suite" else (f.strip(),)))
    unknown = [f for f in names if f not in FAMILY_NAMES]
    if unknown or not names:
        raise ValueError(
            f"unknown task family {family!r}: choose 'any' (push or place), 'suite' ({', '.join(SUITE)}), or families "
            f"from {FAMILY_NAMES}, comma-separated"
        )
    return names


class Frames:
    """Pictures drawn together. Each is queued as (destination, base, shapes): the base picture is copied into the
    destination, then each shape is painted over it, in order. A shape ``(y0, y1, x0, x1, value, ring)`` fills the
    pixel window ``[y0:y1, x0:x1]`` (the part in view) with ``value`` (an RGB triple, or a depth): all of it when
    ``ring`` is None, else the pixels whose centres lie at a distance in [r_in, r_out) from the ring's centre,
    ``ring = (cy, cx, r_out², r_in², wy, wx, window)``: its centre and radii in camera coordinates (table widths), and
    the square of pixels that holds it (``window`` pixels a side from row ``wy``, column ``wx``; partly off the picture
    where the ring is), one size per radius.

    The rings' distances are worked out for all the queued pictures at once, a few numpy calls per window size (a
    ring drawn alone costs ~10 us of numpy calls for ~200 pixels, most of a frame). The pixels are those the
    one-at-a-time drawing gives, bit for bit: the same float32 arithmetic, element by element (tests/test_env.py
    compares pictures drawn together with pictures drawn at once, and both with ``reference_image``)."""

    def __init__(self, image_size: int):
        self.size = int(image_size)
        self.queued: list[tuple[np.ndarray, np.ndarray, list]] = []

    def add(self, dst: np.ndarray, base: np.ndarray, shapes: list) -> None:
        self.queued.append((dst, base, shapes))

    def draw(self) -> None:
        """Draw every queued picture into its destination."""
        queued, self.queued = self.queued, []
        if queued:
            _paint(queued, self.size)

    @staticmethod
    def drawn(base: np.ndarray, shapes: list, size: int) -> np.ndarray:
        """One picture, drawn now (each ring on its own: for one picture the batch's bookkeeping costs more)."""
        img = np.empty_like(base)
        pad = max((shape[5][6] for shape in shapes if shape[5] is not None), default=0)
        _paint_one(img, base, shapes, {}, _centers(size, pad), pad)
        return img


_CENTERS: dict[int, np.ndarray] = {}  # pixel-centre coordinates by image size


def _centers(size: int, pad: int) -> np.ndarray:
    """Pixel-centre coordinates of pixels -pad .. size + pad - 1, float32: those on the picture exactly as
    ``(np.arange(size, dtype=np.float32) + 0.5) / size``."""
    c = _CENTERS.get(size)
    if c is None or len(c) < size + 2 * pad:
        more = max(pad, 2 * size)
        c = _CENTERS[size] = (np.arange(-more, size + more, dtype=np.float32) + 0.5) / size
    have = (len(c) - size) // 2
    return c[have - pad:]


def _paint(queued: list[tuple[np.ndarray, np.ndarray, list]], size: int) -> None:
    groups: dict[int, list[tuple]] = {}  # the rings, by window size
    for _, _, shapes in queued:
        for shape in shapes:
            ring = shape[5]
            if ring is not None:
                group = groups.get(ring[6])
                if group is None:
                    groups[ring[6]] = [shape]
                else:
                    group.append(shape)
    pad = max(groups, default=0)
    c = _centers(size, pad)  # c[pad + k] is pixel k's centre, for k in [-pad, size + pad)
    masks: dict[int, np.ndarray] = {}  # by id(shape): the ring's pixels in the window's part in view
    for w, rings in groups.items():
        if len(rings) == 1:  # alone: drawn below, on its part in view, in fewer numpy calls
            continue
        params = np.array([r[5] for r in rings])  # cy, cx, r_out², r_in², y0, x0, window (float64, as drawn)
        at = params[:, 4:6].astype(np.int64) + pad
        # As one ring drawn alone is: (float32 centres - the float64 centre taken as float32), squared and added in
        # float32, compared with the float64 radii squared taken as float32, element by element.
        dy = c[at[:, :1] + np.arange(w)] - params[:, :1].astype(np.float32)
        dx = c[at[:, 1:] + np.arange(w)] - params[:, 1:2].astype(np.float32)
        d2 = (dy * dy)[:, :, None] + (dx * dx)[:, None, :]
        radii = params[:, 2:4].astype(np.float32)[:, :, None, None]
        inside = (d2 < radii[:, 0]) & (d2 >= radii[:, 1])  # r_in = 0: every distance is >= 0
        for ring, mask in zip(rings, inside):
            y0, y1, x0, x1, _, (_, _, _, _, wy, wx, _) = ring
            masks[id(ring)] = mask[y0 - wy:y1 - wy, x0 - wx:x1 - wx]
    for dst, base, shapes in queued:
        _paint_one(dst, base, shapes, masks, c, pad)


def _paint_one(dst: np.ndarray, base: np.ndarray, shapes: list, masks: dict[int, np.ndarray], c: np.ndarray,
               pad: int) -> None:
    """The base, then each shape in order; a ring whose mask ``masks`` lacks is worked out here, on its own."""
    np.copyto(dst, base)
    colour = dst.ndim == 3
    for shape in shapes:
        y0, y1, x0, x1, value, ring = shape
        if ring is None:
            dst[y0:y1, x0:x1] = value
            continue
        mask = masks.get(id(shape))
        if mask is None:
            cy, cx, out2, in2 = ring[:4]
            dy, dx = c[pad + y0:pad + y1] - cy, c[pad + x0:pad + x1] - cx
            d2 = np.add.outer(dy * dy, dx * dx)
            mask = d2 < out2
            if in2 > 0.0:
                mask &= d2 >= in2
        np.copyto(dst[y0:y1, x0:x1], value, where=mask[..., None] if colour else mask)


class TabletopEnv(gym.Env):
    """One tabletop scene. ``reset(seed=...)`` fixes the layout, the task family and the instruction.

    Observation: ``{"image": uint8 (S, S, 3), "proprio": float32 (3,)}`` with proprio = effector x, y, gripper closed.
    Action: float32 (3,) in [-1, 1]: velocity x, velocity y, gripper (> 0 closes).
    ``info`` holds the instruction, the family, the ground-truth success and ``combo_heldout`` (whether what the
    instruction names is a held-out combination); ``reset``'s info also holds the episode's ``randomization``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, family: str = "any", image_size: int = 64, max_steps: int = 40, render_mode: str | None = None,
                 phrasing: str = "canonical", combos: str = "all", randomize: dict[str, float] | None = None,
                 sensors: tuple[str, ...] | list[str] | str = ("overhead",)):
        """``randomize`` gives each knob's amplitude (0 = off): ``colour`` (each palette colour shifted by up to this
        fraction of full scale per channel), ``lighting`` (brightness scaled by 1 +- this), ``camera`` (the view
        shifted by up to this many table widths and zoomed by 1 +- this), ``size`` (blocks scaled by 1 +- this) and
        ``friction`` (a pushed block keeps up to this fraction of its push speed each following step)."""
        self.families = parse_families(family)
        self.sensors = tuple(sensors.split(",") if isinstance(sensors, str) else sensors)
        if not self.sensors or set(self.sensors) - set(SENSORS) or not {"overhead", "wrist"} & set(self.sensors):
            raise ValueError(f"bad sensors {self.sensors!r}: choose from {SENSORS}, with at least one camera "
                             f"(overhead or wrist)")
        self.randomize = {k: float(v) for k, v in (randomize or {}).items()}
        unknown = sorted(set(self.randomize) - set(RANDOMIZE_KEYS))
        if unknown:
            raise ValueError(f"unknown randomize keys {unknown}: choose from {RANDOMIZE_KEYS}")
        if not all(0.0 <= v < 1.0 for v in self.randomize.values()):
            raise ValueError(f"randomize amplitudes must lie in [0, 1): got {self.randomize}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"unknown phrasing {phrasing!r}: choose one of {PHRASINGS}")
        if combos not in COMBOS:
            raise ValueError(f"unknown combos {combos!r}: choose one of {COMBOS}")
        self.family_choice, self.phrasing, self.combos = family, phrasing, combos
        self.image_size = int(image_size)
        self.max_steps = int(max_steps)
        self.render_mode = render_mode
        s = self.image_size
        spaces = {  # only those of the sensors that are on are made (each Box costs ~20 us, an env is made per episode)
            "image": lambda: gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            "wrist": lambda: gym.spaces.Box(0, 255, (s, s, 3), np.uint8),
            "depth": lambda: gym.spaces.Box(0.0, CAMERA_HEIGHT, (s, s), np.float32),
            "touch": lambda: gym.spaces.Box(0.0, 1.0, (1,), np.float32),
        }
        self.observation_space = gym.spaces.Dict(
            {**{SENSOR_KEYS[k]: spaces[SENSOR_KEYS[k]]() for k in self.sensors},
             "proprio": gym.spaces.Box(0.0, 1.0, (3,), np.float32)}
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self._frames: Frames | None = None  # draw_later
        self._reset_state()

    # ----------------------------------------------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.family = self.families[0]
        self.blocks = np.zeros((0, 2), np.float64)
        self.block_colors: list[str] = []
        self.block_z: list[int] = []  # stacking height, for drawing order
        self.targets = np.zeros((0, 2), np.float64)  # pads (push) or bowls (place, sort)
        self.target_colors: list[str] = []
        self.buttons = np.zeros((0, 2), np.float64)
        self.button_colors: list[str] = []
        self.pressed: list[bool] = []
        self.drawers = np.zeros((0, 2), np.float64)  # cabinet centres
        self.drawer_axes = np.zeros((0, 2), np.float64)  # unit vectors the drawers open toward
        self.drawer_colors: list[str] = []
        self.opening = np.zeros(0, np.float64)  # 0 shut .. 1 fully open
        self.verb = ""  # drawer: "open" or "close"
        self.stowed: list[int] = []  # per block: the drawer it rests in (stow), -1 none
        self.target_block = 0  # the named block (push, place, stack)
        self.target_index = 0  # the named target / base block / button / drawer
        self.effector = np.zeros(2, np.float64)
        self.holding: int | None = None  # the block in hand
        self.holding_drawer: int | None = None  # the drawer whose handle is in hand
        self.gripper_closed = False
        self.contact = False  # touch: holding something, or the fist pushed a block this step
        self.steps = 0
        self.horizon = self.max_steps
        self.instruction = ""
        self.combo: tuple[str, ...] = ()
        self.kind = ""  # the instruction kind: the family, or "open" / "close" for drawers
        self.block_half = BLOCK_HALF
        self.slip = 0.0  # the fraction of its push speed a pushed block keeps each following step
        self.block_vel = np.zeros((0, 2), np.float64)
        self.palette_shift = {name: np.zeros(3, np.float32) for name in COLORS}
        self.brightness = 1.0
        self.camera = NO_JITTER  # view shift x, y (table widths) and zoom
        self._static: np.ndarray | None = None  # what does not move, drawn on first render
        self._drawn_openings: tuple[float, ...] | None = None  # the drawer openings drawn on self._with_drawers
        self._combo_heldout = False
        self._randomization: dict[str, Any] = {}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        for _ in range(1000):
            self._reset_state()
            self.family = self.families[int(rng.integers(len(self.families)))] if len(self.families) > 1 \
                else self.families[0]
            getattr(self, f"_layout_{self.family}")(rng)
            if combo_allowed(self.combos, self.kind, *self.combo):
                break
        options_ = templates(self.kind, self.phrasing)
        template = options_[int(rng.integers(len(options_)))] if len(options_) > 1 else options_[0]
        self.instruction = template.format(**dict(zip("bt", self.combo)))
        self.block_z = [0] * len(self.blocks)
        self.block_vel = np.zeros_like(self.blocks)
        self.horizon = self.max_steps * HORIZON_SCALE.get(self.family, 1)
        if any(self.randomize.values()):
            self._draw_randomization(rng)
        self._combo_heldout = not combo_allowed("train", self.kind, *self.combo)
        self._randomization = self.randomization()
        self._paint()
        return self._obs(), {**self._info(), "randomization": self._randomization,  # drawn once, told once
                             "subtasks": self.subtasks()}

    def _draw_randomization(self, rng: np.random.Generator) -> None:
        r = {k: self.randomize.get(k, 0.0) for k in RANDOMIZE_KEYS}
        self.palette_shift = {name: rng.uniform(-r["colour"], r["colour"], 3).astype(np.float32) * 255
                              for name in COLORS}
        self.brightness = float(rng.uniform(1 - r["lighting"], 1 + r["lighting"]))
        dx, dy = rng.uniform(-r["camera"], r["camera"], 2)
        self.camera = (float(dx), float(dy), float(rng.uniform(1 - r["camera"], 1 + r["camera"])))
        self.block_half = BLOCK_HALF * float(rng.uniform(1 - r["size"], 1 + r["size"]))
        self.slip = float(rng.uniform(0.0, r["friction"]))

    def _rgb(self, name: str) -> np.ndarray:
        """A palette colour as drawn this episode (jittered, lit), float32 in [0, 255]."""
        rgb = np.array(COLORS[name], np.float32)
        if self.brightness != 1.0 or self.palette_shift[name].any():
            rgb = np.clip((rgb + self.palette_shift[name]) * self.brightness, 0, 255)
        return rgb

    def _lit(self, rgb) -> np.ndarray:
        """A fixed colour (table, effector, cabinet...) under this episode's lighting."""
        if self.brightness == 1.0:
            return np.array(rgb, np.uint8)
        return np.clip(np.array(rgb, np.float32) * self.brightness, 0, 255).astype(np.uint8)

    def _paint(self) -> None:
        """Work out every colour this episode draws with, once: its palette and lighting are fixed at reset. (Worked
        out per frame, they were a third of the wrist camera's frame, which redraws everything:
        bench/rollout_profile.py.)"""
        self._block_rgb = [self._rgb(name).astype(np.uint8) for name in self.block_colors]
        self._drawer_rgb = [self._rgb(name).astype(np.uint8) for name in self.drawer_colors]
        self._effector_rgb = {False: self._lit(EFFECTOR_RGB), True: self._lit(GRIPPING_RGB)}
        self._handle_rgb, self._cabinet_rgb, self._pressed_rgb = (
            self._lit(rgb) for rgb in (HANDLE_RGB, CABINET_RGB, PRESSED_RGB))
        s = self.image_size
        self._table = np.empty((s, s, 3), np.uint8)  # the bare table, in colour and in depth
        self._table[:] = self._lit(TABLE_RGB)
        self._floor = np.full((s, s), CAMERA_HEIGHT, np.float32)
        targets = [self._rgb(name) for name in self.target_colors]  # pastel pads, dark bowl rims
        self._target_rgb = [((0.5 * rgb + 0.5 * 255) if self.family == "push" else 0.55 * rgb).astype(np.uint8)
                            for rgb in targets]
        buttons = [self._rgb(name) for name in self.button_colors]
        self._button_rgb = [((0.55 * rgb).astype(np.uint8), rgb.astype(np.uint8)) for rgb in buttons]  # rim, top

    # Layouts: each draws colours and positions (every object well apart, the effector clear of them all) and says
    # what the instruction names. push and place draw exactly as the first version did, so seeds give the same scenes.
    @staticmethod
    def _points(rng: np.random.Generator, n: int, gap: float, low: float = 0.14, high: float = 0.86) -> np.ndarray:
        """n points, every two more than ``gap`` apart: the first of up to 1,000 tries of n uniform points that is.

        The tries are drawn 64 at a time (one at a time, a layout's ~30 tries were 60% of a reset); the generator is
        then left where drawing them one at a time would have left it, so a seed gives the same scene as ever."""
        state = rng.bit_generator.state
        for start in range(0, 1000, 64):
            tries = rng.uniform(low, high, size=(min(64, 1000 - start), n, 2))
            d = np.linalg.norm(tries[:, :, None] - tries[:, None], axis=-1) + np.eye(n)
            apart = d.min(axis=(1, 2)) > gap
            if apart.any():
                used = start + int(apart.argmax()) + 1
                rng.bit_generator.state = state
                rng.uniform(low, high, size=(used, n, 2))  # the draws a one-at-a-time loop would have made
                return tries[used - start - 1]
        return tries[-1]

    @staticmethod
    def _colours(rng: np.random.Generator, n: int) -> list[str]:
        names = list(COLORS)
        return [names[i] for i in rng.choice(len(names), n, replace=False)]

    def _layout_push(self, rng: np.random.Generator) -> None:
        self.block_colors, self.target_colors = self._colours(rng, 2), self._colours(rng, 2)
        pts = self._points(rng, 5, 0.24)
        self.blocks, self.targets, self.effector = pts[0:2].copy(), pts[2:4].copy(), pts[4].copy()
        self.target_block, self.target_index = int(rng.integers(2)), int(rng.integers(2))
        self.kind = self.family
        self.combo = (self.block_colors[self.target_block], self.target_colors[self.target_index])

    _layout_place = _layout_push

    def _layout_stack(self, rng: np.random.Generator) -> None:
        self.block_colors = self._colours(rng, 3)
        pts = self._points(rng, 4, 0.24)
        self.blocks, self.effector = pts[0:3].copy(), pts[3].copy()
        self.target_block = int(rng.integers(3))
        self.target_index = (self.target_block + 1 + int(rng.integers(2))) % 3  # the block to stack on
        self.kind = "stack"
        self.combo = (self.block_colors[self.target_block], self.block_colors[self.target_index])

    def _layout_button(self, rng: np.random.Generator) -> None:
        self.button_colors, self.block_colors = self._colours(rng, 3), self._colours(rng, 2)
        pts = self._points(rng, 6, 0.2)
        self.buttons, self.blocks, self.effector = pts[0:3].copy(), pts[3:5].copy(), pts[5].copy()
        self.pressed = [False] * 3
        self.target_index = int(rng.integers(3))
        self.kind = "button"
        self.combo = (self.button_colors[self.target_index],)

    def _layout_drawer(self, rng: np.random.Generator) -> None:
        self.drawer_colors = self._colours(rng, 2)
        self._place_drawers(rng)
        self.target_index = int(rng.integers(2))
        self.verb = ("open", "close")[int(rng.integers(2))]
        self.opening = rng.integers(2, size=2).astype(np.float64)  # the other drawer: shut or open at random
        self.opening[self.target_index] = 0.0 if self.verb == "open" else 1.0
        self.kind = self.verb
        self.combo = (self.drawer_colors[self.target_index],)

    def _place_drawers(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Two cabinets, their drawers opening toward random sides, apart and inside the table, and the effector clear
        of both -> the boxes (x0, y0, x1, y1) each drawer covers, shut to fully open."""
        reach = CABINET_HALF + DRAWER_TRAVEL + HANDLE_HALF  # from a cabinet's centre to its open handle's far edge
        across = max(CABINET_HALF, DRAWER_HALF_WIDTH)

        def footprint(centre: np.ndarray, axis: np.ndarray) -> np.ndarray:
            """(x0, y0, x1, y1): everything the drawer covers, shut to fully open."""
            ends = np.stack([centre - axis * CABINET_HALF, centre + axis * reach])
            lo, hi = ends.min(0) - np.abs(axis[::-1]) * across, ends.max(0) + np.abs(axis[::-1]) * across
            return np.concatenate([lo, hi])

        for _ in range(1000):
            axes = AXES[rng.integers(len(AXES), size=2)]
            cabinets = rng.uniform(0.1, 0.9, size=(2, 2))
            effector = rng.uniform(0.14, 0.86, size=2)
            boxes = [footprint(c, a) for c, a in zip(cabinets, axes)]
            inside = all(b[0] >= 0.03 and b[1] >= 0.03 and b[2] <= 0.97 and b[3] <= 0.97 for b in boxes)
            apart = (boxes[0][2] + 0.03 < boxes[1][0] or boxes[1][2] + 0.03 < boxes[0][0]
                     or boxes[0][3] + 0.03 < boxes[1][1] or boxes[1][3] + 0.03 < boxes[0][1])
            clear = all(not (b[0] - 0.05 < effector[0] < b[2] + 0.05 and b[1] - 0.05 < effector[1] < b[3] + 0.05)
                        for b in boxes)
            if inside and apart and clear:
                break
        self.drawers, self.drawer_axes, self.effector = cabinets, axes, effector
        self.opening = np.zeros(2, np.float64)
        return boxes

    def _layout_stow(self, rng: np.random.Generator) -> None:
        self.drawer_colors, self.block_colors = self._colours(rng, 2), self._colours(rng, 2)
        boxes = self._place_drawers(rng)  # both shut
        for _ in range(1000):
            blocks = rng.uniform(0.1, 0.9, size=(2, 2))
            clear = all(not (b[0] - 0.06 < x < b[2] + 0.06 and b[1] - 0.06 < y < b[3] + 0.06)
                        for b in boxes for x, y in blocks)
            if clear and np.hypot(*(blocks[0] - blocks[1])) > 0.15 and \
                    np.linalg.norm(blocks - self.effector, axis=1).min() > 0.1:
                break
        self.blocks = blocks
        self.stowed = [-1, -1]
        self.target_block, self.target_index = int(rng.integers(2)), int(rng.integers(2))
        self.kind = "stow"
        self.combo = (self.block_colors[self.target_block], self.drawer_colors[self.target_index])

    def _layout_sort(self, rng: np.random.Generator, n: int = 2, gap: float = 0.24) -> None:
        self.block_colors = self._colours(rng, n)
        self.target_colors = [self.block_colors[i] for i in rng.permutation(n)]
        pts = self._points(rng, 2 * n + 1, gap)
        self.blocks, self.targets, self.effector = pts[:n].copy(), pts[n:2 * n].copy(), pts[2 * n].copy()
        self.kind, self.combo = self.family, ()

    def _layout_clear(self, rng: np.random.Generator) -> None:
        self._layout_sort(rng, 3, 0.2)  # seven things on the table: 0.24 apart, too few layouts are drawn

    # ----------------------------------------------------------------------------------------------------------------
    def handle(self, j: int) -> np.ndarray:
        """Where drawer j's handle is now."""
        return self.drawers[j] + self.drawer_axes[j] * (CABINET_HALF + self.opening[j] * DRAWER_TRAVEL)

    def _handles(self) -> np.ndarray:
        return self.drawers + self.drawer_axes * (CABINET_HALF + self.opening[:, None] * DRAWER_TRAVEL)

    def _tray_of(self, point: np.ndarray) -> int:
        """The drawer whose open part (out of its cabinet, up to the handle) ``point`` lies over; -1 none."""
        for j in range(len(self.drawers)):
            rel = point - self.drawers[j]
            along, across = float(rel @ self.drawer_axes[j]), float(rel @ self.drawer_axes[j][::-1])
            if CABINET_HALF <= along <= CABINET_HALF + self.opening[j] * DRAWER_TRAVEL and \
                    abs(across) <= DRAWER_HALF_WIDTH:
                return j
        return -1

    def _tray_centre(self, j: int) -> np.ndarray:
        return self.drawers[j] + self.drawer_axes[j] * (CABINET_HALF + self.opening[j] * DRAWER_TRAVEL / 2)

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(3), -1.0, 1.0)
        close = bool(a[2] > 0.0)
        if not close:
            if self.holding is not None:  # released: it lands on whatever block it is over, or in a drawer
                below = [self.block_z[j] for j in range(len(self.blocks)) if j != self.holding
                         and np.all(np.abs(self.blocks[j] - self.blocks[self.holding]) < 2 * self.block_half)]
                self.block_z[self.holding] = 1 + max(below) if below else 0
                if self.stowed:
                    self.stowed[self.holding] = self._tray_of(self.blocks[self.holding])
            self.holding = self.holding_drawer = None
        if close and not self.gripper_closed and self.holding is None and self.holding_drawer is None:
            self._close_hand()
        self.gripper_closed = close
        move = a[:2] * MAX_SPEED
        self.contact = self.holding is not None or self.holding_drawer is not None
        if self.holding_drawer is not None:  # the hand slides the drawer along its rail
            j = self.holding_drawer
            was = self.opening[j]
            self.opening[j] = np.clip(self.opening[j] + float(move @ self.drawer_axes[j]) / DRAWER_TRAVEL, 0.0, 1.0)
            self.effector = self.handle(j)
            for i, in_j in enumerate(self.stowed):  # what rests in it slides with it
                if in_j == j:
                    self.blocks[i] = self.blocks[i] + self.drawer_axes[j] * (self.opening[j] - was) * DRAWER_TRAVEL
        else:
            self.effector = np.clip(self.effector + move, 0.03, 0.97)
        for i in range(len(self.blocks)):
            if i == self.holding:
                self.blocks[i] = self.effector
                continue
            before = self.blocks[i].copy() if self.slip else None
            if self.slip and self.block_vel[i].any():  # still sliding from an earlier push
                self.blocks[i] = np.clip(self.blocks[i] + self.block_vel[i], 0.05, 0.95)
                self.block_vel[i] *= self.slip
            if not close or self.holding is not None or (self.stowed and self.stowed[i] >= 0):
                continue  # an open hand, or one carrying a block, passes over blocks; a drawer holds its own
            delta = self.blocks[i] - self.effector
            dist = float(np.hypot(*delta))
            reach = EFFECTOR_R + self.block_half
            if dist < reach:  # pushed out of the effector's way, along the line between their centres
                direction = delta / dist if dist > 1e-9 else np.array([1.0, 0.0])
                self.blocks[i] = np.clip(self.effector + direction * reach, 0.05, 0.95)
                self.contact = True
                if self.slip:
                    self.block_vel[i] = (self.blocks[i] - before) * self.slip
        self.steps += 1
        success = self.is_success()
        terminated = success
        truncated = (not terminated) and self.steps >= self.horizon
        reward = 1.0 if success else 0.0  # for gymnasium users; flywheel itself never reads it
        return self._obs(), reward, terminated, truncated, self._info(success)

    def _close_hand(self) -> None:
        """On the closing edge: grasp the block under the hand, else hold a handle, else press a button. With a
        handle nearer than any block (stow: a block in the drawer lies next to its handle), the handle."""
        handle = float(np.linalg.norm(self._handles() - self.effector, axis=1).min()) if len(self.drawers) else 1.0
        if len(self.blocks):
            dist = np.linalg.norm(self.blocks - self.effector, axis=1)
            i = int(dist.argmin())
            if dist[i] < GRASP_R and dist[i] <= handle:
                self.holding = i
                self.block_z[i] = 0
                self.block_vel[i] = 0.0
                if self.stowed:
                    self.stowed[i] = -1
                return
        if len(self.drawers):
            dist = np.linalg.norm(self._handles() - self.effector, axis=1)
            j = int(dist.argmin())
            if dist[j] < GRASP_R:
                self.holding_drawer = j
                return
        if len(self.buttons):
            dist = np.linalg.norm(self.buttons - self.effector, axis=1)
            j = int(dist.argmin())
            if dist[j] < BUTTON_R and not self.pressed[j]:
                self.pressed[j] = True
                self._static = None  # buttons are drawn with the static layer

    # ----------------------------------------------------------------------------------------------------------------
    def is_success(self) -> bool:
        """The ground-truth predicate of the episode's family (see the module docstring)."""
        f = self.family
        if f in ("push", "place"):  # the named block rests (not held) on/in the named target
            if self.holding == self.target_block:
                return False
            block, target = self.blocks[self.target_block], self.targets[self.target_index]
            if f == "push":
                return bool(np.all(np.abs(block - target) < PAD_HALF - 0.01))
            return bool(np.hypot(*(block - target)) < BOWL_R_IN)
        if f == "stack":  # the named block rests on the named base block
            return self.holding is None and bool(
                np.all(np.abs(self.blocks[self.target_block] - self.blocks[self.target_index]) < self.block_half * 0.8))
        if f == "button":  # the named button, and no other, is pressed
            return self.pressed[self.target_index] and sum(self.pressed) == 1
        if f == "drawer":
            o = self.opening[self.target_index]
            return bool(o >= OPEN_AT) if self.verb == "open" else bool(o <= SHUT_AT)
        if f == "stow":  # the named block rests in the named drawer, shut
            return self.stowed[self.target_block] == self.target_index and self.opening[self.target_index] <= SHUT_AT
        return not self._unsorted()  # sort, clear: every block rests in the bowl of its colour

    def _unsorted(self) -> list[int]:
        """Sort, clear: the blocks not yet resting in the bowl of their colour (a held block is not resting)."""
        return [i for i, c in enumerate(self.block_colors) if i == self.holding or np.hypot(
            *(self.blocks[i] - self.targets[self.target_colors.index(c)])) >= BOWL_R_IN]

    def subtasks(self) -> list[str]:
        """The episode's named subtasks, in the order the scripted expert does them: a block each for the
        long-horizon families, the instruction itself for the others."""
        if self.family == "stow":
            b, d = self.combo
            return [f"open the {d} drawer", f"put the {b} block in the {d} drawer", f"close the {d} drawer"]
        if self.family in LONG_HORIZON:
            return [f"put the {c} block in the {c} bowl" for c in self.block_colors]
        return [self.instruction]

    def subtasks_left(self) -> list[int]:
        """Which of ``subtasks()`` are still to do and may be done next: every block not yet in its bowl (sort,
        clear: in any order), the one under way (stow: in order), none once the task is done."""
        if self.family in LONG_HORIZON and self.family != "stow":
            return self._unsorted()
        under_way = self.subtask_index()
        return [under_way] if under_way < len(self.subtasks()) else []

    def subtask_index(self) -> int:
        """Which of ``subtasks()`` is under way: the first not yet done, which is what the scripted expert works on
        (a block knocked out of its bowl is to do again); ``len(subtasks())`` once all are done."""
        if self.family == "stow":
            if self.stowed[self.target_block] == self.target_index:
                return 3 if self.is_success() else 2
            return 1 if self.opening[self.target_index] >= OPEN_AT else 0
        if self.family in LONG_HORIZON:
            todo = self._unsorted()
            return todo[0] if todo else len(self.blocks)
        return int(self.is_success())

    def _info(self, success: bool | None = None) -> dict[str, Any]:
        success = self.is_success() if success is None else success
        return {
            "instruction": self.instruction,
            "family": self.family,
            "success": success,
            "steps": self.steps,
            "combo_heldout": self._combo_heldout,
            "kind": self.kind,  # what the instruction asks (the family, or "open" / "close" for drawers)
            "named": list(self.combo),  # the colours it names, in order (none for sort and clear)
            # which of subtasks() is under way (a one-move family's is its success, already known: not judged again)
            "subtask": self.subtask_index() if self.family in LONG_HORIZON else int(success),
        }

    def randomization(self) -> dict[str, Any]:
        """What this episode's domain randomisation applied (the defaults when it is off)."""
        return {
            "palette_shift": {k: [round(float(x), 3) for x in v] for k, v in self.palette_shift.items()},
            "brightness": self.brightness,
            "camera": list(self.camera),
            "block_half": self.block_half,
            "slip": self.slip,
        }

    def _obs(self) -> dict[str, np.ndarray]:
        obs = {"proprio": np.array([self.effector[0], self.effector[1], float(self.gripper_closed)], np.float32)}
        for sensor in self.sensors:
            if sensor == "touch":
                obs["touch"] = np.array([float(self.contact)], np.float32)
            else:
                obs[SENSOR_KEYS[sensor]] = self._picture(*self._camera(sensor))
        return obs

    def draw_later(self, frames: Frames | None) -> None:
        """From now on, the camera pictures of each observation are queued on ``frames`` and drawn when it is told
        to (``Frames.draw``), together with every other environment's queued there: the arrays are handed out at
        once, and hold the picture only after that. ``None``: draw each picture at once again (the default).
        actors/rollout.py draws a whole chunk's frames of every environment in one go before the policy looks."""
        self._frames = frames

    def _picture(self, base: np.ndarray, shapes: list) -> np.ndarray:
        if self._frames is None:
            return Frames.drawn(base, shapes, self.image_size)
        img = np.empty_like(base)
        self._frames.add(img, base, shapes)
        return img

    def render(self):
        return self.render_image()

    # ----------------------------------------------------------------------------------------------------------------
    def render_image(self) -> np.ndarray:
        """Draw the scene: the table with its pads, bowls, buttons and cabinets, then the drawers, the blocks
        (lowest first, the held one last) and the effector ring on top.

        What does not move is drawn once per episode (again when a button is pressed); each frame copies it and draws
        only what moves, the effector ring inside its bounding box (bench/env_throughput.py measures the cost;
        ``reference_image`` is the plain drawing that tests compare against)."""
        return Frames.drawn(*self._camera("overhead"), self.image_size)

    def wrist_image(self) -> np.ndarray:
        """The hand camera: the scene WRIST_SPAN table widths across, centred on the hand (rigidly mounted, so the
        overhead camera's jitter does not move it)."""
        return Frames.drawn(*self._camera("wrist"), self.image_size)

    def depth_image(self) -> np.ndarray:
        """The overhead camera's depth: distance down to the nearest surface, float32 (S, S)."""
        return Frames.drawn(*self._camera("depth"), self.image_size)

    def _camera(self, sensor: str, windowed: bool = True) -> tuple[np.ndarray, list]:
        """A camera's picture now, as (base, shapes) (``_frame``): "overhead", "wrist" or "depth". ``windowed=False``:
        the plain drawing (``reference_image``), every shape redrawn, every ring over the whole grid."""
        if sensor == "wrist":
            return self._wrist_frame(windowed)
        return self._frame(cached=windowed and sensor == "overhead", windowed=windowed, depth=sensor == "depth")

    def _wrist_frame(self, windowed: bool) -> tuple[np.ndarray, list]:
        saved, zoom = self.camera, 1.0 / WRIST_SPAN
        self.camera = ((0.5 - float(self.effector[0])) * zoom, (0.5 - float(self.effector[1])) * zoom, zoom)
        try:
            return self._frame(cached=False, windowed=windowed)
        finally:
            self.camera = saved

    def _frame(self, cached: bool, windowed: bool, depth: bool = False) -> tuple[np.ndarray, list]:
        """A picture as (base, shapes): the picture it starts from and what is drawn over it, in order (see
        ``Frames``), in colour or in depth (the same shapes, each painted with its distance to the camera)."""
        if cached and not depth:
            if self._static is None:
                self._static, self._drawn_openings = Frames.drawn(*self._draw_static(False, windowed),
                                                                  self.image_size), None
            # Drawers move only while held: the static layer with the drawers drawn is kept until one slides.
            openings = tuple(self.opening.tolist())
            if self._drawn_openings != openings:
                drawers: list = []
                self._draw_drawers(drawers, False)
                self._with_drawers = Frames.drawn(self._static, drawers, self.image_size)
                self._drawn_openings = openings
            base, shapes = self._with_drawers, []
        else:
            base, shapes = self._draw_static(depth, windowed)
            self._draw_drawers(shapes, depth)
        d = (lambda part: np.float32(CAMERA_HEIGHT - HEIGHTS[part])) if depth else None
        blocks = self.blocks.tolist()  # Python floats: cheaper to index than the array's elements
        order = sorted((i for i in range(len(blocks)) if i != self.holding), key=self.block_z.__getitem__)
        for i in order + ([self.holding] if self.holding is not None else []):
            if depth:
                top = HEIGHTS["lifted"] if i == self.holding else 2 * self.block_half * (1 + self.block_z[i])
                value = np.float32(CAMERA_HEIGHT - top)
            else:
                value = self._block_rgb[i]
            self._box(shapes, blocks[i], self.block_half, value)
        self._ring(shapes, self.effector.tolist(), EFFECTOR_R, EFFECTOR_R * 0.45,
                   d("effector") if depth else self._effector_rgb[self.gripper_closed], windowed)
        return base, shapes

    def _draw_drawers(self, shapes: list, depth: bool) -> None:
        """Each drawer's box, out of its cabinet as far as it is open, and its handle."""
        d = (lambda part: np.float32(CAMERA_HEIGHT - HEIGHTS[part])) if depth else None
        for j in range(len(self.drawers)):
            (cx, cy), (ax, ay) = self.drawers[j].tolist(), self.drawer_axes[j].tolist()
            out = CABINET_HALF + float(self.opening[j]) * DRAWER_TRAVEL  # centre to handle, along the rail
            mid = (out - CABINET_HALF) / 2  # the box spans the cabinet's back to the handle
            half = (abs(ax) * (out + CABINET_HALF) / 2 + abs(ay) * DRAWER_HALF_WIDTH,
                    abs(ay) * (out + CABINET_HALF) / 2 + abs(ax) * DRAWER_HALF_WIDTH)
            self._rect(shapes, (cx + ax * mid, cy + ay * mid), half, d("drawer") if depth else self._drawer_rgb[j])
            self._rect(shapes, (cx + ax * out, cy + ay * out), (HANDLE_HALF, HANDLE_HALF),
                       d("handle") if depth else self._handle_rgb)

    def _draw_static(self, depth: bool = False, windowed: bool = True) -> tuple[np.ndarray, list]:
        """What does not move: the table, pads or bowls, buttons, cabinets (in colour, or in depth)."""
        shapes: list = []
        d = lambda part: np.float32(CAMERA_HEIGHT - HEIGHTS[part])  # noqa: E731
        for center, rgb in zip(self.targets, self._target_rgb):
            if self.family == "push":  # pastel pad
                self._box(shapes, center, PAD_HALF, d("pad") if depth else rgb)
            else:  # dark bowl rim
                self._ring(shapes, center, BOWL_R_OUT, BOWL_R_IN, d("bowl") if depth else rgb, windowed)
        for center, (rim, top), pressed in zip(self.buttons, self._button_rgb, self.pressed):
            self._ring(shapes, center, BUTTON_R, 0.0, d("button") if depth else rim, windowed)
            inner = d("pressed" if pressed else "button") if depth else (self._pressed_rgb if pressed else top)
            self._ring(shapes, center, BUTTON_R * 0.7, 0.0, inner, windowed)
        for center in self.drawers:
            self._box(shapes, center, CABINET_HALF, d("cabinet") if depth else self._cabinet_rgb)
        return (self._floor if depth else self._table), shapes

    def _view(self, x: float, y: float, size: float) -> tuple[float, float, float]:
        """World -> camera coordinates (table widths), for a point and a length; the identity unless the camera is
        jittered."""
        if self.camera == NO_JITTER:  # (the hot callers test this themselves, to skip the call)
            return x, y, size
        dx, dy, zoom = self.camera
        return (x - 0.5) * zoom + 0.5 + dx, (y - 0.5) * zoom + 0.5 + dy, size * zoom

    def _box(self, shapes: list, center, half: float, rgb) -> None:
        cx, cy = float(center[0]), float(center[1])
        if self.camera != NO_JITTER:
            cx, cy, half = self._view(cx, cy, half)
        s = self.image_size
        x0, x1 = round((cx - half) * s), round((cx + half) * s)  # Python's round: half to even, as NumPy's
        y0, y1 = round((cy - half) * s), round((cy + half) * s)
        shapes.append((y0 if y0 > 0 else 0, y1 if y1 > 0 else 0, x0 if x0 > 0 else 0, x1 if x1 > 0 else 0, rgb, None))

    def _rect(self, shapes: list, center, half, rgb) -> None:
        s = self.image_size
        cx, cy, hx = self._view(float(center[0]), float(center[1]), float(half[0]))
        hy = self._view(0.0, 0.0, float(half[1]))[2]
        x0, x1 = round((cx - hx) * s), round((cx + hx) * s)
        y0, y1 = round((cy - hy) * s), round((cy + hy) * s)
        shapes.append((max(y0, 0), max(y1, 0), max(x0, 0), max(x1, 0), rgb, None))

    def _ring(self, shapes: list, center: np.ndarray, r_out: float, r_in: float, rgb, windowed: bool) -> None:
        """Pixels whose centres lie at distance [r_in, r_out) from center; ``windowed`` looks only inside the ring's
        bounding box (the same pixels, far fewer distances)."""
        s = self.image_size
        cx, cy = float(center[0]), float(center[1])
        if self.camera != NO_JITTER:
            cx, cy, r_out = self._view(cx, cy, r_out)
            r_in = self._view(0.0, 0.0, r_in)[2]
        if not windowed:
            shapes.append((0, s, 0, s, rgb, (cy, cx, r_out * r_out, r_in * r_in, 0, 0, s)))
            return
        # The window: a square of one size per radius (rings of a size share their arithmetic, Frames), on pixels
        # that may lie off the picture; only its part in view is painted.
        size = int(2.0 * r_out * s) + 4
        x0, y0 = math.floor((cx - r_out) * s) - 1, math.floor((cy - r_out) * s) - 1
        if x0 >= s or y0 >= s or x0 + size <= 0 or y0 + size <= 0:  # out of view (the wrist camera sees a quarter)
            return
        shapes.append((max(y0, 0), min(y0 + size, s), max(x0, 0), min(x0 + size, s), rgb,
                       (cy, cx, r_out * r_out, r_in * r_in, y0, x0, size)))

    # Ground-truth state, for the scripted expert, the auxiliary grounding targets and tests (policies see pixels
    # and proprio). "block" is what to act on next and "target" where it must go.
    def state(self) -> dict[str, Any]:
        f, block, target, holding = self.family, None, None, False
        if f in ("push", "place", "stack"):
            i = self.target_block
            block = self.blocks[i]
            target = self.targets[self.target_index] if f != "stack" else self.blocks[self.target_index]
            holding = self.holding == i
        elif f == "button":
            block = target = self.buttons[self.target_index]
        elif f == "drawer" or (f == "stow" and self.subtask_index() != 1):
            j = self.target_index
            block = self.handle(j)
            goal = 1.0 if (self.verb == "open" if f == "drawer" else self.subtask_index() == 0) else 0.0
            target = self.drawers[j] + self.drawer_axes[j] * (CABINET_HALF + goal * DRAWER_TRAVEL)
            holding = self.holding_drawer == j
        elif f == "stow":  # the block, into the middle of the drawer's open part
            block, target = self.blocks[self.target_block], self._tray_centre(self.target_index)
            holding = self.holding == self.target_block
        else:  # sort, clear: the first block not yet in its bowl (the held one counts as not yet in)
            todo = self._unsorted()
            i = todo[0] if todo else 0
            block, target = self.blocks[i], self.targets[self.target_colors.index(self.block_colors[i])]
            holding = self.holding == i
        return {
            "family": f,
            "effector": self.effector.copy(),
            "block": np.array(block, np.float64),
            "target": np.array(target, np.float64),
            "holding_target": bool(holding),
            "gripper_closed": self.gripper_closed,
        }


def reference_image(env: TabletopEnv, camera: str = "overhead") -> np.ndarray:
    """The picture ``render_image`` (or, for camera="wrist", ``wrist_image``) must give, drawn the plain way:
    everything redrawn, every ring's distances over the whole pixel grid. Tests check the fast path against it pixel
    for pixel; ``bench/env_throughput.py`` times both."""
    return Frames.drawn(*env._camera(camera, windowed=False), env.image_size)


def make_env(family: str = "any", image_size: int = 64, max_steps: int = 40, phrasing: str = "canonical",
             combos: str = "all", randomize: dict[str, float] | None = None,
             sensors: tuple[str, ...] | list[str] | str = ("overhead",)) -> TabletopEnv:
    return TabletopEnv(family=family, image_size=image_size, max_steps=max_steps, phrasing=phrasing, combos=combos,
                       randomize=randomize, sensors=sensors)


gym.register(id="flywheel/Tabletop-v0", entry_point="actors.tabletop:TabletopEnv")
gym.register(id="flywheel/TabletopSuite-v0", entry_point="actors.tabletop:TabletopEnv", kwargs={"family": "suite"})
