"""A policy served over the network, in openpi's websocket protocol, acting as a flywheel ``Policy``.

``RemotePolicy("ws://host:8000")`` talks to ``flywheel serve`` or to an openpi policy server
(``openpi/serving/websocket_policy_server.py``): on connecting it reads the server's metadata, then sends one
observation per row of a batch (all of them before reading the first reply: the requests are pipelined on one
connection, and the replies come back in order) and stacks the replies' ``actions`` into the chunk (B, C, A).

What it sends, by default as ``flywheel serve`` reads it (flywheel/serve.py)::

    {"observation/image": uint8 (H, W, channels), "observation/state": float32 (P,), "prompt": str}

``keys`` renames the fields for a server that reads others. Its entries: ``image`` (the whole image stack),
``state``, ``prompt`` and ``actions`` (the reply's field), and a camera's name (``overhead``, ``wrist``, ``depth``) for
that camera's channels of the stack alone; naming a camera drops the whole-stack ``image`` unless it is named too, and
an entry set to None drops its field. ``extra`` adds constant fields to every observation. For LIBERO's pi0 server::

    RemotePolicy("ws://gpu-box:8000", sensors=("overhead", "wrist"), chunk=10, action_dim=7,
                 keys={"overhead": "observation/image", "wrist": "observation/wrist_image"})

A timeout, a refused or dropped connection, or an error the server reports raises ``PolicyServerError``, which
names the server and what happened; the connection is then dropped, and the next call connects again. A rollout
(actors/rollout.py) records such an error as a fault and discards the episodes that were waiting for the chunk.

The server acts as it was started (``flywheel serve``: evaluation, deterministic by default): ``explore`` and
``seed`` change nothing here, and the weights stay on the server (``get_weights`` is empty, ``load_weights`` keeps
nothing).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from flywheel import wire
from flywheel.contracts import Sampling, camera_channels

API_KEY_ENV = "FLYWHEEL_API_KEY"
DEFAULT_KEYS = {"image": "observation/image", "state": "observation/state", "prompt": "prompt", "actions": "actions"}
CAMERAS = ("overhead", "wrist", "depth")


class PolicyServerError(RuntimeError):
    """The policy server could not be reached, did not answer in time, dropped the connection, or reported an
    error. The message names the server's address and what happened."""


def server_url(address: str) -> str:
    """``host:port`` or ``ws://host:port`` -> ``ws://host:port``."""
    return address if address.startswith(("ws://", "wss://")) else f"ws://{address}"


