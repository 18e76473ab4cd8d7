"""`flywheel serve` and RemotePolicy: the shipped small VLA over openpi's websocket protocol, with openpi's own client
(openpi-client 0.1.2 in .venv-openpi), flywheel's collection through it, and a server that dies or hangs."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from actors.remote_policy import PolicyServerError, RemotePolicy
from actors.rollout import RolloutWorker, run_episodes
from actors.tabletop import split_seed
from flywheel import wire
from flywheel.contracts import PolicySnapshot
from flywheel.serve import PolicyServer, ServedPolicy, expected_inputs
from flywheel.vla.bundle import small_vla

ROOT = Path(__file__).resolve().parent.parent
OPENPI_PYTHON = ROOT / ".venv-openpi" / "bin" / "python"
PROMPT = "push the red block onto the blue pad"
SEEDS = [split_seed("eval", i) for i in range(8)]  # the base succeeds on six, two of them within 20 steps


def in_process_policy():
    bundle = small_vla("base", eval_noise=0.0)
    policy = bundle.make_actor()
    policy.load_weights(bundle.weights)
    return bundle, policy


class RowByRow:
    """The in-process policy asked one observation at a time, as the server is: a batch's rows would otherwise share
    matrix products whose float sums round differently (~3e-7). (Once a torch model has run a batch of another size,
    its one-row results can move by ~1e-7 too: each reference here acts one row at a time before anything else.)"""

    def __init__(self, policy):
        self.policy, self.chunk, self.action_dim, self.sensors = policy, policy.chunk, policy.action_dim, policy.sensors
        self.explore = False

    def act(self, images, proprio, instructions, seed=None):
        return np.concatenate([self.policy.act(images[b:b + 1], proprio[b:b + 1], instructions[b:b + 1], seed)
                               for b in range(len(images))])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The small VLA acts on one observation at a time here: torch's threads would only contend (with the server's
    process, and anything else on the machine), which slowed this module tenfold on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served():
    bundle, policy = in_process_policy()
    image, state = expected_inputs(bundle)
    return ServedPolicy(policy, name="small_vla", checkpoint="base", image_shape=image, state_dim=state,
                        meta=bundle.meta)


@pytest.fixture(scope="module")
def server(served):
    with PolicyServer(served, port=0) as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(served):
    with PolicyServer(served, port=0, api_key="s3cret") as s:
        yield s


def observations(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8), rng.random((n, 3)).astype(np.float32),
            [PROMPT] * n)


def openpi_client(port, tmp_path, *args):
    if not OPENPI_PYTHON.exists():
        pytest.fail(f"{OPENPI_PYTHON.relative_to(ROOT)} is missing: run `make openpi-client` (openpi's client in a "
                    f"venv of its own, numpy<2)")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    out = subprocess.run([str(OPENPI_PYTHON), str(ROOT / "tests" / "openpi_client_check.py"), "--port", str(port),
                          *map(str, args)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def healthz(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return r.status, r.read().decode()


def test_openpi_client_talks_to_flywheel_serve(served, server, keyed_server, tmp_path):
    images, states, _ = observations(3)
    noise = np.random.default_rng(1).standard_normal((3, 8, 3)).astype(np.float32)
    np.savez(tmp_path / "obs.npz", images=images, states=states)
    np.savez(tmp_path / "noisy.npz", images=images, states=states, noise=noise)

    out = openpi_client(server.port, tmp_path, "--observations", tmp_path / "obs.npz")
    assert out["ok"], out
    meta = out["metadata"]
    assert (meta["chunk"], meta["action_dim"], meta["sensors"], meta["image_shape"], meta["state_dim"]) == \
        (8, 3, ["overhead"], [64, 64, 3], 3)
    assert meta["policy"] == "small_vla" and meta["server"] == "flywheel"
    for i, reply in enumerate(out["replies"]):
        assert reply["shape"] == [8, 3] and reply["dtype"] == "float32"
        expected = served.infer({"observation/image": images[i], "observation/state": states[i], "prompt": PROMPT})
        np.testing.assert_array_equal(np.asarray(reply["actions"], np.float32), expected["actions"])
        assert reply["server_timing"]["infer_ms"] > 0 and ("prev_total_ms" in reply["server_timing"]) == (i > 0)
    noisy = openpi_client(server.port, tmp_path, "--observations", tmp_path / "noisy.npz")
    assert noisy["ok"] and all(not np.array_equal(a["actions"], b["actions"])
                               for a, b in zip(noisy["replies"], out["replies"]))

    assert openpi_client(keyed_server.port, tmp_path, "--api-key", "s3cret")["ok"]
    for refused in ([], ["--api-key", "wrong"]):
        out = openpi_client(keyed_server.port, tmp_path, *refused)
        assert not out["ok"] and "401" in out["error"], out
    assert healthz(server.port) == (200, "OK\n") and healthz(keyed_server.port)[0] == 200  # no key needed

    bad = openpi_client(server.port, tmp_path, "--drop", "observation/state")
    assert not bad["ok"] and "Error in inference server" in bad["error"] and "'observation/state'" in bad["error"]


def test_served_actions_equal_the_policy_in_process_and_a_given_noise_steers_them(server):
    _, reference = in_process_policy()
    images, states, prompts = observations(5, seed=2)
    remote = RemotePolicy(server.url)
    assert (remote.chunk, remote.action_dim, remote.sensors) == (8, 3, ("overhead",))
    served = remote.act(images, states, prompts)
    assert served.shape == (5, 8, 3) and served.dtype == np.float32
    np.testing.assert_array_equal(served, RowByRow(reference).act(images, states, prompts))

    noise = np.random.default_rng(3).standard_normal((5, 8, 3)).astype(np.float32)
    steered = remote.act(images, states, prompts, noise=noise)
    np.testing.assert_array_equal(steered, remote.act(images, states, prompts, noise=noise))  # same noise, same chunk
    assert np.abs(steered - served).max() > 0.1
    np.testing.assert_array_equal(remote.act(images, states, prompts, noise=np.zeros_like(noise)), served)
    # the flow from a given noise is the in-process policy's sample from the same draw
    import torch

    reference.eval_noise = 1.0
    drawn = torch.randn((1, 8, 3), generator=torch.Generator().manual_seed(7)).numpy()
    sampled = reference.act(images[:1], states[:1], prompts[:1], seed=7)
    np.testing.assert_array_equal(remote.act(images[:1], states[:1], prompts[:1], noise=drawn), sampled)
    remote.close()
    # batched, the rows share matrix products that round otherwise (and torch's later calls of one row too, by ~1e-7)
    reference.eval_noise = 0.0
    np.testing.assert_allclose(served, reference.act(images, states, prompts), atol=1e-5)


def test_a_collection_through_the_served_policy_equals_the_policy_in_process(server):
    from flywheel.remote import remote

    bundle = remote(server.url)
    assert bundle.weights == {} and bundle.sensors == ("overhead",)
    with pytest.raises(Exception, match="no gradients"):
        bundle.make_model()
    worker = RolloutWorker(bundle.make_actor, {})
    worker.set_weights(PolicySnapshot(0, {}))
    episodes, faults = worker.collect_with_faults(SEEDS[:6], "eval")
    assert faults == [] and [e.seed for e in episodes] == SEEDS[:6]
    _, reference = in_process_policy()
    expected = run_episodes(SEEDS[:6], "eval", RowByRow(reference), policy_version=0)
    for got, want in zip(episodes, expected):
        np.testing.assert_array_equal(got.actions, want.actions)
        assert got.ground_truth == want.ground_truth
    batched = run_episodes(SEEDS[:6], "eval", reference, policy_version=0)
    assert [e.ground_truth["success"] for e in episodes] == [e.ground_truth["success"] for e in batched]


class Failing:
    """The in-process policy, whose call number ``at`` raises what a dead server would."""

    def __init__(self, policy, at):
        self.policy, self.at, self.calls = policy, at, 0
        self.chunk, self.action_dim, self.sensors, self.explore = policy.chunk, policy.action_dim, policy.sensors, False

    def act(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.at:
            raise PolicyServerError("policy server ws://127.0.0.1:1: the connection dropped")
        return self.policy.act(*args, **kwargs)


def test_a_policy_server_error_discards_the_episodes_in_flight_and_keeps_those_finished():
    complete = run_episodes(SEEDS, "eval", in_process_policy()[1], policy_version=0)
    faults = []
    policy = in_process_policy()[1]
    kept = run_episodes(SEEDS, "eval", Failing(policy, at=5), policy_version=0, faults=faults)
    finished = [e for e in complete if e.num_steps <= 20]  # before the sixth call, at step 20
    assert len(finished) == 2 and [e.seed for e in kept] == [e.seed for e in finished]
    for got, want in zip(kept, finished):
        np.testing.assert_array_equal(got.actions, want.actions)
    assert sorted(f["seed"] for f in faults) == sorted(set(SEEDS) - {e.seed for e in finished})
    assert all(f["step"] == 20 and f["error"].startswith("PolicyServerError: policy server ws://") for f in faults)
    with pytest.raises(PolicyServerError):  # without a faults list, the error is the caller's, as an env's is
        run_episodes(SEEDS[:2], "eval", Failing(policy, at=0), policy_version=0)


def test_a_server_killed_mid_collection_costs_the_episodes_in_flight(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "serve.port=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        said = ""
        while not re.search(r"ws://127\.0\.0\.1:\d+", said) and proc.poll() is None:
            said += proc.stdout.readline()  # the line saying where it serves (after any warnings)
        url = re.search(r"ws://127\.0\.0\.1:\d+", said)
        assert url, said + proc.stdout.read()
        url = url.group(0)

        class KillsTheServer(RemotePolicy):
            calls = 0

            def act(self, *args, **kwargs):
                self.calls += 1
                if self.calls == 6:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                return super().act(*args, **kwargs)

        policy = KillsTheServer(url, timeout_s=10)
        faults = []
        episodes = run_episodes(SEEDS, "eval", policy, policy_version=0, faults=faults)
        assert len(episodes) + len(faults) == len(SEEDS) and episodes and faults
        assert all(e.num_steps <= 20 for e in episodes) and all(f["step"] == 20 for f in faults)
        assert all(f["error"].startswith(f"PolicyServerError: policy server {url}") for f in faults), faults
        with pytest.raises(PolicyServerError, match=f"policy server {url}: connection refused"):
            policy.act(*observations(1))  # the next call connects again, and says why it cannot
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_hung_server_trips_the_timeouts():
    from websockets.sync.server import serve

    def never_replies(conn):
        conn.send(wire.packb({"chunk": 8, "action_dim": 3, "sensors": ["overhead"]}))
        for _ in conn:
            pass  # reads every observation, answers none

    with serve(never_replies, "127.0.0.1", 0) as hung:
        threading.Thread(target=hung.serve_forever, daemon=True).start()
        port = hung.socket.getsockname()[1]
        policy = RemotePolicy(f"127.0.0.1:{port}", timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(PolicyServerError, match=rf"ws://127.0.0.1:{port}: no reply within 0.5 s"):
            policy.act(*observations(2))
        assert time.monotonic() - started < 5
        faults = []
        assert run_episodes(SEEDS[:2], "eval", policy, policy_version=0, faults=faults) == [] and len(faults) == 2
        hung.shutdown()

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts the connection, never answers the handshake
        port = silent.getsockname()[1]
        with pytest.raises(PolicyServerError, match=rf"ws://127.0.0.1:{port}: no answer within connect_timeout_s=0.5"):
            RemotePolicy(f"ws://127.0.0.1:{port}", connect_timeout_s=0.5)


def test_a_bad_observation_is_refused_naming_the_key_and_the_server_stays_up(server):
    images, states, prompts = observations(2)
    no_prompt = RemotePolicy(server.url, keys={"prompt": None})
    with pytest.raises(PolicyServerError, match=r"reported an error:\nbad observation: the observation lacks 'prompt'"):
        no_prompt.act(images, states, prompts)
    small = RemotePolicy(server.url)
    with pytest.raises(PolicyServerError, match=r"'observation/image' must be uint8 \(64, 64, 3\)"):
        small.act(images[:, :32, :32], states, prompts)
    with pytest.raises(PolicyServerError, match=r"'noise' must be float32 \(8, 3\)"):
        small.act(images, states, prompts, noise=np.zeros((2, 4, 3), np.float32))
    assert small.act(images, states, prompts).shape == (2, 8, 3)  # the same client connects again
    assert healthz(server.port)[0] == 200


def test_a_wrong_api_key_is_refused_by_name(keyed_server):
    with pytest.raises(PolicyServerError, match="refused the API key"):
        RemotePolicy(keyed_server.url, api_key="wrong")
    os.environ["FLYWHEEL_API_KEY"] = "s3cret"
    try:
        assert RemotePolicy(keyed_server.url).act(*observations(1)).shape == (1, 8, 3)
    finally:
        del os.environ["FLYWHEEL_API_KEY"]
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"http://127.0.0.1:{keyed_server.port}/", timeout=5)


def test_serve_refuses_an_unknown_key_by_name(capsys):
    from flywheel.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve", "serve.prot=8000"])
    assert stopped.value.code == 2 and "Did you mean serve.port" in capsys.readouterr().out
