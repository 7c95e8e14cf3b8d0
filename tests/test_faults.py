"""Faults a long-running cluster meets: what a killed process leaves behind must not wedge the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_job

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IN_PROCESS = """
import json, sys, yaml
from orchestrator.train.session import LocalContext
from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import train_worker
spec = spec_from_dict(yaml.safe_load(open(sys.argv[1])))
print(json.dumps(train_worker(spec, LocalContext(sys.argv[2]), None, None)))
"""


# DeepSpeed's JIT-built ops a training job could load: CPU Adam, the shared-memory all-reduce, and the GPU ones
OPS = sorted(["cpu_adam", "deepspeed_shm_comm", "fused_adam", "fused_lamb", "fused_lion", "quantizer", "transformer"])


@pytest.mark.parametrize("deepspeed", [{"zero_stage": 2}, {"zero_stage": 2, "offload_optimizer": True}, "gpu"],
                         ids=["zero2", "zero2-offload", "gpu-job-optimizer"])  # ZeRO-3 picks its optimizer alike
def test_a_lock_left_by_a_killed_worker_does_not_block_training(job, tmp_path, deepspeed):
    # torch's JIT extension loader takes <extensions>/<op>/lock on every load and waits forever while it
    # exists; a worker killed inside that window leaves it behind. Training must load no such op. "gpu": the
    # optimizer a GPU job's DeepSpeed config names (DeepSpeed's FusedAdam would load fused_adam), run here on
    # CPU through a DeepSpeed JSON.
    if deepspeed == "gpu":
        from orchestrator.plan.batches import deepspeed_config, plan_batches
        from orchestrator.spec import spec_from_dict

        gpu = spec_from_dict(job(scaling={"use_gpu": True}))
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0,
                                    "optimizer": deepspeed_config(gpu, plan_batches(gpu, 192))["optimizer"]}))
        deepspeed = {"config": str(path)}
    extensions = tmp_path / "torch_extensions"  # with TORCH_EXTENSIONS_DIR set, op folders sit right in it
    ops = OPS
    for op in ops:
        (extensions / op).mkdir(parents=True)
        (extensions / op / "lock").touch()
    spec = write_job(tmp_path / "job.yaml", job(scaling={"num_workers": 1}, deepspeed=deepspeed,
                                                   train={"epochs": 1}))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", TRAIN_IN_PROCESS, str(spec), str(tmp_path / "ckpt")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["test_accuracy"] > 0.5
    assert sorted(os.listdir(extensions)) == ops  # nothing built, nothing waited on
    assert all(os.listdir(extensions / op) == ["lock"] for op in ops)


class _Flaky:
    """A sink whose server is down while ``down`` is set (a fake: the buffer's own logic, unit-tested)."""

    def __init__(self):
        self.down, self.delivered = False, []

    def __getattr__(self, method):
        def call(*args):
            if self.down:
                raise ConnectionError("connection refused")
            self.delivered.append((method, args))
        return call


def test_the_tracking_buffer_keeps_order_retries_on_schedule_and_bounds_what_it_keeps(tmp_path):
    from orchestrator.tracking.sinks import BufferedSink

    now = [0.0]
    inner = _Flaky()
    sink = BufferedSink(inner, str(tmp_path / "pending.jsonl"), max_pending=10, retry_every_s=5, clock=lambda: now[0])
    sink.log_metrics({"loss": 1.0}, 1)
    inner.down = True
    for step in range(2, 6):
        sink.log_metrics({"loss": 1.0 / step}, step)
    assert sink.pending == 4 and len(inner.delivered) == 1
    inner.down = False
    sink.log_metrics({"loss": 0.1}, 6)  # before retry_every_s: not even tried
    assert len(inner.delivered) == 1 and sink.pending == 5
    now[0] = 5.0
    sink.set_tags({"t": "1"})
    assert [args[1] for method, args in inner.delivered if method == "log_metrics"] == [1, 2, 3, 4, 5, 6]
    assert inner.delivered[-1] == ("set_tags", ({"t": "1"},)) and sink.pending == 0
    inner.down = True
    sink.log_artifacts("/adapter", "adapter")
    for step in range(7, 30):
        now[0] += 1
        sink.log_metrics({"loss": 0.01}, step)
    assert sink.pending == 10 and sink.dropped == 14  # the artifact call is kept; the oldest metrics go
    assert sink.close() == 11  # plus the dropped count as a tag
    lines = [json.loads(line) for line in (tmp_path / "pending.jsonl").read_text().splitlines()]
    assert lines[0] == {"call": "log_artifacts", "args": ["/adapter", "adapter"]}
    assert [line["args"][1] for line in lines if line["call"] == "log_metrics"] == list(range(21, 30))
    assert lines[-1] == {"call": "set_tags", "args": [{"orchestrator.metric_batches_dropped": "14"}]}


def test_uploads_get_a_patient_timeout_and_every_other_call_the_probes(tmp_path):
    """MLflow's per-request timeout: 5 s (an unreachable server is known in seconds) for metrics, params and
    tags, but not for an adapter's upload, which on a busy server overran 5 s and failed the rerun's delivery."""
    import os

    from orchestrator.tracking.sinks import PENDING_FILE, UPLOAD_TIMEOUT_S, BufferedSink, deliver_pending

    seen: list[tuple[str, str]] = []

    class Recording:
        def __getattr__(self, method):
            return lambda *args: seen.append((method, os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")))

    before = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    sink = BufferedSink(Recording(), str(tmp_path / "pending.jsonl"), max_pending=10, retry_every_s=1)
    sink.log_metrics({"loss": 1.0}, 1)
    sink.log_artifacts("/adapter", "adapter")
    sink.log_table({"a": [1]}, "samples.json")
    sink.set_tags({"t": "1"})
    assert seen == [("log_metrics", "5"), ("log_artifacts", f"{UPLOAD_TIMEOUT_S}"),
                    ("log_table", f"{UPLOAD_TIMEOUT_S}"), ("set_tags", "5")]
    assert os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") == before  # restored

    (tmp_path / PENDING_FILE).write_text(json.dumps({"call": "log_artifacts", "args": ["/adapter", "adapter"]}) + "\n")
    seen.clear()
    import orchestrator.tracking.sinks as sinks

    original, sinks.MlflowSink = sinks.MlflowSink, lambda uri, run_id: Recording()
    try:
        assert deliver_pending("http://127.0.0.1:1", "run", str(tmp_path)) == 1
    finally:
        sinks.MlflowSink = original
    assert seen == [("log_artifacts", f"{UPLOAD_TIMEOUT_S}")]


@pytest.mark.integration
def test_a_tracking_server_down_at_the_end_keeps_the_adapter_and_a_rerun_records_everything(ray_cluster, job,
                                                                                            tmp_path):
    import time

    from mlflow import MlflowClient

    from orchestrator.tracking.sinks import PENDING_FILE
    from tests.tiny import MlflowServer

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    uri = server.start()
    try:
        raw = job(train={"epochs": None, "max_steps": 40, "eval_every_steps": 5, "checkpoint_every_steps": 20},
                  tracking={"uri": uri, "retry_every_s": 1})
        output = Path(raw["output_dir"])
        command = [sys.executable, "-m", "orchestrator", "train", str(write_job(tmp_path / "job.yaml", raw))]
        env = {**os.environ, "RAY_ADDRESS": ray_cluster}
        driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(uri)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and driver.poll() is None:  # the first metrics are in: stop the server
            state = output / "mlflow_run.json"
            if state.exists() and client.get_metric_history(json.loads(state.read_text())["run_id"], "train_loss"):
                break
            time.sleep(0.2)
        server.stop()
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 4, out[-2000:] + err[-3000:]
        assert "MLflow is unreachable" in err and "training goes on" in err
        assert "calls wait in" in err and "rerun the same command" in err
        assert (output / "adapter" / "adapter_model.safetensors").exists() and (output / PENDING_FILE).exists()

        server.start()
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert not (output / PENDING_FILE).exists()
        run_id = json.loads((output / "mlflow_run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(2, 41, 2))
        assert sorted(m.step for m in client.get_metric_history(run_id, "eval_loss")) == list(range(5, 41, 5))
        assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(run_id, "adapter")}
    finally:
        server.stop()