class RemotePolicy:
    """The ``Policy`` contract (flywheel/contracts.py) over a websocket to a policy server (module docstring)."""

    explore = False

    def __init__(self, url: str, *, sensors: tuple[str, ...] | list[str] | None = None, chunk: int | None = None,
                 action_dim: int | None = None, keys: dict[str, str | None] | None = None,
                 extra: dict[str, Any] | None = None, api_key: str | None = None, connect_timeout_s: float = 10.0,
                 timeout_s: float = 30.0):
        """``sensors``, ``chunk``, ``action_dim``: what the server's metadata says where not given (then it connects
        now; an openpi server's metadata says none of them, so give them). ``api_key``: sent as ``Authorization:
        Api-Key <key>``; default the ``FLYWHEEL_API_KEY`` environment variable. ``connect_timeout_s``: to connect and
        read the metadata; ``timeout_s``: for each reply."""
        self.url = server_url(url)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.connect_timeout_s, self.timeout_s = float(connect_timeout_s), float(timeout_s)
        given = dict(keys or {})
        self.keys = {**DEFAULT_KEYS, **given}
        if any(c in given for c in CAMERAS) and "image" not in given:
            self.keys.pop("image")
        self.keys = {k: v for k, v in self.keys.items() if v is not None}
        unknown = sorted(set(self.keys) - set(DEFAULT_KEYS) - set(CAMERAS))
        if unknown:
            raise ValueError(f"keys {unknown} are not fields RemotePolicy sends: use {sorted(DEFAULT_KEYS)} or a "
                             f"camera's name {list(CAMERAS)}")
        self.extra = dict(extra or {})
        self.metadata: dict[str, Any] = {}
        self._conn = None
        self.last_extras: dict[str, np.ndarray] = {}
        if sensors is None or chunk is None or action_dim is None:
            self._connect()
        told = self.metadata
        self.sensors = tuple(sensors if sensors is not None else told.get("sensors") or ("overhead",))
        for name, value in (("chunk", chunk), ("action_dim", action_dim)):
            value = value if value is not None else told.get(name)
            if value is None:
                raise PolicyServerError(f"policy server {self.url}: its metadata does not say its {name} (an openpi "
                                        f"server's does not): give RemotePolicy({name}=...)")
            setattr(self, name, int(value))
        missing = [c for c in CAMERAS if c in self.keys and c not in self.sensors]
        if missing:
            raise ValueError(f"keys name cameras {missing} that sensors={list(self.sensors)} do not include")
        self._channels = camera_channels(self.sensors)

    # -- the Policy contract --------------------------------------------------------------------------------------

    def act(self, images: np.ndarray, proprio: np.ndarray, instructions: list[str], seed: int | None = None,
            noise: np.ndarray | None = None) -> np.ndarray:
        """One request per row, pipelined on one connection -> float32 (B, C, A). ``noise`` float32 (B, C, A): each
        row's starting noise for the server's flow (its ``noise`` field, which ``flywheel serve`` reads)."""
        messages = []
        for b in range(len(images)):
            obs = self._observation(images[b], proprio[b], instructions[b])
            if noise is not None:
                obs["noise"] = np.asarray(noise[b], np.float32)
            messages.append(wire.packb(obs))
        replies = self._exchange(messages)
        return np.stack([self._actions(r) for r in replies]).astype(np.float32, copy=False)

    def get_weights(self) -> dict[str, np.ndarray]:
        return {}

    def load_weights(self, weights: dict[str, np.ndarray], sampling: Sampling | None = None) -> None:
        """Nothing to load: the weights stay on the server."""

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 (already gone)
                pass
            self._conn = None

    def __getstate__(self) -> dict:  # a connection does not pickle: the copy connects on its first call
        return {**self.__dict__, "_conn": None}

    def __del__(self) -> None:
        self.close()

    # -- the protocol ---------------------------------------------------------------------------------------------

    def _observation(self, image: np.ndarray, state: np.ndarray, instruction: str) -> dict[str, Any]:
        k = self.keys
        obs: dict[str, Any] = dict(self.extra)
        if "image" in k:
            obs[k["image"]] = np.ascontiguousarray(image)
        for camera, channels in self._channels.items():
            if camera in k:
                obs[k[camera]] = np.ascontiguousarray(image[..., channels])
        if "state" in k:
            obs[k["state"]] = np.asarray(state, np.float32)
        if "prompt" in k:
            obs[k["prompt"]] = str(instruction)
        return obs

    def _actions(self, reply: Any) -> np.ndarray:
        field = self.keys.get("actions", "actions")
        actions = reply.get(field) if isinstance(reply, dict) else None
        if actions is None:
            raise PolicyServerError(f"policy server {self.url}: its reply has no {field!r} (it has "
                                    f"{sorted(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__})")
        actions = np.asarray(actions, np.float32)
        if actions.ndim != 2 or actions.shape[0] < self.chunk or actions.shape[1] != self.action_dim:
            raise PolicyServerError(f"policy server {self.url}: {field!r} has shape {actions.shape}, not "
                                    f"({self.chunk}, {self.action_dim}) (chunk, action_dim)")
        return actions[: self.chunk]  # a server that plans further ahead: the first chunk's steps

    def _connect(self) -> None:
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        headers = {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else None
        started = time.monotonic()
        try:
            # no keepalive pings: every reply has its own deadline (timeout_s), and a ping queued behind a pipelined
            # batch on a busy server timed out in 20 s and dropped the connection mid-batch (bench/RESULTS.md, DSRL)
            conn = connect(self.url, open_timeout=self.connect_timeout_s, additional_headers=headers,
                           compression=None, max_size=None, proxy=None, ping_interval=None)
        except InvalidStatus as e:
            status = e.response.status_code
            why = ("refused the API key (HTTP 401): give the server's key (api_key=, or FLYWHEEL_API_KEY)"
                   if status == 401 else f"refused the connection with HTTP {status}")
            raise PolicyServerError(f"policy server {self.url} {why}") from e
        except TimeoutError as e:
            raise PolicyServerError(f"policy server {self.url}: no answer within connect_timeout_s="
                                    f"{self.connect_timeout_s:g} s while connecting") from e
        except ConnectionRefusedError as e:
            raise PolicyServerError(f"policy server {self.url}: connection refused (nothing listens there: is "
                                    f"`flywheel serve` running?)") from e
        except Exception as e:  # noqa: BLE001 (DNS, TLS, a bad handshake)
            raise PolicyServerError(f"policy server {self.url}: cannot connect: {type(e).__name__}: {e}") from e
        try:
            left = max(0.1, self.connect_timeout_s - (time.monotonic() - started))
            self.metadata = self._decode(self._receive(conn, left, "metadata"))
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _exchange(self, messages: list[bytes]) -> list[Any]:
        from websockets.exceptions import ConnectionClosed

        if self._conn is None:
            self._connect()
        conn = self._conn
        try:
            try:
                for m in messages:
                    conn.send(m)
            except ConnectionClosed as e:
                self._receive(conn, 0.5, "reply")  # the server's last word, if it said one before closing
                raise PolicyServerError(f"policy server {self.url}: the connection dropped while sending") from e
            return [self._decode(self._receive(conn, self.timeout_s, "reply")) for _ in messages]
        except PolicyServerError:
            self.close()  # a reply may still be on its way: the next call starts on a new connection
            raise
        except Exception as e:  # noqa: BLE001 (a socket error the library did not wrap)
            self.close()
            raise PolicyServerError(f"policy server {self.url}: {type(e).__name__}: {e}") from e

    def _receive(self, conn, timeout_s: float, what: str) -> bytes:
        from websockets.exceptions import ConnectionClosed

        try:
            message = conn.recv(timeout=timeout_s)
        except TimeoutError as e:
            raise PolicyServerError(f"policy server {self.url}: no {what} within {timeout_s:g} s (timeout_s; the "
                                    f"server hangs or is overloaded); the connection is dropped, and the next call "
                                    f"connects again") from e
        except ConnectionClosed as e:
            said = f" (close code {e.rcvd.code}{': ' + e.rcvd.reason if e.rcvd.reason else ''})" if e.rcvd else ""
            raise PolicyServerError(f"policy server {self.url}: the connection dropped while waiting for its {what}"
                                    f"{said}; the next call connects again") from e
        if isinstance(message, str):
            raise PolicyServerError(f"policy server {self.url} reported an error:\n{message}")
        return message

    def _decode(self, message: bytes) -> Any:
        try:
            return wire.unpackb(message)
        except Exception as e:  # noqa: BLE001
            raise PolicyServerError(f"policy server {self.url}: a message that is not msgpack: {e}") from e
