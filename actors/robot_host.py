"""Robots over the network: a robot host serves one robot (a ``Robot`` driver, actors/robot.py) on
``ws://HOST:PORT``, and ``RemoteRobot`` is that robot on the rollout actor's side, behind the same safety layer.

Websocket with msgpack (``flywheel.wire``), as ``flywheel serve`` speaks to policies: numpy arrays travel as raw
bytes with no schema to compile (gRPC would need protobuf stubs for every camera layout), the same API-key header
and ``/healthz`` serve both, and a browser can open one. The client sends one request at a time, a map with
``op``, and gets one reply:

    {"op": "observe"}                    -> {"images": {camera: uint8 (H, W, 3)}, "state": float32 (P,),
                                             "age_s": seconds since the frame was captured, on the host's clock,
                                             "estopped": whether the robot's own e-stop is pressed,
                                             "watchdog_trips": how late after its deadline each hold came}
    {"op": "send", "action": float32 (A,)} -> {"ok": true}
    {"op": "hold"} / {"op": "estop"}       -> {"ok": true}
    {"op": "reset", "seed": int | None}    -> {"told": {"instruction": ...} or None (a person resets the scene)}
    {"op": "health"}                       -> {"action_dim", "sensors", "estopped", "watchdog_trips", "commands"}

A failure is a text message (what went wrong), then the host closes that connection. The first message a client
gets is the host's health map. One controller at a time: a second connection is refused (HTTP 409) while one is
open. The command watchdog runs here, on the robot's side: when no ``send`` arrives within ``watchdog_s`` (a slow
policy, a dead actor, a dropped network) the robot is held still. A connection that closes holds it at once.

Latency, jitter and drops can be injected (``NetworkFaults``), so tests exercise the real network path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http
import logging
import random
import threading
import time
from typing import Any

import numpy as np

from actors.robot import Operator, Robot, RobotFrame, Watchdog
from flywheel import wire
from flywheel.serve import handshake

logger = logging.getLogger(__name__)


class RobotHostError(ConnectionError):
    """The robot host cannot be reached, dropped the connection, timed out, or reported a failure. A rollout counts
    it as a fault: the episode in flight is discarded, nothing stored is lost."""


@dataclasses.dataclass
class NetworkFaults:
    """Injected on the host: each reply waits ``latency_s`` plus up to ``jitter_s`` more; after ``drop_after``
    requests the connection is dropped (once; None: never)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    drop_after: int | None = None


