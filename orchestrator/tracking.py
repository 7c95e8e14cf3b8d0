"""Metric sinks (MLflow on rank 0, a null sink elsewhere) and the driver's handling of the job's MLflow run.

This is the only module that calls MLflow. Credentials are never passed around: MLflow reads them from the
environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from orchestrator.spec import JobSpec, SpecError

RUN_STATE_FILE = "mlflow_run.json"


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, folder: str, artifact_path: str) -> None: ...


class NullSink:
    """What ranks other than 0 get: every call does nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, folder: str, artifact_path: str) -> None: ...


class MlflowSink:
    """Writes to an existing MLflow run (created by the driver) through ``MlflowClient``."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self._client, self._run_id = MlflowClient(tracking_uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._client.log_batch(self._run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        self._client.log_artifacts(self._run_id, folder, artifact_path)


def tracking_uri(spec: JobSpec) -> str:
    """The spec's URI, else $MLFLOW_TRACKING_URI, else an embedded SQLite store under the output folder."""
    return spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{spec.output_dir}/mlflow.db"


def _is_embedded(uri: str) -> bool:
    return uri.startswith("sqlite:") or "://" not in uri


@contextmanager
def _fail_fast():
    """MLflow retries HTTP calls for minutes by default; a preflight probe should answer in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


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
    with _fail_fast():
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


def end_run(uri: str, run_id: str, status: str) -> None:
    """Marks the run FINISHED, FAILED or KILLED; never leaves it RUNNING."""
    from mlflow import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


def run_url(uri: str, run_id: str) -> str:
    if uri.startswith("http"):
        from mlflow import MlflowClient

        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {uri} (open with: mlflow ui --backend-store-uri {uri})"
