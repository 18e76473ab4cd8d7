"""``flywheel serve``: any flywheel policy over the network, in openpi's websocket protocol.

A client of openpi's (``openpi_client.websocket_client_policy.WebsocketClientPolicy``), or flywheel's own
``actors.remote_policy.RemotePolicy``, connects to ``ws://HOST:PORT`` and:

1. receives the server's metadata first, one msgpack map (``metadata`` below: chunk, action_dim, sensors, the image
   shape expected, the policy's name and version, the observation keys);
2. sends one observation at a time, a msgpack map with numpy arrays as ``flywheel.wire`` encodes them, and gets back
   a map with the actions for it, in order. A reply is a binary message; a text message is an error, sent just before
   the server closes that connection (a bad observation: what is wrong, naming the key, close code 1007; a failure
   inside the policy: its traceback, close code 1011). Other connections are not affected.

The observation, unbatched, as openpi's clients send one:

- ``observation/image``  uint8 (H, W, channels): the policy's sensors' images stacked on the channels as
  ``flywheel.contracts.sensor_inputs`` stacks them (the overhead camera alone: its RGB frame)
- ``observation/state``  float (P,): the proprioception ``sensor_inputs`` gives (end-effector x, y and gripper for
  the tabletop; touch appended where the policy reads it)
- ``prompt``             str: the instruction
- ``noise``              float32 ``noise_shape``, optional: the flow's starting noise (C, the model's action width,
  which for a π0 is its padded 32 rather than the robot's), used instead of a draw (a DSRL actor
  steers the policy through it). openpi's own server does not read such a field (its ``Policy.infer`` takes noise
  only as an argument in its process); this is flywheel's addition.

The reply: ``actions`` float32 (C, A) in [-1, 1], ``policy_timing`` {``infer_ms``: the policy's call} and
``server_timing`` {``infer_ms``, and from the second request on ``prev_total_ms``: the previous request's time from
its arrival to its reply's sending}.

The policy acts as in evaluation: not exploring, its flow from ``eval.noise`` times its noise (0, the default:
from the mean, one deterministic chunk per observation). Requests are served one at a time, in order.

Plain HTTP ``GET /healthz`` on the same port answers 200. With an API key (``--api-key``, ``serve.api_key=`` or the
``FLYWHEEL_API_KEY`` environment variable) a websocket client must send the header ``Authorization: Api-Key <key>``
(what openpi's client sends when given ``api_key``), or is refused with HTTP 401. The server listens on 127.0.0.1
unless told otherwise (``--host 0.0.0.0``: every interface; give it a key).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import http
import inspect
import logging
import threading
import time
import traceback
from typing import Any

import numpy as np

from flywheel import wire
from flywheel.contracts import Policy, PolicyBundle, image_channels

logger = logging.getLogger(__name__)

IMAGE, STATE, PROMPT, NOISE = "observation/image", "observation/state", "prompt", "noise"
API_KEY_ENV = "FLYWHEEL_API_KEY"
CLOSE_INVALID_DATA, CLOSE_INTERNAL_ERROR = 1007, 1011  # RFC 6455 close codes


class ObservationError(ValueError):
    """An observation the policy cannot be given: the message names the key and what was expected."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flywheel")
    except PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass
