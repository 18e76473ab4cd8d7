"""The robot page (flywheel/page.py) over a real socket: the robots live, the label queue, human labels into the
store with who and when, e-stop and takeover through the robots' hosts; and in a real browser (headless Chromium
driven through its DevTools protocol): keys label episodes, arrows take over a robot, a button e-stops it."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from actors.robot import RobotEnv, SafetySettings
from actors.robot_host import OperatorChannel, RemoteRobot, RobotHost
from actors.rollout import run_episodes
from actors.sim_robot import SimRobot
from flywheel.contracts import Label
from flywheel.page import PageServer, in_audit_sample, label_queue, make_app
from flywheel.store import EpisodeStore
from flywheel.vla.bundle import small_vla

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture
def robot_page(tmp_path):
    """A store of six practice episodes the detector judged, a simulated robot behind its host (driven by a
    controller, as a rollout actor drives it), and the page for both on loopback."""
    store = EpisodeStore(tmp_path / "episodes")
    bundle = small_vla("base")
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    episodes = run_episodes(list(range(100, 106)), "train", policy, policy_version=1, family="button", max_steps=8)
    for ep, score in zip(episodes, (0.9, 0.52, 0.1, 0.45, 0.7, 0.02)):
        store.add(ep)
        store.add_labels([(ep.id, Label("detector", score > 0.5, "detector-1", score, 0.5))])
    robot = SimRobot(family="button", rate_hz=None)
    host = RobotHost(robot, port=0).start()
    env = RobotEnv(RemoteRobot(host.url), SafetySettings(rate_hz=100.0), max_steps=10_000)
    env.reset(seed=1)
    channel = OperatorChannel(host.url)
    server = PageServer(make_app(store, {"arm": channel}), port=0).start()
    yield server, store, episodes, robot, env
    server.stop()
    channel.close()
    env.close()
    host.stop()
    robot.close()


def get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("content-type"), r.read()


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_page_serves_the_robots_the_queue_and_takes_labels_and_commands(robot_page):
    server, store, episodes, robot, env = robot_page
    status, kind, html = get(server.url + "/")
    assert status == 200 and b"Episodes to judge" in html
    (arm,) = json.loads(get(server.url + "/api/robots")[2])
    assert arm["up"] and arm["controller"] and len(arm["state"]) == 3
    status, kind, image = get(server.url + "/api/robots/arm/frame.png")
    assert kind == "image/png" and image[:8] == b"\x89PNG\r\n\x1a\n"

    queue = json.loads(get(server.url + "/api/queue")[2])
    audit = [r["audit"] for r in queue]
    assert len(queue) == 6 and audit == sorted(audit, reverse=True)  # the audit sample first
    rest = [r["margin"] for r in queue if not r["audit"]]
    assert rest == sorted(rest)  # then the detector's least sure
    assert all(r["audit"] == in_audit_sample(r["id"]) for r in queue)
    assert get(server.url + f"/api/episodes/{queue[0]['id']}/clip.gif")[2][:4] == b"GIF8"

    assert post(server.url + "/api/labels", {"episode_id": queue[0]["id"], "success": True})[0] == 422  # who?
    assert post(server.url + "/api/labels", {"episode_id": "ab" * 16, "success": True, "who": "ana"})[0] == 404
    before = time.time()
    status, said = post(server.url + "/api/labels", {"episode_id": queue[0]["id"], "success": True, "who": "ana"})
    assert status == 200
    (human,) = [lab for lab in store.labels()[queue[0]["id"]] if lab.source == "human"]
    assert human.success and human.version == "ana" and human.created >= before
    assert queue[0]["id"] not in [r["id"] for r in json.loads(get(server.url + "/api/queue")[2])]

    assert post(server.url + "/api/robots/arm/take", {"action": [0.0, -1.0, -1.0]})[0] == 200
    _, _, _, _, info = env.step(np.array([1.0, 0.0, -1.0], np.float32))
    assert info["intervention"] and robot.sent[-1].tolist() == [0.0, -1.0, -1.0]
    post(server.url + "/api/robots/arm/release", {})
    assert post(server.url + "/api/robots/arm/estop", {})[0] == 200
    _, _, _, trunc, info = env.step(np.array([1.0, 0.0, -1.0], np.float32))
    assert trunc and info["cut_short"] == "estop" and robot.estopped
    assert post(server.url + "/api/robots/nope/estop", {})[0] == 404


def test_the_page_needs_its_token_from_another_address(tmp_path):
    from fastapi.testclient import TestClient

    app = make_app(EpisodeStore(tmp_path / "e"), {}, token="s3cret")
    far = TestClient(app, client=("10.1.2.3", 5000))
    assert far.get("/api/queue").status_code == 401
    assert far.get("/api/queue?token=s3cret").status_code == 200
    assert far.get("/api/queue", headers={"X-Flywheel-Token": "s3cret"}).status_code == 200
    assert TestClient(app, client=("127.0.0.1", 5000)).get("/api/queue").status_code == 200
    with pytest.raises(ValueError, match="without a token"):
        PageServer(app, host="0.0.0.0", port=0)


class Chromium:
    """Headless Chromium driven through its DevTools protocol (what Puppeteer and Playwright speak): real key and
    mouse events into a real page."""

    KEYS = {"1": ("Digit1", 49), "2": ("Digit2", 50), "ArrowLeft": ("ArrowLeft", 37), "Tab": ("Tab", 9),
            "x": ("KeyX", 88), "Enter": ("Enter", 13)}

    def __init__(self, profile):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        self.ws = connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        self.n = 0

    def send(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.n:
                assert "error" not in reply, reply
                return reply["result"]

    def eval(self, js):
        return self.send("Runtime.evaluate", expression=js, returnByValue=True)["result"].get("value")

    def wait(self, js, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not self.eval(js):
            assert time.monotonic() < deadline, f"waited {timeout} s for {js}"
            time.sleep(0.05)

    def key(self, key, kind="both"):
        code, vk = self.KEYS[key]
        text = {"text": key} if len(key) == 1 else {"text": "\r"} if key == "Enter" else {}
        for t in (["keyDown", "keyUp"] if kind == "both" else [kind]):
            self.send("Input.dispatchKeyEvent", type=t, key=key, code=code, windowsVirtualKeyCode=vk,
                      **(text if t == "keyDown" else {}))

    def click(self, selector):
        x, y = self.eval(f"(() => {{ const e = document.querySelector('{selector}'); e.scrollIntoView();"
                         f" const r = e.getBoundingClientRect();"
                         f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for t in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=t, x=x, y=y, button="left", clickCount=1)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_in_a_browser_a_person_labels_takes_over_coaches_and_e_stops(robot_page, tmp_path):
    if BROWSER is None:
        if os.environ.get("FLYWHEEL_REQUIRE_BROWSER"):
            pytest.fail("no Chromium to drive the robot page: apt-get install chromium (.ci/run does)")
        pytest.skip("no Chromium here (apt-get install chromium); CI installs it and runs this check")
    server, store, episodes, robot, env = robot_page
    browser = Chromium(tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait("document.body && document.body.dataset.ready === '1' && !!document.body.dataset.episode")
        browser.click("#who")
        browser.send("Input.insertText", text="ana")
        browser.key("Tab")  # the name is kept (its change event) as focus leaves the field
        judged = []
        for key, n in (("1", 1), ("2", 2)):
            judged.append(browser.eval("document.body.dataset.episode"))
            browser.key(key)
            browser.wait(f"document.body.dataset.labelled === '{n}' && document.body.dataset.episode !== "
                         f"'{judged[-1]}'")
        humans = {eid: [lab for lab in labs if lab.source == "human"] for eid, labs in store.labels().items()}
        assert [(humans[e][0].success, humans[e][0].version) for e in judged] == [(True, "ana"), (False, "ana")]

        browser.key("ArrowLeft", "keyDown")  # held: the page sends the command every 100 ms
        time.sleep(0.4)
        taken = [env.step(np.array([1.0, 0.0, -1.0], np.float32))[4].get("intervention", False) for _ in range(5)]
        browser.key("ArrowLeft", "keyUp")
        assert any(taken) and [-1.0, 0.0, -1.0] in [a.tolist() for a in robot.sent]

        # coaching: words typed in the robot's box reach its policy's next step, with who said them; an "x" typed
        # there is a letter, not the e-stop key
        browser.click("#robot-arm .words")
        browser.send("Input.insertText", text="stow the bo")
        browser.key("x")
        browser.key("Enter")
        browser.wait("document.body.dataset.said === 'stow the box'")
        said = env.step(np.array([0.0, 0.0, -1.0], np.float32))[4].get("said")
        assert said["words"] == "stow the box" and said["who"] == "ana" and not robot.estopped

        browser.click("#robot-arm .estop")
        deadline = time.monotonic() + 10
        while not robot.estopped and time.monotonic() < deadline:
            time.sleep(0.05)
        assert robot.estopped
        _, _, _, trunc, info = env.step(np.array([1.0, 0.0, -1.0], np.float32))
        assert trunc and info["cut_short"] == "estop"
    finally:
        browser.close()


def test_flywheel_page_serves_a_runs_store_until_ctrl_c(tmp_path):
    import re
    import signal
    import sys

    (tmp_path / "run" / "episodes").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "page", f"run_dir={tmp_path / 'run'}",
                             "port=0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line
        assert json.loads(get(url.group(0) + "/api/queue")[2]) == []
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
