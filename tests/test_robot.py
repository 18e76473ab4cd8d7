"""The safety layer every robot passes through (actors/robot.py), on the tabletop as a simulated robot
(actors/sim_robot.py): each event injected, and the robot side held still where it must be."""

import threading
import time

import numpy as np
import pytest

from actors.robot import (CAMERA_FROZEN, CAMERA_STALE, CLAMP, DELTA_LIMIT, ESTOP, NAN_ACTION, NAN_OBSERVATION,
                          OVERRUN, WATCHDOG, WORKSPACE, Operator, RobotEnv, SafetySettings)
from actors.sim_robot import RobotDied, SimRobot

RIGHT = np.array([1.0, 0.0, -1.0], np.float32)


def make(rate_hz=None, operator=None, scripted_reset=True, **safety):
    robot = SimRobot(family="button", rate_hz=rate_hz, scripted_reset=scripted_reset)
    env = RobotEnv(robot, SafetySettings(**{"rate_hz": 200.0, **safety}), operator=operator, max_steps=50)
    return robot, env


def run_until_cut(env, action=RIGHT, steps=20):
    for _ in range(steps):
        obs, _, term, trunc, info = env.step(action)
        if term or trunc:
            return info
    raise AssertionError("the episode was never cut short")


def test_a_normal_episode_runs_at_its_rate_and_records_no_event():
    robot, env = make()
    obs, info = env.reset(seed=3)
    assert info["instruction"] and info["success"] is None and obs["image"].shape == (64, 64, 3)
    start = robot.effector()
    for _ in range(5):
        obs, _, term, trunc, info = env.step(RIGHT * 0.5)
    assert not term and not trunc and info["success"] is None
    assert robot.effector()[0] > start[0]  # it moved as told
    # nothing corrected or cut (a loaded machine may overrun a tick: the overrun test covers that)
    assert set(info["safety"]["counts"]) <= {OVERRUN} and "cut_short" not in info
    env.close()


def test_a_nan_action_holds_the_robot_and_cuts_the_episode_short():
    robot, env = make()
    env.reset(seed=1)
    env.step(RIGHT)
    sent = len(robot.sent)
    _, _, term, trunc, info = env.step(np.array([np.nan, 0, 0], np.float32))
    assert trunc and not term and info["cut_short"] == NAN_ACTION
    assert len(robot.sent) == sent  # the NaN never reached the robot
    assert robot.holds >= 1 and not robot.command[:2].any()
    assert info["safety"]["counts"][NAN_ACTION] == 1
    env.close()


def test_the_clamp_the_step_limit_and_the_workspace_box_change_what_is_sent():
    robot, env = make(max_delta=0.25)
    env.reset(seed=2)
    _, _, _, _, info = env.step(np.array([5.0, 0.0, -1.0], np.float32))
    # clamped to 1, then limited to 0.25 from the start (no previous command: only the clamp applies)
    assert robot.sent[-1][0] == pytest.approx(1.0) and info["safety"]["counts"][CLAMP] == 1
    _, _, _, _, info = env.step(np.array([-1.0, 0.0, -1.0], np.float32))
    assert robot.sent[-1][0] == pytest.approx(0.75) and info["safety"]["counts"][DELTA_LIMIT] == 1

    robot, env = make(workspace_low=(0.2, 0.2), workspace_high=(0.4, 0.8))
    env.reset(seed=2)
    robot.env.effector[:] = (0.4, 0.5)  # at the box's right edge
    env.step(np.array([1.0, 0.5, -1.0], np.float32))  # the layer sees the effector where the last frame showed it
    _, _, _, _, info = env.step(np.array([1.0, 0.5, -1.0], np.float32))
    assert robot.sent[-1][0] == 0.0 and robot.sent[-1][1] == 0.5  # outward along x stopped, y left alone
    assert info["safety"]["counts"][WORKSPACE] >= 1
    env.step(np.array([-1.0, 0.0, -1.0], np.float32))
    assert robot.sent[-1][0] == -1.0  # back into the box is allowed
    env.close()


@pytest.mark.parametrize("fault, event", [("freeze_camera", CAMERA_FROZEN), ("stale_camera", CAMERA_STALE),
                                          ("nan_state", NAN_OBSERVATION)])