class ServedPolicy:
    """A policy acting as in evaluation, with what the server checks observations against and tells its clients."""

    policy: Policy
    name: str = ""
    checkpoint: str = ""
    image_shape: tuple[int, int, int] | None = None  # None where the policy does not say
    state_dim: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.policy.explore = False
        self.sensors = tuple(getattr(self.policy, "sensors", ("overhead",)))
        self.chunk, self.action_dim = int(self.policy.chunk), int(self.policy.action_dim)
        self.channels = image_channels(self.sensors)
        flow = getattr(getattr(self.policy, "model", None), "action_head", "flow") == "flow"  # tokens start from none
        self.takes_noise = flow and _accepts_noise(self.policy)
        # the sampler's noise: the model's own action width, which a π0 pads past the robot's (32 against 7)
        self.noise_shape = tuple(getattr(getattr(self.policy, "model", None), "noise_shape", (self.chunk,
                                                                                                self.action_dim)))
        self._lock = threading.Lock()

    def metadata(self) -> dict[str, Any]:
        """What the server sends every client first."""
        image = list(self.image_shape) if self.image_shape else [None, None, self.channels]
        return {
            "server": "flywheel", "flywheel_version": _version(), "policy": self.name, "checkpoint": self.checkpoint,
            "policy_version": int(self.meta.get("version", 0)), "description": str(self.meta.get("description", "")),
            "chunk": self.chunk, "action_horizon": self.chunk, "action_dim": self.action_dim,
            "sensors": list(self.sensors), "image_shape": image, "state_dim": self.state_dim,
            "eval_noise": getattr(self.policy, "eval_noise", None), "takes_noise": self.takes_noise,
            "noise_shape": list(self.noise_shape),
            "observation": {
                IMAGE: f"uint8 {_shape_text(image)}: the images of sensors {list(self.sensors)} stacked on the "
                       f"channels (flywheel.contracts.sensor_inputs)",
                STATE: f"float32 ({self.state_dim if self.state_dim else 'P'},): proprioception",
                PROMPT: "str: the instruction",
                NOISE: f"float32 {self.noise_shape}, optional: the flow's starting noise"
                       + ("" if self.takes_noise else " (this policy cannot take one)"),
            },
            "reply": {"actions": f"float32 ({self.chunk}, {self.action_dim}) in [-1, 1]",
                      "policy_timing": "{infer_ms}", "server_timing": "{infer_ms, prev_total_ms}"},
        }

    def read(self, obs: Any) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None]:
        """An observation -> (image uint8 (1, H, W, channels), state float32 (1, P), prompt, noise float32 (1, C, A) or
        None), or an ObservationError that names the key at fault."""
        if not isinstance(obs, dict):
            raise ObservationError(f"an observation is a map of named fields ({IMAGE}, {STATE}, {PROMPT}), not a "
                                   f"{type(obs).__name__}")
        missing = [k for k in (IMAGE, STATE, PROMPT) if k not in obs]
        if missing:
            raise ObservationError(f"the observation lacks {', '.join(map(repr, missing))} (it has "
                                   f"{sorted(map(str, obs))}); expected: {self._expected()}")
        image, state, prompt = obs[IMAGE], obs[STATE], obs[PROMPT]
        want = self.image_shape or (None, None, self.channels)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or any(
                w is not None and w != n for w, n in zip(want, image.shape)):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ObservationError(f"{IMAGE!r} must be uint8 {_shape_text(want)}, one unbatched observation (the "
                                   f"images of sensors {list(self.sensors)} stacked on the channels), not {got}")
        if isinstance(state, (list, tuple)):
            state = np.asarray(state)
        if not isinstance(state, np.ndarray) or state.dtype.kind not in "fiu" or state.ndim != 1 or (
                self.state_dim is not None and state.shape[0] != self.state_dim):
            got = f"{state.dtype} {state.shape}" if isinstance(state, np.ndarray) else type(state).__name__
            raise ObservationError(f"{STATE!r} must be a float vector ({self.state_dim or 'P'},), not {got}")
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", "replace")
        if not isinstance(prompt, str):
            raise ObservationError(f"{PROMPT!r} must be a string (the instruction), not {type(prompt).__name__}")
        noise = obs.get(NOISE)
        if noise is not None:
            shape = self.noise_shape
            if not isinstance(noise, np.ndarray) or noise.dtype.kind != "f" or noise.shape not in (shape, (1, *shape)):
                got = f"{noise.dtype} {noise.shape}" if isinstance(noise, np.ndarray) else type(noise).__name__
                raise ObservationError(f"{NOISE!r} must be float32 {shape} (the flow's starting noise), not {got}")
            if not np.isfinite(noise).all():
                raise ObservationError(f"{NOISE!r} holds NaN or infinite numbers")
            if not self.takes_noise:
                raise ObservationError(f"{NOISE!r} was given, but policy {self.name!r} cannot start from a given "
                                       f"noise: leave the field out")
            noise = np.array(noise, np.float32).reshape(1, *shape)
        return np.array(image)[None], np.array(state, np.float32)[None], prompt, noise

    def _expected(self) -> str:
        return (f"{IMAGE} uint8 {_shape_text(self.image_shape or (None, None, self.channels))}, {STATE} float32 "
                f"({self.state_dim or 'P'},), {PROMPT} str, and optionally {NOISE} float32 ({self.chunk}, "
                f"{self.action_dim})")

    def infer(self, obs: Any) -> dict[str, Any]:
        """One observation -> {"actions": float32 (C, A), "policy_timing": {"infer_ms"}}. One call at a time."""
        image, state, prompt, noise = self.read(obs)
        with self._lock:
            started = time.monotonic()
            chunk = act(self.policy, image, state, [prompt], noise)
            took = time.monotonic() - started
        actions = np.asarray(chunk, np.float32)
        if actions.shape != (1, self.chunk, self.action_dim):
            raise RuntimeError(f"policy {self.name!r} returned actions of shape {actions.shape}, not (1, {self.chunk}, "
                               f"{self.action_dim})")
        return {"actions": actions[0], "policy_timing": {"infer_ms": took * 1000.0}}


