"""A run on simulated robots that learns from people alone, through the robot page (issue 34).

    PYTHONPATH=. .venv/bin/python bench/robot_people.py [iterations] [episodes_per_iteration] [eval_episodes]
                                                                                       # default 8, 192, 200

Two simulated robots (the tabletop as a robot, family "any", the shipped base's tasks) behind robot hosts on
loopback; ``flywheel run env.name=robot detector=people eval.judge=detector`` drives them (filtered BC, the default
learner), and the robot page is open on them. No ground truth reaches the run: the robots judge nothing, and
the only verdicts are a scripted person's, given through the page's own HTTP API as a person's clicks would be:

- it watches both robots (the simulator stands in for its eyes) and presses "success" on the page the moment an
  episode's task is done; an episode it lets time out has failed (detector.name=people);
- in a quarter of the practice episodes still unfinished after 16 steps it takes over (the page's takeover, with
  the scripted expert's moves for its hands) and finishes the task, as rollout.corrections does in simulation. It
  keeps its hands off evaluation episodes (it knows their seeds; the page does not mark them yet). It looks and
  acts every 2 ms and the robots run at 100 Hz, so each of its commands is one or two steps old: at 1 kHz (a first
  try) its commands were four or more steps stale, its corrections overshot, and cloning them made the policy
  worse (0.46 -> 0.265).

The figure: held-out success of the base and of the run's last version on the same seeds, as the person judged
them, with the paired seeds that flipped.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import urllib.request
from math import comb
from pathlib import Path

import numpy as np

from actors.expert import expert_action
from actors.robot_host import OperatorChannel, RobotHost
from actors.sim_robot import SimRobot
from actors.tabletop import split_seed
from bench.common import write_result
from flywheel.config import load_config
from flywheel.page import PageServer, make_app
from flywheel.run import run
from flywheel.store import EpisodeStore

CORRECT_SHARE, CORRECT_AFTER = 0.25, 16


def post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


class ScriptedPerson(threading.Thread):
    """Watches the robots and acts through the page's HTTP API (module docstring)."""

    def __init__(self, page_url: str, robots: dict[str, SimRobot], eval_seeds: set[int]):
        super().__init__(daemon=True)
        self.page, self.robots, self.eval_seeds = page_url, robots, eval_seeds
        self.stop = threading.Event()
        self.rng = np.random.default_rng(0)
        self.counts = {"judged_success": 0, "took_over": 0}
        self.taken: set = set()  # the episodes it took over

    def run(self) -> None:
        seen = {name: (None, False, False) for name in self.robots}  # episode -> (seed, judged, correcting)
        while not self.stop.wait(0.002):
            for name, robot in self.robots.items():
                if robot.resets == 0:  # nothing set up yet
                    continue
                episode = (name, robot.resets, robot.seed)
                if seen[name][0] != episode:
                    correcting = robot.seed not in self.eval_seeds and self.rng.random() < CORRECT_SHARE
                    seen[name] = (episode, False, correcting)
                _, judged, correcting = seen[name]
                if judged or robot.estopped:
                    continue
                if robot.success():
                    post(f"{self.page}/api/robots/{name}/judge", {"success": True})
                    self.counts["judged_success"] += 1
                    seen[name] = (episode, True, correcting)
                elif correcting and len(robot.sent) - robot.sent_at_reset >= CORRECT_AFTER:
                    if episode not in self.taken:
                        self.taken.add(episode)
                        self.counts["took_over"] += 1
                    action = expert_action(robot.env, self.rng, 0.0)
                    post(f"{self.page}/api/robots/{name}/take", {"action": [float(a) for a in action]})


def sign_test(before: str, after: str) -> tuple[int, int, float]:
    up = sum(a == "0" and b == "1" for a, b in zip(before, after))
    down = sum(a == "1" and b == "0" for a, b in zip(before, after))
    n = up + down
    return up, down, min(1.0, 2 * sum(comb(n, i) for i in range(min(up, down) + 1)) / 2 ** n) if n else 1.0


def main() -> None:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    per_iteration = int(sys.argv[2]) if len(sys.argv) > 2 else 192
    robots = {f"arm{i}": SimRobot(family="any", rate_hz=None) for i in range(2)}
    hosts = {name: RobotHost(r, port=0, watchdog_s=2.0).start() for name, r in robots.items()}
    run_dir = Path(tempfile.mkdtemp(prefix="robot_people_")) / "run"
    eval_episodes = int(sys.argv[3]) if len(sys.argv) > 3 else 200
    cfg = load_config("run", [
        f"run_dir={run_dir}", "rollout.use_ray=false", "wandb.mode=disabled", "env.name=robot", "env.max_steps=40",
        "env.sensors=[overhead]",
        "env.options.robot=[" + ",".join(f"'{h.url}'" for h in hosts.values()) + "]",
        "env.options.safety={rate_hz: 100, stale_s: 5.0}", "detector.name=people", "eval.judge=detector",
        "rollout.num_workers=2", f"rollout.episodes_per_iteration={per_iteration}", f"eval.episodes={eval_episodes}",
        "gate.episodes=0", f"budget.iterations={iterations}", "budget.minutes=120", f"eval.every={iterations}"])
    eval_seeds = {split_seed("eval", i) for i in range(eval_episodes)}
    person: ScriptedPerson | None = None
    page: PageServer | None = None

    def open_page() -> None:
        nonlocal person, page
        while not (run_dir / "episodes").is_dir():
            time.sleep(0.05)
        page = PageServer(make_app(EpisodeStore(run_dir / "episodes"),
                                   {name: OperatorChannel(h.url) for name, h in hosts.items()}), port=0).start()
        person = ScriptedPerson(page.url, robots, eval_seeds)
        person.start()

    opener = threading.Thread(target=open_page, daemon=True)
    opener.start()
    started = time.time()
    try:
        summary = run(cfg, say=print)
    finally:
        if person is not None:
            person.stop.set()
        if page is not None:
            page.stop()
        for name, host in hosts.items():
            host.stop()
            robots[name].close()
    state = json.loads((run_dir / "run_state.json").read_text())["loop"]["evaluations"]
    before, after = state[0]["outcomes"], summary["final_outcomes"]
    up, down, p = sign_test(before, after)
    gain = summary["final_success"] - summary["initial_success"]
    print(f"held-out success judged by the person: {summary['initial_success']:.3f} -> {summary['final_success']:.3f} "
          f"({up} seeds up, {down} down, sign test p = {p:.4f}); person: {person.counts if person else {}}")
    write_result("robot_people", gain, None, None, args=[str(iterations), str(per_iteration), str(eval_episodes)],
                 what="held-out success gain on simulated robots, from a scripted person's verdicts and corrections "
                      "through the robot page alone",
                 before=summary["initial_success"], after=summary["final_success"], up=up, down=down, p=p,
                 person=person.counts if person else {}, wall_s=time.time() - started)


if __name__ == "__main__":
    main()
