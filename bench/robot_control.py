"""The control loop through the safety layer at 50 Hz, over loopback (issue 34).

    PYTHONPATH=. .venv/bin/python bench/robot_control.py [seconds]     # default 20 s per configuration

Three configurations, each one episode of ``seconds`` at 50 Hz, the same action every step:

- ``clock``: RobotEnv over a robot that does nothing (a fixed frame, a counter in one pixel): the layer and the
  clock alone, the baseline;
- ``in-process``: RobotEnv over the tabletop as a robot (actors/sim_robot.py, its physics on a 50 Hz clock of its
  own) in this process;
- ``loopback``: RobotEnv over RemoteRobot, the same robot behind a robot host in another process on 127.0.0.1 (two
  round trips a step: send, observe).

Figures: the control period's tick error (when the command went out against when it was due: p50, p99, max),
target p99 <= 2 ms over loopback, and the period's error (a period's length less 20 ms, |p99|); the layer's own checks per step as a share of the 20 ms period, target <= 5%;
and the watchdog's reaction: 20 silences after a command, how long after its 100 ms deadline the robot was held.
"""

from __future__ import annotations

import multiprocessing
import sys
import time

import numpy as np

from actors.robot import RobotEnv, RobotFrame, SafetySettings, Watchdog
from actors.robot_host import RemoteRobot, RobotHost
from actors.sim_robot import SimRobot
from bench.common import write_result

RATE_HZ = 50.0
ACTION = np.array([0.2, -0.1, -1.0], np.float32)


class StillRobot:
    """A robot that does nothing: what the clock and the layer cost with no robot behind them."""

    action_dim = 3

    def __init__(self) -> None:
        self.image = np.zeros((64, 64, 3), np.uint8)
        self.n = 0

    def observe(self) -> RobotFrame:
        self.n += 1
        self.image[0, 0, 0] = self.n % 256  # a live camera's frames differ
        return RobotFrame({"overhead": self.image.copy()}, np.zeros(3, np.float32), time.monotonic())

    def send(self, action) -> None: ...

    def hold(self) -> None: ...

    def estop(self) -> None: ...

    def reset(self, seed):
        return {"instruction": "hold still"}

    def close(self) -> None: ...


def episode(robot, seconds: float) -> dict:
    steps = int(seconds * RATE_HZ)
    env = RobotEnv(robot, SafetySettings(rate_hz=RATE_HZ, max_delta=0.5, workspace_low=(0.05, 0.05),
                                         workspace_high=(0.95, 0.95), watchdog_s=0.2), max_steps=steps)
    env.reset(seed=0)
    for _ in range(steps):
        _, _, term, trunc, info = env.step(ACTION)
        if term or trunc:
            break
    env.close()
    s = info["safety"]
    errors = np.asarray(env._record["tick_error_s"]) * 1000
    periods = np.abs(np.diff(errors))  # each period's length less 20 ms: the change of the tick error
    return {"steps": len(errors), "tick_error_ms": {"p50": float(np.percentile(errors, 50)),
                                                     "p99": float(np.percentile(errors, 99)),
                                                     "max": float(errors.max())},
            "period_error_ms": {"p99": float(np.percentile(periods, 99)), "max": float(periods.max())},
            "overruns": s["counts"].get("overrun", 0), "cut_short": info.get("cut_short"),
            "layer_ms": {"mean": s["layer_mean_s"] * 1000, "p99": s["layer_p99_s"] * 1000}}


def serve_robot(port: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    host = RobotHost(SimRobot(family="button", rate_hz=RATE_HZ), port=0, watchdog_s=0.2).start()
    port.put(host.port)
    stop.wait()
    host.stop()


def watchdog_reaction(deadline_s: float = 0.1, silences: int = 20) -> list[float]:
    robot = SimRobot(family="button", rate_hz=RATE_HZ)
    robot.reset(0)
    dog = Watchdog(robot, deadline_s)
    for _ in range(silences):
        n = len(dog.trips)
        robot.send(ACTION)
        dog.fed()
        while len(dog.trips) == n:
            time.sleep(0.01)
    dog.close()
    robot.close()
    return [t * 1000 for t in dog.trips]


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    figures = {"clock": episode(StillRobot(), seconds)}
    robot = SimRobot(family="button", rate_hz=RATE_HZ)
    figures["in-process"] = episode(robot, seconds)
    ctx = multiprocessing.get_context("spawn")
    port, stop = ctx.Queue(), ctx.Event()
    host = ctx.Process(target=serve_robot, args=(port, stop), daemon=True)
    host.start()
    try:
        figures["loopback"] = episode(RemoteRobot(f"ws://127.0.0.1:{port.get(timeout=60)}"), seconds)
    finally:
        stop.set()
        host.join(timeout=10)
    late = watchdog_reaction()
    for name, f in figures.items():
        print(f"{name:10s} tick error p50 {f['tick_error_ms']['p50']:.3f} p99 {f['tick_error_ms']['p99']:.3f} max "
              f"{f['tick_error_ms']['max']:.3f} ms, period error p99 {f['period_error_ms']['p99']:.3f} ms, overruns {f['overruns']}, layer {f['layer_ms']['mean']:.3f} ms "
              f"(p99 {f['layer_ms']['p99']:.3f})")
    print(f"watchdog: held {np.median(late):.1f} ms (median), {max(late):.1f} ms (max) after its 100 ms deadline")
    period_ms = 1000 / RATE_HZ
    loop = figures["loopback"]
    write_result("robot_tick_error", loop["tick_error_ms"]["p99"] / 2.0, 1.0, loop["tick_error_ms"]["p99"] <= 2.0,
                 what="p99 control-period error over loopback at 50 Hz / 2 ms", figures=figures)
    write_result("robot_layer_cost", loop["layer_ms"]["p99"] / period_ms, 0.05,
                 loop["layer_ms"]["p99"] / period_ms <= 0.05,
                 what="the safety layer's checks per step (p99) / the 20 ms period, over loopback")
    write_result("robot_watchdog", float(np.median(late)) / 100.0, None, None,
                 what="watchdog: median time from its 100 ms deadline to the hold / the deadline",
                 late_ms={"median": float(np.median(late)), "max": float(max(late))})


if __name__ == "__main__":
    main()
