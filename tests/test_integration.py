"""End to end on a real local Ray cluster (2 CPUs), the real DeepSpeed engine and a real MLflow store."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.console import TrainingConsole
from orchestrator.spec import spec_from_dict
from orchestrator.training import train
from tests.test_lora import _predict
from tests.tiny import tiny_job, write_job

pytestmark = pytest.mark.integration


def _train_quietly(spec):
    return train(spec, console=TrainingConsole(Console(file=io.StringIO())))


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2-embedded-store", "zero3-mlflow-server"])
def finished(request, ray_cluster, tiny_model, tiny_data, tmp_path_factory):
    """A finished 2-worker job: ZeRO-2 into the embedded SQLite store, ZeRO-3 into a real `mlflow server`."""
    root = tmp_path_factory.mktemp(f"zero{request.param}")
    uri = request.getfixturevalue("mlflow_server") if request.param == 3 else None
    spec = spec_from_dict(tiny_job(root, tiny_model, tiny_data, deepspeed={"zero_stage": request.param},
                                   tracking={"uri": uri}))
    return spec, _train_quietly(spec)


def test_two_workers_produce_an_adapter_that_plain_peft_loads_and_beats_chance(finished, tiny_model, tiny_data):
    spec, result = finished
    adapter = Path(result.adapter_dir)
    rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    labels = json.loads((adapter / "labels.json").read_text())
    accuracy = sum(labels[p] == r["label"] for p, r in zip(_predict(adapter, tiny_model, rows), rows)) / len(rows)
    assert accuracy > 0.5  # chance is 0.25
    assert accuracy == pytest.approx(result.metrics["test_accuracy"])
    assert yaml.safe_load((adapter / "orchestrator_job.yaml").read_text()) == spec.model_dump()


def test_mlflow_run_holds_params_metrics_inputs_and_artifacts(finished):
    from mlflow import MlflowClient

    spec, result = finished
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["lora.r"] == "4" and params["deepspeed.zero_stage"] == str(spec.deepspeed.zero_stage)
    assert int(params["trainable_params"]) > 0 and int(params["total_params"]) > int(params["trainable_params"])
    assert float(params["trainable_percent"]) < 100
    for metric in ("train_loss", "learning_rate", "tokens_per_s", "peak_memory_mb", "eval_accuracy", "eval_macro_f1",
                   "eval_loss"):
        history = client.get_metric_history(result.run_id, metric)
        assert len(history) >= 3, metric  # one per interval, not only a final value
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == list(range(2, 19, 2))
    assert "test_accuracy" in run.data.metrics
    contexts = {tag.value for d in run.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"}
    assert contexts == {"train", "validation", "test"} and all(d.dataset.digest for d in run.inputs.dataset_inputs)
    assert len(run.data.tags["data.train.sha256"]) == 64
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= artifacts


def test_a_failing_job_ends_its_run_failed_and_publishes_nothing(ray_cluster, job, tmp_path, capsys):
    from mlflow import MlflowClient

    bad_optimizer = tmp_path / "ds.json"  # passes our checks, fails inside DeepSpeed on the workers
    bad_optimizer.write_text(json.dumps({"optimizer": {"type": "NoSuchOptimizer", "params": {"lr": 0.1}},
                                         "zero_optimization": {"stage": 2}}))
    raw = job(deepspeed={"config": str(bad_optimizer)})
    assert main(["train", str(write_job(tmp_path / "job.yaml", raw))]) == 1
    assert "error: training failed" in capsys.readouterr().err
    state = json.loads((Path(raw["output_dir"]) / "mlflow_run.json").read_text())
    assert MlflowClient(state["tracking_uri"]).get_run(state["run_id"]).info.status == "FAILED"
    assert not (Path(raw["output_dir"]) / "adapter").exists()


def test_more_workers_than_the_cluster_can_place_is_refused_before_any_worker(ray_cluster, job, tmp_path, capsys):
    raw = job(scaling={"num_workers": 3})
    assert main(["train", str(write_job(tmp_path / "job.yaml", raw))]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err
    assert "scaling.num_workers: 3 workers (PACK) need CPU 1 per worker (cluster total 2)" in message
    assert not Path(raw["output_dir"]).exists()


def _registered_checkpoints(output_dir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (and so restores on a rerun), from its persisted snapshot."""
    snapshot = output_dir / "ray" / "tiny" / "checkpoint_manager_snapshot.json"
    try:
        return [name for name in os.listdir(snapshot.parent) if name.startswith("step_")] if json.loads(
            snapshot.read_text()).get("checkpoint_results") else []
    except (OSError, ValueError):
        return []


def test_a_killed_job_resumes_from_its_checkpoint(ray_cluster, job, tmp_path):
    from mlflow import MlflowClient

    raw = job(train={"epochs": None, "max_steps": 40, "checkpoint_every_steps": 5, "eval_every_steps": 5})
    path = write_job(tmp_path / "job.yaml", raw)
    output = Path(raw["output_dir"])
    command = [sys.executable, "-m", "orchestrator", "train", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    driver = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not _registered_checkpoints(output) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.5)
    assert _registered_checkpoints(output), driver.stdout.read().decode()[-3000:] if driver.poll() is not None else ""
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-run; Ray tears its workers down
    driver.wait()
    driver.stdout.close()
    assert not (output / "adapter").exists()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at step" in rerun.stderr
    state = json.loads((output / "mlflow_run.json").read_text())
    run = MlflowClient(state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["orchestrator.resumed_from_step"]) >= 5
    assert len(MlflowClient(state["tracking_uri"]).search_runs([run.info.experiment_id])) == 1
    assert (output / "adapter" / "adapter_model.safetensors").exists()


def test_a_killed_worker_is_restarted_from_the_checkpoint_within_max_failures(ray_cluster, job, tmp_path):
    import threading

    import psutil
    from mlflow import MlflowClient

    raw = job(train={"epochs": None, "max_steps": 40, "checkpoint_every_steps": 5, "eval_every_steps": 5},
              scaling={"max_failures": 1})
    spec = spec_from_dict(raw)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=_train_quietly(spec)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    while not _registered_checkpoints(Path(spec.output_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert len(workers) == 2, [p.info["cmdline"] for p in workers]
    workers[-1].send_signal(signal.SIGKILL)  # one worker process dies mid-run
    runner.join(timeout=300)
    result = outcome["result"]
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["orchestrator.resumed_from_step"]) >= 5
    assert Path(result.adapter_dir, "adapter_model.safetensors").exists()


def test_rerunning_a_finished_job_retrains_nothing_and_keeps_its_checkpoints(finished):
    spec, first = finished
    if spec.deepspeed.zero_stage != 2:
        pytest.skip("once is enough")
    checkpoints = sorted(p.name for p in (Path(spec.output_dir) / "ray" / "tiny").glob("step_*"))
    again = _train_quietly(spec)
    assert again.run_id == first.run_id
    assert again.metrics["test_accuracy"] == pytest.approx(first.metrics["test_accuracy"])
    assert sorted(p.name for p in (Path(spec.output_dir) / "ray" / "tiny").glob("step_*")) == checkpoints
    assert checkpoints[-1] == "step_0000018"