def test_a_camera_or_state_fault_holds_the_robot_and_cuts_the_episode_short(fault, event):
    robot, env = make(freeze_frames=3, stale_s=0.02)
    env.reset(seed=4)
    env.step(RIGHT)
    robot.inject(fault, after=1)
    info = run_until_cut(env)
    assert info["cut_short"] == event and info["safety"]["counts"][event] == 1
    assert robot.holds >= 1 and not robot.command[:2].any()
    assert np.isfinite(env._observation(robot.observe())["proprio"]).all()  # what is recorded stays finite
    env.close()


def test_estop_from_the_operator_stops_the_robot_and_the_next_reset_releases_it():
    operator = Operator()
    robot, env = make(operator=operator)
    env.reset(seed=5)
    env.step(RIGHT)
    operator.press_estop()
    _, _, _, trunc, info = env.step(RIGHT)
    assert trunc and info["cut_short"] == ESTOP and robot.estopped
    sent = len(robot.sent)
    robot.send(RIGHT)  # an e-stopped robot takes no command
    assert len(robot.sent) == sent
    operator.release_estop()
    env.reset(seed=6)
    assert not robot.estopped
    env.close()


def test_a_robot_without_a_scripted_reset_waits_for_a_person():
    operator = Operator()
    robot, env = make(operator=operator, scripted_reset=False, reset_timeout_s=0.05)
    with pytest.raises(TimeoutError, match="scene is reset"):
        env.reset(seed=1)
    threading.Timer(0.05, operator.scene_reset).start()
    env.s = SafetySettings(rate_hz=200.0, reset_timeout_s=5.0)
    obs, info = env.reset(seed=1)
    assert obs["proprio"].shape == (3,)
    env.close()


def test_a_person_s_verdict_ends_the_episode_and_is_its_success():
    operator = Operator()
    robot, env = make(operator=operator)
    env.reset(seed=7)
    env.step(RIGHT)
    operator.judge(True)
    _, reward, term, _, info = env.step(RIGHT)
    assert term and info["success"] is True and reward == 1.0
    env.close()


def test_a_late_step_is_an_overrun_and_the_clock_restarts():
    robot, env = make(**{"rate_hz": 20.0})
    env.reset(seed=8)
    env.step(RIGHT)
    time.sleep(0.25)  # five periods without a step: the policy was slow
    _, _, _, _, info = env.step(RIGHT)
    assert info["safety"]["counts"][OVERRUN] == 1
    _, _, _, _, info = env.step(RIGHT)
    assert info["safety"]["counts"][OVERRUN] == 1  # back on time
    env.close()


def test_the_watchdog_holds_a_robot_whose_commands_stop():
    robot, env = make(rate_hz=100.0, watchdog_s=0.05)  # the robot's own clock keeps applying the last command
    env.reset(seed=9)
    robot.env.effector[:] = (0.3, 0.5)
    env.step(np.array([0.3, 0.0, -1.0], np.float32))
    deadline = time.monotonic() + 5.0
    while not env.watchdog.trips and time.monotonic() < deadline:
        time.sleep(0.01)
    assert env.watchdog.trips, "the watchdog never held the robot"
    held_at = robot.effector()
    time.sleep(0.1)  # ten of the robot's ticks
    assert np.allclose(robot.effector(), held_at)  # it held still
    _, _, _, _, info = env.step(np.array([0.0, 0.0, -1.0], np.float32))
    assert info["safety"]["counts"][WATCHDOG] == 1
    assert env.safety_record()["watchdog_late_s"]  # how long after its deadline it held: in the episode's record
    env.close()


def test_a_robot_that_dies_raises_for_the_rollout_to_count_as_a_fault():
    robot, env = make()
    env.reset(seed=1)
    robot.inject("die", after=1)
    with pytest.raises(RobotDied):
        for _ in range(3):
            env.step(RIGHT)
    env.close()


def test_a_robot_option_the_plug_in_lacks_or_a_host_that_is_not_there_is_a_config_error(monkeypatch):
    from actors.lerobot_robot import LeRobotRobot
    from flywheel import plugins
    from flywheel.config import ConfigError
    from flywheel.parts import check_env

    monkeypatch.setitem(plugins.REGISTRY["robot"], "lerobot_shaped", lambda: LeRobotRobot(
        LeRobotShapedArm(), ranges={"shoulder.pos": (-90, 90), "elbow.pos": (-90, 90)}))
    with pytest.raises(ConfigError, match="robott"):
        check_env({"name": "robot", "options": {"robott": "sim"}})
    with pytest.raises(ConfigError, match="cannot connect"):
        check_env({"name": "robot", "options": {"robot": "ws://127.0.0.1:9"}})
    with pytest.raises(ConfigError, match="rate_hz"):
        check_env({"name": "robot", "options": {"safety": {"rate_hz": 0}}})
    with pytest.raises(ConfigError, match=r"env.sensors=\['overhead'\]"):  # the robot has no wrist camera
        check_env({"name": "robot", "sensors": ["overhead", "wrist"], "options": {"robot": "lerobot_shaped"}})


