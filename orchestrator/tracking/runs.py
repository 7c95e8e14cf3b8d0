"""The driver's handling of the job's MLflow runs: the probe, the run and its inputs, trials' child runs, summaries.

The tracking package (this, :mod:`.sinks` and :mod:`.registry`) is the only code that calls MLflow.
Credentials are never passed around: MLflow reads them from the
environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.spec import JobSpec, SpecError
from orchestrator.tracking.sinks import FIRST_ANSWER_TIMEOUT_S, deliver_pending, fail_fast

RUN_STATE_FILE = "mlflow_run.json"
ADAPTER_ARTIFACT = "adapter"  # where rank 0 logs the adapter folder in the run's artifacts


def tracking_uri(spec: JobSpec) -> str:
    """The spec's URI, else $MLFLOW_TRACKING_URI, else an embedded SQLite store under the output folder."""
    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{spec.output_dir}/mlflow.db"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:") or "://" not in uri


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'lora': {'r': 8}} -> {'lora.r': '8'}: the spec as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def check_reachable(spec: JobSpec) -> str:
    """Probes the tracking store in seconds (before any cluster work); returns its URI.

    Raises:
        SpecError: naming tracking.uri when the store cannot be reached.
    """
    from mlflow import MlflowClient

    uri = tracking_uri(spec)
    if _is_embedded(uri):
        return uri  # created on first use under output_dir
    with fail_fast(FIRST_ANSWER_TIMEOUT_S):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as error:  # MlflowException, requests' ConnectionError, ...
            raise SpecError(f"tracking.uri: cannot reach the MLflow tracking store at {uri} "
                            f"({type(error).__name__}: {str(error)[:200]}); start the server or fix the URI") from None
    return uri


