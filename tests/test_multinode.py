"""A real two-node Ray cluster (two raylets, started by cluster/local_cluster.sh with token auth on) reached only
through its job API by ``orchestrator submit``: a 2-worker training job places one worker on each node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import tiny_job, write_job

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    state = tmp_path_factory.mktemp("two-nodes")
    gcs, dashboard = free_port(), free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_CLUSTER_DIR": str(state), "RAY_GCS_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dashboard),
           "RAY": str(bin_dir / "ray"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = str(REPO / "cluster" / "local_cluster.sh")
    started = subprocess.run(["bash", script, "start", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    client_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}
    client_env.pop("RAY_ADDRESS", None)
    yield {"address": f"http://127.0.0.1:{dashboard}", "gcs": f"127.0.0.1:{gcs}", "env": client_env, "state": state}
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)


def submit(two_nodes, folder: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "submit", *argv], cwd=folder,
                          env=env or two_nodes["env"], capture_output=True, text=True, timeout=600)


def test_the_dashboard_and_job_api_listen_on_loopback_only(two_nodes):
    import psutil

    port = int(two_nodes["address"].rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                 and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening


def test_each_node_unpacks_jobs_in_its_own_folder(two_nodes):
    """Ray unpacks a job's working_dir on every node it runs on, deleting the folder first (overwrite=True): two
    raylets sharing one temp dir would rewrite the folder under the running job (seen as a model folder without
    config.json). Separate machines have separate disks; the local cluster gives each node its own temp dir."""
    probe = (f"import json, ray; ray.init(address={two_nodes['gcs']!r}, logging_level='ERROR', log_to_driver=False); "
             "print(json.dumps([n['RayletSocketName'] for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", probe], env=two_nodes["env"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    sockets = json.loads(done.stdout.strip().splitlines()[-1])
    roots = {Path(socket).parents[2] for socket in sockets}  # TEMP_DIR/session_.../sockets/raylet
    assert len(sockets) == 2 and len(roots) == 2, sockets


def test_submit_trains_with_one_worker_on_each_node(two_nodes, tmp_path, tiny_model, tiny_data, mlflow_server):
    import shutil

    from mlflow import MlflowClient

    # The model and data travel inside the uploaded folder, named by relative paths: the usual project layout
    # (and the one where Ray re-extracting the working_dir under the running driver used to break it).
    shutil.copytree(tiny_model, tmp_path / "model")
    shutil.copytree(tiny_data, tmp_path / "data")
    job = tiny_job(tmp_path, Path("model"), Path("data"), tracking={"uri": mlflow_server, "experiment": "two-nodes"},
                   scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD"}, train={"epochs": 1})
    write_job(tmp_path / "job.yaml", job)
    done = submit(two_nodes, tmp_path, "job.yaml", "--address", two_nodes["address"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted raysubmit_" in done.stdout and "adapter:" in done.stdout  # the remote driver's own lines
    client = MlflowClient(mlflow_server)
    run = client.search_runs([client.get_experiment_by_name("two-nodes").experiment_id])[0]
    nodes = json.loads(run.data.tags["orchestrator.worker_nodes"])
    assert len(nodes) == 2 and nodes[0] != nodes[1] and run.info.status == "FINISHED"


def test_submit_exits_with_the_remote_commands_code(two_nodes, tmp_path, tiny_model, tiny_data):
    job = tiny_job(tmp_path, tiny_model, tiny_data)
    job["data"]["train"] = "missing/train.jsonl"  # valid YAML, but the data is not there: the remote preflight says so
    write_job(tmp_path / "job.yaml", job)
    done = submit(two_nodes, tmp_path, "job.yaml", "--address", two_nodes["address"], "--command", "validate")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "submitted raysubmit_" in done.stdout and "data.train" in done.stdout and "does not exist" in done.stdout


def test_submit_refuses_bad_input_before_uploading(two_nodes, tmp_path, tiny_model, tiny_data):
    write_job(tmp_path / "job.yaml", tiny_job(tmp_path, tiny_model, tiny_data, lora={"rank": 4}))
    done = submit(two_nodes, tmp_path, "job.yaml", "--address", two_nodes["address"])
    assert done.returncode == 2 and "lora.rank: unknown key" in done.stderr and "submitted" not in done.stdout
    write_job(tmp_path / "relative.yaml", {**tiny_job(tmp_path, tiny_model, tiny_data), "output_dir": "runs/x"})
    done = submit(two_nodes, tmp_path, "relative.yaml", "--address", two_nodes["address"])
    assert done.returncode == 2 and "output_dir: 'runs/x' is relative" in done.stderr
    write_job(tmp_path / "ok.yaml", tiny_job(tmp_path, tiny_model, tiny_data))
    leaky = {**two_nodes["env"], "MLFLOW_TRACKING_URI": "http://alice:s3cret@127.0.0.1:5000"}
    done = submit(two_nodes, tmp_path, "ok.yaml", "--address", two_nodes["address"], env=leaky)
    assert done.returncode == 2 and "MLFLOW_TRACKING_URI holds credentials" in done.stderr
    assert "submitted" not in done.stdout and "s3cret" not in done.stdout + done.stderr
    started = time.monotonic()
    done = submit(two_nodes, tmp_path, "ok.yaml", "--address", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "cannot reach the Ray job API" in done.stderr
    assert time.monotonic() - started < 60
    no_token = {k: v for k, v in two_nodes["env"].items() if not k.startswith("RAY_AUTH")}
    no_token.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    done = submit(two_nodes, tmp_path, "ok.yaml", "--address", two_nodes["address"], env=no_token)
    assert done.returncode == 2 and "token" in done.stderr.lower(), done.stderr[-2000:]


def test_losing_a_node_mid_run_fails_the_run_in_bounded_time(two_nodes, tmp_path, tiny_model, tiny_data):
    """The second node dies (its raylet and workers SIGKILLed) with one worker on it. The run may restart once,
    but two workers no longer fit: after scaling.resource_wait_s it fails, FAILED in MLflow, instead of
    waiting forever (Ray Train's default). The module's last test: the cluster keeps one node afterwards."""
    import psutil
    from mlflow import MlflowClient

    job = tiny_job(tmp_path, tiny_model, tiny_data,
                   scaling={"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "max_failures": 1,
                            "resource_wait_s": 20},
                   train={"epochs": None, "max_steps": 400, "checkpoint_every_steps": 10, "eval_every_steps": 10})
    path = write_job(tmp_path / "job.yaml", job)
    env = {**two_nodes["env"], "RAY_ADDRESS": two_nodes["gcs"]}
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", str(path)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    snapshot = tmp_path / "out" / "ray" / "tiny" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not (snapshot.exists() and "step_" in snapshot.read_text()) and time.monotonic() < deadline:
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        time.sleep(0.5)
    node = psutil.Process(int((two_nodes["state"] / "worker.pid").read_text()))
    for process in [node, *node.children(recursive=True)]:
        process.kill()
    lost = time.monotonic()
    out = driver.communicate(timeout=400)[0]
    print(f"node lost -> driver exited in {time.monotonic() - lost:.0f} s")
    assert driver.returncode == 1 and "training failed" in out, out[-3000:]
    assert "\x1b[" not in out, out[-3000:]  # Ray's word on the lost node: one timestamped line, plain
    assert len([line for line in out.splitlines() if "ray: The node with node id" in line]) == 1, out[-3000:]
    assert time.monotonic() - lost < 300
    state = json.loads((tmp_path / "out" / "mlflow_run.json").read_text())
    assert MlflowClient(state["tracking_uri"]).get_run(state["run_id"]).info.status == "FAILED"
    assert not (tmp_path / "out" / "adapter").exists()
