"""The LIBERO side of ``env.name=libero``: one LIBERO task, stepped for a flywheel process over a pipe.

LIBERO (robosuite 1.4, MuJoCo 3.17) cannot share flywheel's environment: Meta-World pins MuJoCo 3.3. So it lives in
a venv of its own (``make libero-venv``), and ``actors/libero.py`` starts this module there, one process per
environment, speaking length-prefixed pickles on its stdin and stdout. It imports numpy and LIBERO only.

Requests are ``(command, arguments)``; every reply is ``("ok", value)`` or ``("error", text)``:

- ``make {suite, task, image_size, shadows, cameras}`` -> the task's instruction, its number of fixed init states, its action bounds
  and its goal (BDDL predicates, ``[["on", "akita_black_bowl_1", "plate_1"]]``);
- ``reset {init, seed}`` -> the observation after the scene is set to fixed init state ``init`` and has settled
  (``seed`` draws the places of the fixtures, which the init states do not hold);
- ``step {action}`` -> (observation, success);
- ``close``.

An observation is ``{"image": agentview (S, S, 3), "wrist": eye-in-hand (S, S, 3), "proprio": (8,),
"objects": {name: (x, y, z)}}``, with the cameras ``make`` asked for. Both cameras are turned 180 degrees, so that up in the picture is away from the
robot, as LIBERO's published policies see them; proprio is the hand's position, its rotation as an axis-angle and
the two finger joints (openpi's LIBERO state); ``objects`` is for a scripted expert, never a policy input.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback

os.environ.setdefault("MUJOCO_GL", "egl")

CAMERAS = ("agentview", "robot0_eye_in_hand")  # flywheel's overhead and wrist cameras
SETTLE_STEPS = 10  # LIBERO's objects drop onto the table after a reset; policies are evaluated once they rest
IDLE = [0.0] * 6 + [-1.0]  # no motion, fingers open


def read_message(stream) -> object:
    header = stream.read(4)
    if len(header) < 4:
        raise EOFError("the other side closed the pipe")
    (size,) = struct.unpack("<I", header)
    return pickle.loads(stream.read(size))


def write_message(stream, message: object) -> None:
    data = pickle.dumps(message, protocol=5)
    stream.write(struct.pack("<I", len(data)) + data)
    stream.flush()


def _axis_angle(quat) -> list[float]:
    """robosuite's (x, y, z, w) quaternion as an axis-angle vector."""
    import numpy as np

    x, y, z, w = (float(v) for v in quat)
    w = max(-1.0, min(1.0, w))
    s = float(np.sqrt(max(0.0, 1.0 - w * w)))
    angle = 2.0 * float(np.arccos(w))
    return [0.0, 0.0, 0.0] if s < 1e-8 else [x / s * angle, y / s * angle, z / s * angle]


class Task:
    def __init__(self, suite: str, task: int, image_size: int, shadows: bool = True,
                 cameras: tuple[str, ...] = CAMERAS):
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise ValueError(f"unknown LIBERO suite {suite!r}: one of libero_spatial, libero_object, libero_goal, "
                             f"libero_10, libero_90")
        self.suite = suites[suite]()
        if not 0 <= task < self.suite.n_tasks:
            raise ValueError(f"{suite} has tasks 0..{self.suite.n_tasks - 1}, not {task}")
        spec = self.suite.get_task(task)
        self.instruction = spec.language
        self.init_states = self.suite.get_task_init_states(task)
        bddl = os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file)
        # hard_reset=False: the scene's model is built once, and a reset costs seconds less
        self.cameras = tuple(cameras)
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=image_size, camera_widths=image_size,
                                      camera_names=list(self.cameras), hard_reset=False)
        if not shadows:
            self._plain_rendering()
        self.reset(0, 0)  # the first reset after the build differs a little from every later one: spent here

    def _plain_rendering(self) -> None:
        """Shadows, reflections and multisampling off: on a CPU renderer they are most of a step's time (a step with
        two cameras: 2.75 steps/s with them, 9.4 without; bench/libero_throughput.py)."""
        import mujoco

        context = self.env.env.sim._render_context_offscreen
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            context.scn.flags[flag] = 0
        context.model._model.vis.quality.offsamples = 0  # takes effect in a new GL context: made here
        context.gl_ctx.make_current()
        context.con.free()
        context._set_mujoco_context_and_buffers()

    def describe(self) -> dict:
        low, high = self.env.env.action_spec
        goal = [[str(term) for term in predicate] for predicate in self.env.env.parsed_problem["goal_state"]]
        return {"instruction": self.instruction, "inits": len(self.init_states), "action_low": list(low),
                "action_high": list(high), "goal": goal}

    def reset(self, init: int, seed: int) -> dict:
        self.env.seed(int(seed))  # a reset draws the fixtures' places again: the same seed, the same places
        self.env.reset()
        for robot in self.env.env.robots:  # the gripper's rate-limited command outlives a soft reset: start it anew
            robot.gripper.current_action = robot.gripper.current_action * 0.0
        obs = self.env.set_init_state(self.init_states[int(init) % len(self.init_states)])
        for robot in self.env.env.robots:
            robot.controller.reset_goal()
        for _ in range(SETTLE_STEPS):
            obs, _, _, _ = self.env.step(IDLE)
        return self._obs(obs)

    def step(self, action) -> tuple[dict, bool]:
        obs, _, _, _ = self.env.step([float(a) for a in action])
        return self._obs(obs), bool(self.env.check_success())

    @staticmethod
    def _obs(obs: dict) -> dict:
        import numpy as np

        turn = lambda frame: np.ascontiguousarray(frame[::-1, ::-1])  # noqa: E731 (180 degrees)
        proprio = [*obs["robot0_eef_pos"], *_axis_angle(obs["robot0_eef_quat"]), *obs["robot0_gripper_qpos"]]
        objects = {k[:-4]: np.asarray(v, np.float64) for k, v in obs.items()
                   if k.endswith("_pos") and not k.startswith("robot0") and "_to_" not in k}
        frames = {key: turn(obs[f"{camera}_image"]) for key, camera in zip(("image", "wrist"), CAMERAS)
                  if f"{camera}_image" in obs}
        return {**frames, "proprio": np.asarray(proprio, np.float32), "objects": objects}

    def close(self) -> None:
        self.env.close()


def serve(requests, replies) -> None:
    task = None
    while True:
        try:
            command, args = read_message(requests)
        except EOFError:
            break
        try:
            if command == "make":
                task = Task(args["suite"], int(args["task"]), int(args["image_size"]), bool(args["shadows"]),
                            tuple(args["cameras"]))
                value = task.describe()
            elif command == "reset":
                value = task.reset(args["init"], args["seed"])
            elif command == "step":
                value = task.step(args["action"])
            elif command == "close":
                write_message(replies, ("ok", None))
                break
            else:
                raise ValueError(f"unknown command {command!r}")
            write_message(replies, ("ok", value))
        except Exception as e:  # the adapter raises it, with LIBERO's traceback
            write_message(replies, ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    if task is not None:
        task.close()


def main() -> None:
    # The protocol owns the real stdout; anything LIBERO or robosuite prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
