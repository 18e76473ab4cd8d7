"""The robot page: one web page for the people beside the robots (``flywheel page``).

    robots (their hosts' /operator channels) <── take over, e-stop, scene is reset, judge ──┐
    the run's episode store ── label queue (audit sample first, then the detector's least sure) ── page ── person
                            <── human labels (who, when) ──────────────────────────────────┘

It shows each robot live (camera and state), takes verdicts on finished episodes by buttons and keys into the
store as ``Label(source="human", version=<who>, created=<when>)``, which the loop's audit trusts and a retrained
detector learns from, and passes a person's e-stop, "scene is reset", live verdict, takeover (keyboard or
gamepad) and words to the policy (verbal coaching: actors/coach.py) to the robot's host (actors/robot_host.py
``OperatorChannel``). FastAPI, for typed routes and JSON with little code, served by uvicorn.

It listens on 127.0.0.1 unless told otherwise; a request from any other address must carry the page's token
(``?token=``, or the header ``X-Flywheel-Token``), and the page refuses to listen beyond loopback without one.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.contracts import Label
from flywheel.store import SPLITS, EpisodeStore

AUDIT_SHARE = 0.25  # the share of episodes in the audit sample: chosen by id, so the same ones on every reload
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def in_audit_sample(episode_id: str, share: float = AUDIT_SHARE) -> bool:
    """A fixed random sample of the episodes: by a hash of the id, unrelated to what the detector said, so that
    labelling it first gives an unbiased check of the detector (flywheel/audit.py)."""
    return int(hashlib.sha256(episode_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < share


def label_queue(store: EpisodeStore, n: int = 20) -> list[dict[str, Any]]:
    """The practice episodes no person has judged, in the order a person should judge them: the audit sample
    first, then the rest by how unsure the detector was (its score nearest its threshold)."""
    rows = []
    for ep in store.iter("train"):
        if any(lab.source == "human" for lab in ep.labels):
            continue
        judged = [lab for lab in ep.labels if lab.source == "detector"]
        last = judged[-1] if judged else None
        margin = abs(last.score - (last.threshold or 0.5)) if last and last.score is not None else 1.0
        rows.append({"id": ep.id, "task": ep.task, "instruction": ep.instruction, "seed": ep.seed,
                     "policy_version": ep.policy_version, "steps": ep.num_steps,
                     "detector": None if last is None else {"success": last.success, "score": last.score},
                     "audit": in_audit_sample(ep.id), "margin": margin,
                     "cut_short": ep.info.get("cut_short")})
    rows.sort(key=lambda r: (not r["audit"], r["margin"], r["id"]))
    return rows[:n]


def stored(store: EpisodeStore, episode_id: str) -> bool:
    """Whether the store holds that episode (an id is hex: nothing else reaches the file system)."""
    return bool(re.fullmatch(r"[0-9a-f]{8,64}", episode_id)) and any(
        (store.root / split / f"{episode_id}.npz").exists() for split in SPLITS)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def gif(frames: np.ndarray, ms: int = 80) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    pictures = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    pictures[0].save(out, format="GIF", save_all=True, append_images=pictures[1:], duration=ms, loop=0)
    return out.getvalue()


def make_app(store: EpisodeStore, robots: dict[str, Any], token: str | None = None):
    """The page's FastAPI app. ``robots``: name -> an ``OperatorChannel`` (or anything with its methods)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="flywheel robot page", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def need_token(request: Request, call_next):
        client = request.client.host if request.client else ""
        given = request.query_params.get("token") or request.headers.get("x-flywheel-token") or ""
        if client not in LOOPBACK and not (token and hmac.compare_digest(given.encode(), token.encode())):
            return JSONResponse({"error": "this page needs its token from another address: ?token=..."}, 401)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    _robot_routes(app, robots)
    _label_routes(app, store)
    return app


