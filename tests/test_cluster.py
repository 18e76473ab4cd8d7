"""Many machines: the same run against an existing Ray cluster, its actors placed by custom resources. Tested on a
local three-node cluster (ray.cluster_utils: a head, a "robot host" and a "learner host" standing in for a GPU node,
each its own raylet on loopback)."""

import json
import subprocess
import sys

import pytest

from flywheel.config import ConfigError, load_config
from flywheel.cluster import check_learner_fits, check_resources


@pytest.mark.slow  # CI runs it (make test-slow in .ci/run); the default suite keeps to 10 min
def test_actors_and_the_learner_go_to_the_nodes_that_offer_their_resources(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        robot_host = cluster.add_node(num_cpus=2, resources={"robot": 2})
        learner_host = cluster.add_node(num_cpus=1, resources={"trainer": 1})
        cluster.wait_for_nodes()
        run_dir = tmp_path / "run"
        # what is under test is where things run: the simulator judges (no detector to train; tests/test_loop.py)
        done = subprocess.run(
            [sys.executable, "-m", "flywheel.cli", "run", "experiment=tiny", f"run_dir={run_dir}", "wandb.mode=disabled",
             "budget.iterations=1", "gate.episodes=0", "detector.name=ground_truth", f"ray.address={cluster.address}", "rollout.resources={robot:1}", "placement.remote=true",
             "placement.resources={trainer:1}"],
            capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["episodes"] == 32
        assert [w["node"] for w in summary["rollout_workers"]] == [robot_host.node_id] * 2
        assert summary["learner"]["node"] == learner_host.node_id and summary["learner"]["device"] == "cpu"
        assert "joined" in done.stdout and "3 nodes" in done.stdout
    finally:
        cluster.shutdown()


def test_a_resource_no_node_offers_is_named_before_any_actor_waits():
    check_resources({"robot": 1}, {"CPU": 2.0, "robot": 4.0})
    with pytest.raises(ConfigError, match=r"no node has \['robot'\].*ray start --address"):
        check_resources({"robot": 1}, {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"placement.resources=.*no node has \['GPU'\].*--num-gpus=1"):
        check_resources({"GPU": 1}, {"CPU": 2.0}, who="placement")


def test_a_remote_learner_that_cannot_fit_is_refused_before_it_waits():
    cfg = load_config("run", ["placement.remote=true"])  # 2 rollout actors of 1 CPU each, a learner of 1 CPU
    with pytest.raises(ConfigError, match=r"placement.cpus=1 does not fit: the rollout actors hold 2 of the cluster's 2"):
        check_learner_fits(cfg, {"CPU": 2.0})
    check_learner_fits(cfg, {"CPU": 3.0})
    check_learner_fits(load_config("run", ["placement.remote=true", "placement.cpus=0"]), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"no node has \['GPU'\]"):
        check_learner_fits(load_config("run", ["placement.remote=true", "placement.gpus=1"]), {"CPU": 8.0})


_SERVE = """
import sys
from flywheel.config import load_config
from flywheel.cluster import start_ray
import ray
start_ray(load_config("run", []), say=print)
print("GCS", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""
_JOIN = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('JOINED')"


@pytest.mark.slow  # CI runs it (make test-slow in .ci/run); the default suite keeps to 10 min
def test_the_ray_a_run_starts_refuses_a_process_without_its_token(tmp_path):
    """Ray's servers listen on every interface (Ray 2.60 cannot bind them to 127.0.0.1), so the Ray a run starts
    requires Ray's token: a process that holds another cannot join; one that holds it can. The token file is left
    readable by its owner alone."""
    import os

    home, stranger = tmp_path / "home", tmp_path / "stranger"
    (stranger / ".ray").mkdir(parents=True)
    (stranger / ".ray" / "auth_token").write_text("not-the-token")
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    server = subprocess.Popen([sys.executable, "-c", _SERVE], env={**env, "HOME": str(home)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while not line.startswith("GCS"):
            line = server.stdout.readline()
            assert line or server.poll() is None, "the run's Ray did not start"
        address = line.split()[1]

        def join(**extra):
            return subprocess.run([sys.executable, "-c", _JOIN, address], env={**env, **extra}, capture_output=True,
                                  text=True, timeout=120)

        refused = join(HOME=str(stranger), RAY_AUTH_MODE="token", RAY_gcs_server_port_wait_time_s="2")  # 2 tries
        assert refused.returncode != 0 and "JOINED" not in refused.stdout
        assert "AuthenticationError" in refused.stderr, refused.stderr[-1500:]
        admitted = join(HOME=str(home), RAY_AUTH_MODE="token")  # as a node or a driver joins a cluster with a token
        assert admitted.returncode == 0 and "JOINED" in admitted.stdout, admitted.stderr[-1500:]
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600
    finally:
        server.stdin.close()
        server.wait(60)
