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
from orchestrator.spec import spec_from_dict
from orchestrator.workflows.console import TrainingConsole
from orchestrator.workflows.training import train
from tests.test_lora import _predict
from tests.tiny import tiny_job, train_workers, write_job

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


# Long enough that a stop sent at the first checkpoint lands mid-run: at 40 steps a SIGTERM once arrived after
# the last step (tiny steps take ~70 ms once reports stop waiting on a slow controller poll).
LONG = {"epochs": None, "max_steps": 100, "checkpoint_every_steps": 5, "eval_every_steps": 5}


def _last_checkpoint_step(output: Path) -> int:
    """The newest checkpoint in Ray Train's persisted snapshot: what a rerun restores (a step_ folder can exist
    before Ray has registered it)."""
    snapshot = output / "ray" / "tiny" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text()).get("checkpoint_results") or []
    except (OSError, ValueError):
        return 0
    return max((int(r["checkpoint_dir_name"].split("_")[1]) for r in results), default=0)


def _wait_for_checkpoint(output: Path, after: int, driver=None, seconds: float = 240) -> int:
    deadline = time.monotonic() + seconds
    while _last_checkpoint_step(output) <= after and time.monotonic() < deadline:
        assert driver is None or driver.poll() is None, driver.stdout.read().decode()[-3000:]
        time.sleep(0.5)
    assert _last_checkpoint_step(output) > after
    return _last_checkpoint_step(output)


def _wait_until_no_workers(seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while train_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not train_workers(), "training workers outlived their driver"


def _assert_metric_steps_whole(client, run_id: str, resumed_from: int) -> None:
    """Every logged step is there; only the replayed interval (after the restored checkpoint) appears twice."""
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert set(steps) == set(range(2, LONG["max_steps"] + 1, 2)), steps
    assert all(step > resumed_from for step in steps if steps.count(step) > 1), (resumed_from, steps)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny_model, tiny_data, tmp_path_factory):
    """The LONG two-worker job run once without faults: what an interrupted run must end up matching."""
    spec = spec_from_dict(tiny_job(tmp_path_factory.mktemp("uninterrupted"), tiny_model, tiny_data, train=LONG))
    return _train_quietly(spec).metrics


def test_a_stopped_driver_ends_its_run_killed_and_a_rerun_resumes(ray_cluster, job, tmp_path, uninterrupted):
    """SIGTERM (a scheduler's stop) ends the run KILLED, stops the workers and keeps the checkpoints; a rerun
    resumes. SIGKILL of the driver's whole process group (a crash) loses nothing a checkpoint holds either."""
    from mlflow import MlflowClient

    raw = job(train=LONG)
    path = write_job(tmp_path / "job.yaml", raw)
    output = Path(raw["output_dir"])
    command = [sys.executable, "-m", "orchestrator", "train", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}

    def start():
        return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    driver = start()
    first = _wait_for_checkpoint(output, 0, driver)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) == 128 + signal.SIGTERM
    assert "rerun the same job to resume" in driver.stdout.read().decode()
    driver.stdout.close()
    state = json.loads((output / "mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    assert _last_checkpoint_step(output) >= first and not (output / "adapter").exists()
    _wait_until_no_workers()

    driver = start()  # resumes, then crashes outright after one more checkpoint
    _wait_for_checkpoint(output, first, driver)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    driver.stdout.close()
    assert not (output / "adapter").exists()
    _wait_until_no_workers()

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at step" in rerun.stderr
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["orchestrator.resumed_from_step"]) > first
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert (output / "adapter" / "adapter_model.safetensors").exists()
    assert run.data.metrics["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], rel=0.02, abs=0.02)


@pytest.mark.parametrize("max_failures", [1, 0])
def test_a_killed_worker_is_restarted_from_the_checkpoint_within_max_failures(ray_cluster, job, tmp_path,
                                                                              max_failures, uninterrupted):
    import threading

    from mlflow import MlflowClient

    from orchestrator.runtime.launcher import TrainingFailed

    spec = spec_from_dict(job(train=LONG, scaling={"max_failures": max_failures}))
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = _train_quietly(spec)
        except TrainingFailed as error:
            outcome["error"] = error

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    _wait_for_checkpoint(Path(spec.output_dir), 0)
    workers = train_workers()
    assert len(workers) == 2, [p.info["cmdline"] for p in workers]
    workers[-1].send_signal(signal.SIGKILL)  # one worker process dies mid-run
    runner.join(timeout=300)
    assert not runner.is_alive()
    state = json.loads((Path(spec.output_dir) / "mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    if max_failures == 0:
        assert "error" in outcome and "died" in str(outcome["error"]).lower(), outcome
        assert run.info.status == "FAILED"
        assert not (Path(spec.output_dir) / "adapter").exists()
        return
    assert run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["orchestrator.resumed_from_step"])
    assert resumed_from >= 5 and resumed_from % 5 == 0
    assert Path(outcome["result"].adapter_dir, "adapter_model.safetensors").exists()
    _assert_metric_steps_whole(client, state["run_id"], resumed_from)
    assert run.data.metrics["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], rel=0.02, abs=0.02)


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