def _robot_routes(app, robots: dict[str, Any]) -> None:
    """The robots live, and what a person does to them (through each host's operator channel)."""
    from fastapi import Body, HTTPException
    from fastapi.responses import Response

    def robot(name: str):
        if name not in robots:
            raise HTTPException(404, f"no robot {name!r}: the page knows {sorted(robots)}")
        return robots[name]

    @app.get("/api/robots")
    def robots_now() -> list[dict[str, Any]]:
        out = []
        for name, channel in robots.items():
            try:
                seen = channel.look()
                out.append({"name": name, "up": True, "controller": bool(seen.get("controller")),
                            "estopped": bool(seen.get("estopped")), "taking_over": bool(seen.get("taking_over")),
                            "state": np.asarray(seen.get("state", []), float).round(3).tolist()})
            except ConnectionError as e:
                out.append({"name": name, "up": False, "error": str(e)})
        return out

    @app.get("/api/robots/{name}/frame.png")
    def frame(name: str) -> Response:
        images = robot(name).look().get("images") or {}
        if not images:
            raise HTTPException(404, "no frame yet: the robot has not been observed")
        return Response(png(next(iter(images.values()))), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.post("/api/robots/{name}/{op}")
    def operate(name: str, op: str, body: dict = Body(default={})) -> dict[str, Any]:
        channel = robot(name)
        if op == "estop":
            channel.estop()
        elif op == "scene_reset":
            channel.scene_reset()
        elif op == "judge":
            channel.judge(bool(body["success"]))
        elif op == "take":
            channel.take(np.asarray(body["action"], np.float32))
        elif op == "release":
            channel.release()
        elif op == "say":
            channel.say(str(body.get("words", "")), str(body.get("who") or ""))
        else:
            raise HTTPException(404, f"unknown action {op!r}: estop, scene_reset, judge, take, release or say")
        return {"ok": True}


def _label_routes(app, store: EpisodeStore) -> None:
    """The queue of episodes to judge, their clips, and the people's labels into the store."""
    from fastapi import Body, HTTPException
    from fastapi.responses import Response

    lock = threading.Lock()  # label writes: one at a time

    @app.get("/api/queue")
    def queue(n: int = 20) -> list[dict[str, Any]]:
        return label_queue(store, n)

    @app.get("/api/episodes/{episode_id}/clip.gif")
    def clip(episode_id: str) -> Response:
        if not stored(store, episode_id):
            raise HTTPException(404, f"no episode {episode_id!r} in the store")
        ep = store.load(episode_id, with_ground_truth=False)
        return Response(gif(ep.observations["image"]), media_type="image/gif")

    @app.post("/api/labels")
    def add_label(body: dict = Body(...)) -> dict[str, Any]:
        who = str(body.get("who") or "").strip()
        if not who:
            raise HTTPException(422, "say who is judging (who): human labels are stored with their author")
        episode_id = str(body["episode_id"])
        if not stored(store, episode_id):
            raise HTTPException(404, f"no episode {episode_id!r} in the store")
        label = Label(source="human", success=bool(body["success"]), version=who, created=time.time())
        with lock:
            store.add_labels([(episode_id, label)])
        return {"ok": True, "label": {"episode_id": episode_id, "success": label.success, "who": who,
                                      "created": label.created}}


class PageServer:
    """The page served by uvicorn in a thread of its own (``start`` returns once it listens; ``port`` 0: a free
    one, then in ``port``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8790, token: str | None = None):
        if host not in LOOPBACK and not token:
            raise ValueError(f"the robot page would listen on {host} without a token: give page.token (or listen on "
                             f"127.0.0.1)")
        import uvicorn

        self.host = host
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        self._thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "PageServer":
        self._thread = threading.Thread(target=self._server.run, name="robot-page", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the robot page did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wait(self, poll_s: float = 0.5) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(poll_s)


PAGE = (Path(__file__).parent / "assets" / "robot_page.html").read_text()
