"""Any LeRobot-supported arm as a ``Robot`` driver (actors/robot.py), so that it practises behind the safety layer.

LeRobot's ``Robot`` interface: ``observation_features`` ({name: shape tuple for a camera, float for a scalar}),
``action_features`` ({motor name: float}), ``connect()``, ``get_observation()`` -> {name: value or image},
``send_action({name: value})`` -> the action actually sent, ``disconnect()``. Its arms take joint position targets
("shoulder_pan.pos", ...) in their own units, and report the present positions under the same names.

This adapter maps flywheel's actions in [-1, 1] to each motor's range (``ranges``: {motor: (low, high)}) and the
present positions into the same [-1, 1] as the proprio state, in ``action_features``' order. A LeRobot arm has no
"hold" of its own: a position-controlled arm holds still when sent its present positions, which is what ``hold``
does. ``estop`` holds it and refuses every command until the next reset. With a ``home`` pose, ``reset`` drives
the arm there (a scripted reset); without one, a person resets the scene (``reset`` returns None).

LeRobot pins its own torch and numpy, so it does not share flywheel's environment: the host process that runs the
arm (``flywheel robot-host robot.driver=my_lab.arms:make``) imports it, and ``make`` returns
``LeRobotRobot(the_lerobot_robot, ranges, ...)``. Tests use a class shaped like LeRobot's ``Robot``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from actors.robot import RobotFrame


class LeRobotRobot:
    def __init__(self, robot: Any, ranges: dict[str, tuple[float, float]], cameras: dict[str, str] | None = None,
                 home: dict[str, float] | None = None, instruction: str = "", settle_s: float = 2.0):
        """``robot``: a LeRobot ``Robot`` (connected here if it is not). ``ranges``: every action feature's (low,
        high) in the robot's units. ``cameras``: flywheel sensor -> LeRobot camera name (default: the first camera
        feature as ``overhead``). ``home``: the pose a scripted reset drives to; ``settle_s``: how long it waits."""
        self.robot = robot
        self.motors = list(robot.action_features)
        missing = [m for m in self.motors if m not in ranges]
        if missing:
            raise ValueError(f"no range for the motors {missing}: give ranges={{motor: (low, high)}} for every one of "
                             f"the robot's action_features")
        self.low = np.array([ranges[m][0] for m in self.motors], np.float32)
        self.high = np.array([ranges[m][1] for m in self.motors], np.float32)
        images = [k for k, v in robot.observation_features.items() if isinstance(v, tuple)]
        self.cameras = cameras or ({"overhead": images[0]} if images else {})
        unknown = [c for c in self.cameras.values() if c not in robot.observation_features]
        if unknown:
            raise ValueError(f"cameras {unknown} are not among the robot's observation_features "
                             f"{sorted(robot.observation_features)}")
        self.home, self.instruction, self.settle_s = home, instruction, settle_s
        self.action_dim = len(self.motors)
        self.sensors = tuple(self.cameras)
        self.estopped = False
        self._present: np.ndarray | None = None
        if not getattr(robot, "is_connected", False):
            robot.connect()

    def _to_units(self, action: np.ndarray) -> dict[str, float]:
        a = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        return {m: float(v) for m, v in zip(self.motors, self.low + (a + 1.0) / 2.0 * (self.high - self.low))}

    def _from_units(self, values: np.ndarray) -> np.ndarray:
        return (2.0 * (values - self.low) / np.maximum(self.high - self.low, 1e-9) - 1.0).astype(np.float32)

    def observe(self) -> RobotFrame:
        obs = self.robot.get_observation()
        stamp = time.monotonic()
        present = np.array([float(obs[m]) for m in self.motors], np.float32)
        self._present = present
        images = {name: np.asarray(obs[key], np.uint8) for name, key in self.cameras.items()}
        return RobotFrame(images=images, state=self._from_units(present), stamp=stamp)

    def send(self, action: np.ndarray) -> None:
        if not self.estopped:
            self.robot.send_action(self._to_units(action))

    def hold(self) -> None:
        """Send the present positions: a position-controlled arm stays where it is."""
        if self._present is None:
            self.observe()
        self.robot.send_action({m: float(v) for m, v in zip(self.motors, self._present)})

    def estop(self) -> None:
        self.hold()
        self.estopped = True

    def reset(self, seed: int | None) -> dict[str, Any] | None:
        self.estopped = False
        if self.home is None:
            return None
        self.robot.send_action({m: float(self.home[m]) for m in self.motors})
        time.sleep(self.settle_s)
        return {"instruction": self.instruction}

    def close(self) -> None:
        if getattr(self.robot, "is_connected", True):
            self.robot.disconnect()