def handshake(connection, request, api_key: str | None, who: str):
    """A websocket handshake's answer before it opens (websockets' ``process_request``): ``/healthz`` over plain
    HTTP, HTTP 401 without the API key, else None (the websocket opens). ``flywheel serve`` and a robot host."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    if api_key is not None:
        given = request.headers.get("Authorization") or ""
        if not hmac.compare_digest(given.encode(), f"Api-Key {api_key}".encode()):
            logger.warning("refused %s: %s API key", connection.remote_address, "wrong" if given else "no")
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, f"{who} needs an API key: send the header "
                                      f"'Authorization: Api-Key <key>'\n")
    return None


def _shape_text(shape) -> str:
    return "(" + ", ".join("?" if n is None else str(n) for n in shape) + ")"


def _accepts_noise(policy: Policy) -> bool:
    try:
        return "noise" in inspect.signature(policy.act).parameters
    except (TypeError, ValueError):
        return False


def act(policy: Policy, images: np.ndarray, proprio: np.ndarray, instructions: list[str],
        noise: np.ndarray | None = None) -> np.ndarray:
    """``policy.act`` in evaluation, from the starting ``noise`` (B, C, A) where given: a policy whose ``act`` takes a
    ``noise`` argument (the small VLA's ``VLAPolicy``) is given it; any other is refused rather than left to act from
    noise of its own."""
    if noise is None:
        return policy.act(images, proprio, instructions, seed=None)
    if not _accepts_noise(policy):
        raise ObservationError(f"{NOISE!r}: this policy cannot start from a given noise: leave the field out")
    return policy.act(images, proprio, instructions, seed=None, noise=noise)


def expected_inputs(bundle: PolicyBundle) -> tuple[tuple[int, int, int] | None, int | None]:
    """(image shape, state length) the policy expects, where its record says (the small VLA's ``vla_config``; a π0
    resizes any image and says its state's length, that of its norm stats)."""
    shape = bundle.record.get("vla_config") or {}
    size = shape.get("image_size")
    image = (int(size), int(size), image_channels(bundle.sensors)) if size else None
    state = int(shape["proprio_dim"]) + ("touch" in bundle.sensors) if "proprio_dim" in shape else None
    return image, bundle.record.get("state_dim", state)


def load_served(cfg) -> ServedPolicy:
    """The policy ``policy.name`` from ``policy.checkpoint``, built as a rollout actor builds it, with its weights, in
    evaluation as ``eval.noise`` says."""
    from flywheel.parts import policy_bundle

    bundle = policy_bundle(cfg)
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    image, state = expected_inputs(bundle)
    return ServedPolicy(policy, name=str(cfg.policy.name), checkpoint=str(cfg.policy.checkpoint), image_shape=image,
                        state_dim=state, meta=dict(bundle.meta))


class PolicyServer:
    """Serves a ``ServedPolicy`` on ``ws://host:port`` (module docstring: the protocol). ``start`` runs it in a thread
    of its own and returns once it listens (``port`` 0: a free port, then in ``port``); ``stop`` closes it."""

    def __init__(self, served: ServedPolicy, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None):
        self.served, self.host, self.port = served, host, int(port)
        self.api_key = api_key or None
        self._metadata = wire.packb(served.metadata())
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flywheel-policy")
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "PolicyServer":
        self._thread = threading.Thread(target=self._run, name="flywheel-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the policy server did not start listening on {self.host}:{self.port} within "
                               f"{timeout_s:g} s")
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout=30)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wait(self, poll_s: float = 0.5) -> None:
        """Until the server stops (in the caller's thread, which keeps receiving signals such as Ctrl-C)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(poll_s)

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 (a port already taken: start() raises it in the caller)
            self._failed = e
            self._ready.set()

    async def _main(self) -> None:
        from websockets.asyncio.server import serve

        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        # max_queue: a client pipelines a whole batch of observations (RemotePolicy sends one per row before reading),
        # and past websockets' default of 16 unread messages the server stops reading the socket, so a keepalive ping
        # behind them waits for the batch: with hundreds of rows on a busy machine, past the 20 s timeout.
        async with serve(self._handler, self.host, self.port, compression=None, max_size=None, max_queue=4096,
                         process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stopping.wait()

    def _process_request(self, connection, request):
        return handshake(connection, request, self.api_key, "this policy server")

    async def _handler(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = ws.remote_address
        logger.info("connection from %s", peer)
        loop = asyncio.get_running_loop()
        try:
            await ws.send(self._metadata)
            previous_total = None
            while True:
                message = await ws.recv()
                arrived = time.monotonic()
                try:
                    if isinstance(message, str):
                        raise ObservationError("a text message arrived: send each observation as a binary msgpack "
                                               "message (openpi_client.msgpack_numpy, flywheel.wire)")
                    try:
                        obs = wire.unpackb(message)
                    except Exception as e:  # noqa: BLE001
                        raise ObservationError(f"the message is not a msgpack observation: {e}") from e
                    started = time.monotonic()
                    reply = await loop.run_in_executor(self._executor, self.served.infer, obs)
                    inferred = time.monotonic() - started
                except ObservationError as e:
                    logger.warning("bad observation from %s: %s", peer, e)
                    await _refuse(ws, f"bad observation: {e}", CLOSE_INVALID_DATA, "bad observation")
                    return
                except Exception:  # noqa: BLE001 (the policy failed: the client gets the traceback, openpi's way)
                    logger.exception("the policy failed on a request from %s", peer)
                    await _refuse(ws, traceback.format_exc(), CLOSE_INTERNAL_ERROR,
                                  "Internal server error. Traceback included in previous frame.")
                    return
                reply["server_timing"] = {"infer_ms": inferred * 1000.0,
                                          **({"prev_total_ms": previous_total} if previous_total is not None else {})}
                await ws.send(wire.packb(reply))
                previous_total = (time.monotonic() - arrived) * 1000.0
        except ConnectionClosed:
            logger.info("connection from %s closed", peer)


async def _refuse(ws, text: str, code: int, reason: str) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        await ws.send(text)
        await ws.close(code=code, reason=reason)
    except ConnectionClosed:
        pass