def start_run(spec: JobSpec, data_inputs: list[tuple[str, str, str, Any]]) -> tuple[str, str]:
    """Creates the job's run, or reopens it when this output folder already has one (a rerun resumes).

    Args:
        data_inputs: (context, source, sha256, pandas frame) per split, recorded as the run's inputs.

    Returns:
        (tracking URI, run id).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    uri = tracking_uri(spec)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        spec.tracking.experiment,
        artifact_location=Path(spec.output_dir, "mlartifacts").as_uri() if _is_embedded(uri) else None,
    )
    state_file = Path(spec.output_dir, RUN_STATE_FILE)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("tracking_uri") == uri and state.get("run_name") == spec.run_name():
            try:
                client.update_run(state["run_id"], status="RUNNING")
                return uri, state["run_id"]
            except Exception:  # the run was deleted from the store: start a new one
                pass
    tags = {**spec.tracking.tags, "orchestrator.job": spec.name, "mlflow.source.type": "JOB"}
    run = client.create_run(experiment_id, run_name=spec.run_name(), tags=tags)
    run_id = run.info.run_id
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in flatten(spec.model_dump()).items()])
    inputs = []
    for context, source, sha256, frame in data_inputs:
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{spec.name}-{context}")
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        client.set_tag(run_id, f"data.{context}.sha256", sha256)
    client.log_inputs(run_id, datasets=inputs)
    state_file.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "run_name": spec.run_name()}))
    return uri, run_id


def end_run(uri: str, run_id: str, status: str) -> bool:
    """Marks the run FINISHED, FAILED or KILLED; False (with a warning) when the store does not answer."""
    from mlflow import MlflowClient

    try:
        with fail_fast():
            MlflowClient(uri).set_terminated(run_id, status=status)
        return True
    except Exception as error:  # requests' ConnectionError, MlflowException
        print(f"warning: could not mark MLflow run {run_id} {status} at {uri} ({type(error).__name__})",
              file=sys.stderr, flush=True)
        return False


class TrackingUnavailable(RuntimeError):
    """Training finished but the tracking store did not take all of it; the message says how to record it."""


def run_url(uri: str, run_id: str) -> str:
    if uri.startswith("http"):
        from mlflow import MlflowClient

        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {uri} (open with: mlflow ui --backend-store-uri {uri})"


# ---------------------------------------------------------------------------------------------- studies

TRIAL_TAG, PARENT_TAG = "orchestrator.trial_id", "mlflow.parentRunId"


def open_store(uri: str, parent_run_id: str) -> None:
    """Imports MLflow and opens the store at ``uri`` by reading the study's parent run (a process that will create
    child runs does this once, up front)."""
    from mlflow import MlflowClient

    MlflowClient(uri).get_run(parent_run_id)


def start_trial_run(uri: str, parent_run_id: str, trial_id: str, spec: JobSpec, config: dict[str, Any]) -> str:
    """The trial's nested child run, created once per trial (by the study's ``TrialRuns`` actor, at the trial
    driver's request, never by a worker) and found again by its tag when a resumed study restarts the trial;
    what the trial's worker could not deliver before (``output_dir/mlflow_pending.jsonl``) is delivered to it
    then."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs([parent.info.experiment_id], max_results=1,
                               filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and "
                                             f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        deliver_pending(uri, run_id, spec.output_dir)
        return run_id
    tags = {**spec.tracking.tags, PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, "orchestrator.job": spec.name,
            "orchestrator.study": parent.info.run_name, "mlflow.source.type": "JOB"}
    run = client.create_run(parent.info.experiment_id, run_name=spec.run_name(), tags=tags)
    params = {**{f"trial.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in config.items()},
              **flatten(spec.model_dump())}
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    return run.info.run_id


def trial_runs(uri: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> child run id, for every trial run under the study's parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=10_000)
    return {run.data.tags[TRIAL_TAG]: run.info.run_id for run in runs if TRIAL_TAG in run.data.tags}


def end_trial_run(uri: str, run_id: str, outcome: str, error: str | None = None) -> None:
    """Records how the trial ended: 'finished' and 'stopped early' end FINISHED (tagged), 'failed' ends FAILED."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    client.set_tag(run_id, "orchestrator.trial_status", outcome)
    if error:
        client.set_tag(run_id, "orchestrator.error", error[:4000])
    client.set_terminated(run_id, status="FAILED" if outcome == "failed" else "FINISHED")


def log_study_summary(uri: str, parent_run_id: str, folder: str, metrics: dict[str, float],
                      tags: dict[str, str]) -> None:
    """The study's summary on its parent run: results table, plots and the best trial's numbers."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client, now = MlflowClient(uri), int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifacts(parent_run_id, folder, "study")


def log_decision_run(uri: str, spec: JobSpec, run_name: str, params: dict[str, str], metrics: dict[str, float],
                     tags: dict[str, str]) -> str:
    """One finished run per retrain decision: the gate's inputs as params, both metrics, the outcome as tags."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client, now = MlflowClient(uri), int(time.time() * 1000)
    experiment = client.get_experiment_by_name(spec.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.tracking.experiment)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={**spec.tracking.tags, "orchestrator.job": spec.name, "mlflow.source.type": "JOB"})
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def log_evaluation_run(uri: str, experiment: str, adapter_ref: str, data_path: str, metrics: dict[str, float],
                       folder: str | None, version: tuple[str, str] | None) -> str:
    """``orchestrator eval --log-to-mlflow``: one finished run holding the metrics and report files, tagged with
    the adapter it scored; for a registry adapter, linked both ways (the run names the model version, the
    version gets the run id and the metrics as ``orchestrator.eval.*`` tags)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client, now = MlflowClient(uri), int(time.time() * 1000)
    tags = {"orchestrator.adapter": adapter_ref, "orchestrator.eval_data": data_path, "mlflow.source.type": "JOB"}
    if version:
        tags.update({"orchestrator.model": version[0], "orchestrator.model_version": version[1]})
    run = client.create_run(experiment_id(client, uri, experiment), run_name=f"eval-{Path(data_path).stem}",
                            tags=tags)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=[RunTag("orchestrator.eval_rows", str(metrics.get("examples", "")))])
    if folder:
        client.log_artifacts(run.info.run_id, folder, "evaluation")
    client.set_terminated(run.info.run_id, status="FINISHED")
    if version:
        for key, value in {**{f"orchestrator.eval.{k}": f"{v:.6g}" for k, v in metrics.items()},
                           "orchestrator.eval.run_id": run.info.run_id}.items():
            client.set_model_version_tag(version[0], version[1], key, value)
    return run.info.run_id


def experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created if new; with an embedded SQLite store its artifacts go beside the database
    file (``mlartifacts/``), not into the current directory."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri.removeprefix("sqlite:///")).resolve().parent.joinpath("mlartifacts", name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def log_composition_run(uri: str, experiment: str, folder: str, params: dict[str, str], tags: dict[str, str]) -> str:
    """``orchestrator compose --register``: a finished run holding the composed adapter (as ``adapter``, where
    training runs keep theirs, so the registry treats it like any trained version) and how it was made."""
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, uri, experiment), run_name=f"compose-{Path(folder).name}",
                            tags={"mlflow.source.type": "JOB"})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                     tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    client.log_artifacts(run.info.run_id, folder, ADAPTER_ARTIFACT)
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