def test_env_options_take_new_keys_from_the_command_line():
    from flywheel.config import load_config

    cfg = load_config("run", ["env.name=robot", "env.options.robot=ws://127.0.0.1:8780",
                              "env.options.safety.rate_hz=20"])
    assert cfg.env.options == {"robot": "ws://127.0.0.1:8780", "safety": {"rate_hz": 20}}


class LeRobotShapedArm:
    """A class shaped like LeRobot's ``Robot`` (LeRobot itself cannot share this environment): two position-
    controlled joints that move a tenth of the way to their targets per observation, and a camera."""

    observation_features = {"shoulder.pos": float, "elbow.pos": float, "front": (32, 32, 3)}
    action_features = {"shoulder.pos": float, "elbow.pos": float}

    def __init__(self):
        self.is_connected = False
        self.position = np.array([10.0, -20.0])
        self.target = self.position.copy()
        self.sent: list[dict] = []

    def connect(self):
        self.is_connected = True

    def get_observation(self):
        self.position += 0.1 * (self.target - self.position)
        image = np.full((32, 32, 3), int(self.position[0]) % 256, np.uint8)
        image[0, 0, 0] = len(self.sent) % 256
        return {"shoulder.pos": self.position[0], "elbow.pos": self.position[1], "front": image}

    def send_action(self, action):
        self.sent.append(dict(action))
        self.target = np.array([action["shoulder.pos"], action["elbow.pos"]])
        return action

    def disconnect(self):
        self.is_connected = False


def test_a_lerobot_shaped_arm_practises_behind_the_safety_layer():
    from actors.lerobot_robot import LeRobotRobot

    arm = LeRobotShapedArm()
    with pytest.raises(ValueError, match="elbow.pos"):
        LeRobotRobot(arm, ranges={"shoulder.pos": (-90, 90)})
    driver = LeRobotRobot(arm, ranges={"shoulder.pos": (-90, 90), "elbow.pos": (-90, 90)},
                          home={"shoulder.pos": 0.0, "elbow.pos": 0.0}, instruction="wave", settle_s=0.0)
    assert arm.is_connected and driver.cameras == {"overhead": "front"}
    env = RobotEnv(driver, SafetySettings(rate_hz=200.0), max_steps=20)
    obs, info = env.reset(seed=0)
    assert info["instruction"] == "wave" and arm.sent[-1] == {"shoulder.pos": 0.0, "elbow.pos": 0.0}
    assert obs["image"].shape == (32, 32, 3) and obs["proprio"].shape == (2,)
    env.step(np.array([0.5, -1.0], np.float32))
    assert arm.sent[-1] == {"shoulder.pos": 45.0, "elbow.pos": -90.0}  # [-1, 1] onto each joint's range
    _, _, _, trunc, info = env.step(np.array([np.inf, 0.0], np.float32))
    assert trunc and info["cut_short"] == "nan_action"
    present = {"shoulder.pos": float(arm.position[0]), "elbow.pos": float(arm.position[1])}
    assert arm.sent[-1] == pytest.approx(present)  # held: sent where it is
    env.close()
    assert not arm.is_connected


def test_the_people_judge_what_they_called_a_success_and_fail_the_rest():
    from flywheel.contracts import Episode, Label
    from flywheel.detectors import PeopleJudge

    def episode(ground_truth=None, labels=()):
        return Episode(id="e", task="t", instruction="i", env_id="robot", seed=0, split="train", policy_version=0,
                       observations={"proprio": np.zeros((2, 3), np.float32)}, actions=np.zeros((1, 3), np.float32),
                       ground_truth=ground_truth, labels=list(labels))

    live = episode({"success": True})  # pressed "success" on the page while it ran
    later = episode(labels=[Label("detector", False, "detector-1", 0.2, 0.5), Label("human", True, "ana")])
    unjudged = episode(labels=[Label("detector", True, "detector-1", 0.9, 0.5)])  # the detector's say is not theirs
    assert PeopleJudge().score([live, later, unjudged]).tolist() == [1.0, 1.0, 0.0]