class RobotHost:
    """Serves ``robot`` on ``ws://host:port`` (module docstring). ``start`` listens in a thread of its own and
    returns (``port`` 0: a free one, then in ``port``); ``stop`` holds the robot and closes."""

    def __init__(self, robot: Robot, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 watchdog_s: float = 0.5, faults: NetworkFaults | None = None, sensors: tuple[str, ...] = ("overhead",)):
        self.robot, self.host, self.port, self.api_key = robot, host, int(port), api_key or None
        self.watchdog = Watchdog(robot, watchdog_s)
        self.faults = faults or NetworkFaults()
        self.sensors = tuple(sensors)
        self.requests = 0
        self.commands = 0
        self._busy = False  # a controller is connected
        self.operator = Operator()  # the people at the robot, through /operator
        # every call into the driver on one thread: drivers are rarely thread-safe, and a simulator's GL context
        # (MuJoCo's EGL) works only on the thread that made it current
        self._driver = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="robot-driver")
        self._taken: np.ndarray | None = None  # a person's takeover command, and until when it holds
        self._taken_until = 0.0
        self._last: dict[str, Any] | None = None  # the newest frame, for the people's view
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._failed: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "RobotHost":
        self._thread = threading.Thread(target=lambda: self._guard(asyncio.run, self._main()), name="robot-host",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the robot host did not start listening on {self.host}:{self.port} in {timeout_s:g} s")
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=10)
        self.watchdog.close()
        self._driver.submit(self.robot.hold).result(timeout=10)
        self._driver.shutdown(wait=True)

    def wait(self, poll_s: float = 0.5) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(poll_s)

    def __enter__(self) -> "RobotHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _guard(self, run, main) -> None:
        try:
            run(main)
        except BaseException as e:  # noqa: BLE001 (a port already taken: start() raises it in the caller)
            self._failed = e
            self._ready.set()

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        async with serve(self._handler, self.host, self.port, compression=None, max_size=None,
                         process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stopping.wait()

    def _process_request(self, connection, request):
        refused = handshake(connection, request, self.api_key, "this robot host")
        if refused is not None:
            return refused
        if self._busy and request.path != OPERATOR_PATH:
            return connection.respond(http.HTTPStatus.CONFLICT, "this robot already has a controller connected\n")
        return None

    def health(self) -> dict[str, Any]:
        return {"action_dim": int(self.robot.action_dim), "sensors": list(self.sensors),
                "estopped": bool(getattr(self.robot, "estopped", False)), "watchdog_trips": len(self.watchdog.trips),
                "commands": self.commands}

    async def _handler(self, ws) -> None:
        if ws.request.path == OPERATOR_PATH:
            return await self._operate(ws)
        from websockets.exceptions import ConnectionClosed

        self._busy = True
        loop = asyncio.get_running_loop()
        try:
            await ws.send(wire.packb(self.health()))
            while True:
                message = await ws.recv()
                self.requests += 1
                if self.faults.drop_after is not None and self.requests > self.faults.drop_after:
                    self.faults.drop_after = None
                    logger.warning("dropping the connection (injected)")
                    await ws.close(code=1001, reason="dropped (injected)")
                    return
                try:
                    # the driver's calls block (a camera read, a serial write): off the event loop
                    reply = await loop.run_in_executor(self._driver, self._answer, wire.unpackb(message))
                except Exception as e:  # noqa: BLE001 (the robot failed: say what, then close)
                    logger.exception("the robot failed")
                    await ws.send(f"the robot failed: {type(e).__name__}: {e}")
                    await ws.close(code=1011, reason="robot failure")
                    return
                delay = self.faults.latency_s + random.uniform(0.0, self.faults.jitter_s)
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(wire.packb(reply))
        except ConnectionClosed:
            pass
        finally:
            self._busy = False
            self.watchdog.disarm()
            await loop.run_in_executor(self._driver, self.robot.hold)  # no controller: hold still

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "observe":
            frame = self.robot.observe()
            self._last = {"images": frame.images, "state": np.asarray(frame.state, np.float32),
                          "estopped": bool(frame.estopped)}
            return {**self._last, "age_s": max(0.0, time.monotonic() - frame.stamp),
                    "watchdog_trips": [float(t) for t in self.watchdog.trips],
                    "verdict": self.operator.take_verdict(), "said": self.operator.take_words()}
        if op == "send":
            taken = self._taken if time.monotonic() < self._taken_until else None
            action = np.asarray(request["action"] if taken is None else taken, np.float32)
            self.robot.send(action)
            self.watchdog.fed()
            self.commands += 1
            return {"ok": True, **({"applied": action} if taken is not None else {})}
        if op in ("hold", "estop"):
            self.watchdog.disarm()
            getattr(self.robot, op)()
            return {"ok": True}
        if op == "reset":
            self.watchdog.disarm()
            self._taken = None
            self.operator.take_verdict()  # a verdict that came after the last episode ended is not this one's
            self.operator.take_words()
            told = self.robot.reset(request.get("seed"))
            if told is None:  # a person resets the scene: wait for them to say so
                timeout = float(request.get("timeout_s", 600.0))
                if not self.operator.wait_for_reset(timeout):
                    raise TimeoutError(f"no one said the scene was reset within {timeout:g} s: press 'scene is "
                                       f"reset' on the robot page")
                told = {}
            return {"told": told}
        if op == "health":
            return self.health()
        raise ValueError(f"unknown op {op!r}: observe, send, hold, estop, reset or health")


    async def _operate(self, ws) -> None:
        """The people's channel (``/operator``, beside the controller's): look, e-stop, say the scene is reset,
        judge the episode, take over, coach in words."""
        from websockets.exceptions import ConnectionClosed

        loop = asyncio.get_running_loop()
        try:
            await ws.send(wire.packb(self.health()))
            while True:
                request = wire.unpackb(await ws.recv())
                try:
                    # not on the driver's thread: an e-stop must not wait behind a reset that waits for this person
                    reply = await loop.run_in_executor(None, self._person, request)
                except Exception as e:  # noqa: BLE001
                    reply = {"error": f"{type(e).__name__}: {e}"}
                await ws.send(wire.packb(reply))
        except ConnectionClosed:
            pass

    def _person(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "look":
            return {**(self._last or {}), **self.health(), "controller": self._busy,
                    "taking_over": time.monotonic() < self._taken_until}
        if op == "estop":
            self.robot.estop()
        elif op == "scene_reset":
            self.operator.scene_reset()
        elif op == "judge":
            self.operator.judge(bool(request["success"]))
        elif op == "take":  # held while the person keeps sending (a key held down), for TAKEOVER_HOLD_S after
            self._taken = np.asarray(request["action"], np.float32).reshape(self.robot.action_dim)
            self._taken_until = time.monotonic() + TAKEOVER_HOLD_S
        elif op == "release":
            self._taken, self._taken_until = None, 0.0
        elif op == "say":
            self.operator.say(str(request["words"]), str(request.get("who") or ""))
        else:
            raise ValueError(f"unknown operator op {op!r}: look, estop, scene_reset, judge, take, release or say")
        return {"ok": True}


OPERATOR_PATH = "/operator"
TAKEOVER_HOLD_S = 0.3  # a takeover command lasts this long unless repeated: a browser's key repeat is ~30 ms


class RemoteRobot:
    """A robot served by a ``RobotHost``, as a ``Robot`` driver. Every reply has a deadline (``timeout_s``); a
    connection that drops, a deadline missed or a failure the host reports raise ``RobotHostError``."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 2.0, connect_timeout_s: float = 10.0,
                 reset_timeout_s: float = 600.0):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        self.url, self.timeout_s, self.reset_timeout_s = url, float(timeout_s), float(reset_timeout_s)
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._conn = connect(url, open_timeout=connect_timeout_s, additional_headers=headers, compression=None,
                                 max_size=None, proxy=None, ping_interval=None)
        except InvalidStatus as e:
            status = e.response.status_code
            why = {401: "refused the API key (HTTP 401): give the host's key",
                   409: "already has a controller connected (HTTP 409): one rollout actor per robot"}.get(
                status, f"refused the connection with HTTP {status}")
            raise RobotHostError(f"robot host {url} {why}") from e
        except (OSError, TimeoutError) as e:
            raise RobotHostError(f"robot host {url}: cannot connect ({type(e).__name__}: {e}): is the host running "
                                 f"(flywheel robot-host), and reachable?") from e
        told = self._receive("its health")
        self.action_dim, self.sensors = int(told["action_dim"]), tuple(told["sensors"])
        self.watchdog_trips: list[float] = []  # the host's watchdog's (actors/robot.py ReportedWatchdog)

    def _receive(self, what: str) -> Any:
        from websockets.exceptions import ConnectionClosed

        try:
            message = self._conn.recv(timeout=self.timeout_s)
        except TimeoutError as e:
            self._conn.close()
            raise RobotHostError(f"robot host {self.url}: no reply to {what} within {self.timeout_s:g} s "
                                 f"(env.options.timeout_s): the host hangs or the network stalls") from e
        except ConnectionClosed as e:
            raise RobotHostError(f"robot host {self.url}: the connection dropped while waiting for {what}") from e
        if isinstance(message, str):
            raise RobotHostError(f"robot host {self.url} reported: {message}")
        return wire.unpackb(message)

    def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        try:
            self._conn.send(wire.packb({"op": op, **fields}))
        except ConnectionClosed as e:
            raise RobotHostError(f"robot host {self.url}: the connection dropped sending {op!r}") from e
        return self._receive(f"{op!r}")

    def observe(self) -> RobotFrame:
        sent = time.monotonic()
        reply = self._call("observe")
        # the frame's capture on this machine's clock: its age at the host, and half the round trip before that
        now = time.monotonic()
        self.watchdog_trips = list(reply.get("watchdog_trips", ()))
        return RobotFrame(images=dict(reply["images"]), state=np.asarray(reply["state"], np.float32),
                          stamp=now - (now - sent) / 2 - float(reply["age_s"]), estopped=bool(reply.get("estopped")),
                          verdict=reply.get("verdict"), said=reply.get("said"))

    def send(self, action: np.ndarray) -> np.ndarray | None:
        """None, or the action a person at the robot applied instead (a takeover)."""
        applied = self._call("send", action=np.asarray(action, np.float32)).get("applied")
        return None if applied is None else np.asarray(applied, np.float32)

    def hold(self) -> None:
        self._call("hold")

    def estop(self) -> None:
        self._call("estop")

    def reset(self, seed: int | None) -> dict[str, Any] | None:
        """The host waits for a person where its robot has no scripted reset (up to ``reset_timeout_s``)."""
        saved, self.timeout_s = self.timeout_s, self.timeout_s + self.reset_timeout_s
        try:
            return self._call("reset", seed=None if seed is None else int(seed),
                              timeout_s=self.reset_timeout_s)["told"]
        finally:
            self.timeout_s = saved

    def health(self) -> dict[str, Any]:
        return self._call("health")

    def close(self) -> None:
        self._conn.close()


class OperatorChannel:
    """The people's side of a robot host (``/operator``): what the robot page calls. Any number may be open beside
    the controller; each call waits for its reply (``timeout_s``) and raises ``RobotHostError`` otherwise."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 5.0):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        self.url, self.timeout_s = url, float(timeout_s)
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._conn = connect(url.rstrip("/") + OPERATOR_PATH, open_timeout=timeout_s, additional_headers=headers,
                                 compression=None, max_size=None, proxy=None, ping_interval=None)
            self.health = wire.unpackb(self._conn.recv(timeout=timeout_s))
        except InvalidStatus as e:
            raise RobotHostError(f"robot host {url} refused the operator channel (HTTP "
                                 f"{e.response.status_code}): give its API key") from e
        except (OSError, TimeoutError) as e:
            raise RobotHostError(f"robot host {url}: cannot open the operator channel ({type(e).__name__}: {e})") from e
        self._lock = threading.Lock()  # the page's request handlers share one channel per robot

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            try:
                self._conn.send(wire.packb({"op": op, **fields}))
                reply = wire.unpackb(self._conn.recv(timeout=self.timeout_s))
            except (ConnectionClosed, TimeoutError) as e:
                raise RobotHostError(f"robot host {self.url}: the operator channel failed on {op!r} "
                                     f"({type(e).__name__})") from e
        if "error" in reply:
            raise RobotHostError(f"robot host {self.url}: {reply['error']}")
        return reply

    def look(self) -> dict[str, Any]:
        return self.call("look")

    def estop(self) -> None:
        self.call("estop")

    def scene_reset(self) -> None:
        self.call("scene_reset")

    def judge(self, success: bool) -> None:
        self.call("judge", success=bool(success))

    def take(self, action: np.ndarray) -> None:
        self.call("take", action=np.asarray(action, np.float32))

    def release(self) -> None:
        self.call("release")

    def say(self, words: str, who: str = "") -> None:
        """Words to the policy (verbal coaching: ``Operator.say``)."""
        self.call("say", words=str(words), who=str(who))

    def close(self) -> None:
        self._conn.close()
