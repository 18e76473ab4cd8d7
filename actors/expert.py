"""Scripted experts for the built-in tabletop: they read the simulator state, not pixels, and make demonstrations."""

from __future__ import annotations

import numpy as np

from actors.tabletop import (BLOCK_HALF, BOWL_R_IN, BUTTON_R, DRAWER_TRAVEL, EFFECTOR_R, MAX_SPEED, OPEN_AT, PAD_HALF,
                             TabletopEnv)

# Hard examples for the success detector, made on purpose: the cases a detector trained on demonstrations and
# rollouts alone gets wrong (measured on the newest policy: blocks held over the bowl at time-out called successes,
# blocks let go just inside the bowl's rim called failures).
# - near_miss: the block ends just outside what counts as success (touching the pad, on the bowl's rim, half off the
#   base block): a failure;
# - near_hit: the block is let go just inside it: a success at the border;
# - hover: the block is carried over the target and never let go (held at time-out): a failure that looks like one.
# Offsets from the target's centre, per family; a family not named gets a plain demonstration. A drawer's handle
# stops short of its goal along the rail (opening 0.8 or 0.2, where 0.9 / 0.1 count; a near hit 0.93 / 0.07); a
# button is closed on off its centre (just outside its disc: nothing pressed; a near hit just inside its edge).
DRAWER_SLACK = (1.0 - OPEN_AT) * DRAWER_TRAVEL  # how far short of fully open (or shut) still counts
AIM_OFFSET = {
    "near_miss": {"push": PAD_HALF + 0.015, "place": BOWL_R_IN + 0.02, "stack": BLOCK_HALF * 1.1,
                  "sort": BOWL_R_IN + 0.02, "clear": BOWL_R_IN + 0.02, "drawer": 2 * DRAWER_SLACK,
                  "button": BUTTON_R + 0.03},
    "near_hit": {"place": BOWL_R_IN - 0.015, "stack": BLOCK_HALF * 0.6, "sort": BOWL_R_IN - 0.015,
                 "clear": BOWL_R_IN - 0.015, "drawer": 0.7 * DRAWER_SLACK, "button": BUTTON_R - 0.012},
}
HOVER_FAMILIES = ("push", "place", "stack", "sort", "clear")
HARD_EXAMPLES = ("near_miss", "near_hit", "hover")

# Operators: how a demonstrator goes about "push the block onto the pad", as the people of a real lab's
# teleoperation pool differ. Both succeed when they demonstrate (they read the true state); what differs is how much
# a policy that imitates them from pixels gets right.
# - standard: hovers with an open hand to just behind the block, closes it there and pushes;
# - carrier: picks the block up, carries it over the pad's centre and lets go there, as in place.
# The shipped base learned from both (its record's config says so). Imitated from pixels, they differ: the base's
# carried pushes succeed 0.62 of the time, its pushes with the fist almost never.
OPERATORS = ("standard", "carrier")


def hard_example_plan(kind: str, family: str, angle: float) -> dict | None:
    """How the expert makes a ``kind`` of hard example (HARD_EXAMPLES) in ``family``: ``expert_action``'s keyword
    arguments, the offset pointing along ``angle``; None where the kind does not apply to the family."""
    if kind not in HARD_EXAMPLES:
        raise ValueError(f"unknown hard example {kind!r}: choose from {HARD_EXAMPLES}")
    if kind == "hover":
        return {"hold": True} if family in HOVER_FAMILIES else None
    r = AIM_OFFSET[kind].get(family)
    return None if r is None else {"miss": r * np.array([np.cos(angle), np.sin(angle)])}


def _toward(src: np.ndarray, dst: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """A velocity command toward dst, full speed when far, proportional when close (no overshoot)."""
    v = (dst - src) / MAX_SPEED * gain
    n = float(np.hypot(*v))
    return v / n if n > 1.0 else v


def expert_action(env: TabletopEnv, rng: np.random.Generator | None = None, noise: float = 0.0,
                  miss: np.ndarray | None = None, hold: bool = False, operator: str = "standard") -> np.ndarray:
    """One action for the current state. ``noise`` adds Gaussian motion noise (more varied demonstrations).

    Every family but push is the same two moves on ``env.state()``: reach what to act on (a block, a button, a
    drawer's handle) and close on it; then, holding it, carry it to where it must go and let go there (a pressed
    button or a drawer slid home ends the episode on the way).

    ``miss`` (x, y) shifts where the block must go (families in AIM_OFFSET): a near miss or a near hit, which puts
    the block down there once and then keeps the hand still and open. ``hold``: grasp the block (push too), carry
    it over the target and never let go. ``operator``: whose way of doing it (OPERATORS)."""
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}: choose from {OPERATORS}")
    s = env.state()
    eff, block, target = s["effector"], s["block"], s["target"]
    if miss is not None and s["family"] == "button":
        block = target = np.clip(block + miss, 0.03, 0.97)  # close the hand there: a press, or not, off centre
    elif miss is not None:
        if s["family"] == "drawer":  # stop short along the rail: back from the goal toward where the handle is
            back = block - target
            miss = float(np.hypot(*miss)) * back / max(float(np.hypot(*back)), 1e-9)
        if s["family"] == "push" and float(miss @ (block - target)) < 0:
            miss = -miss  # fall short: a push past the pad would cross it (and succeed) on the way
        target = np.clip(target + miss, 0.03, 0.97)
        if not s["holding_target"] and np.hypot(*(block - target)) < 0.03:
            return np.array([0.0, 0.0, -1.0], np.float32)  # put down where it was aimed: stay clear of it
    if s["family"] != "push" or hold or operator == "carrier":
        if s["holding_target"]:
            move = _toward(eff, target)
            # Release over the bowl; a drawer made to stop short is let go only where it was aimed (it moves 0.4 of
            # its travel a step, so 0.02 early would be another opening altogether).
            let_go = 0.004 if miss is not None and s["family"] == "drawer" else 0.02
            grip = 1.0 if hold or np.hypot(*(target - eff)) > let_go else -1.0
        else:
            move = _toward(eff, block)
            near = np.hypot(*(block - eff)) < 0.02
            # Close on arrival; if the gripper is already closed (missed grasp) open it first.
            grip = 1.0 if near and not s["gripper_closed"] else -1.0
    else:
        move, grip = _push_move(eff, block, target, env.block_half)
    action = np.array([move[0], move[1], grip], np.float64)
    if noise > 0 and rng is not None:
        action[:2] += rng.normal(0.0, noise, 2)
    return np.clip(action, -1.0, 1.0).astype(np.float32)


def _push_move(eff: np.ndarray, block: np.ndarray, target: np.ndarray, block_half: float) -> tuple[np.ndarray, float]:
    """Hover (hand open) to just behind the block, then close the hand and push along the block->pad line."""
    to_goal = target - block
    direction = to_goal / max(float(np.hypot(*to_goal)), 1e-9)
    reach = EFFECTOR_R + block_half
    rel = eff - block
    along = float(rel @ direction)
    lateral = rel - along * direction
    if -reach - 0.03 < along < -reach * 0.7 and float(np.hypot(*lateral)) < 0.025:
        move = _toward(eff, target - direction * reach) - lateral / MAX_SPEED
        n = float(np.hypot(*move))
        return (move / n if n > 1.0 else move), 1.0
    behind = np.clip(block - direction * (reach + 0.005), 0.03, 0.97)
    return _toward(eff, behind), -1.0
