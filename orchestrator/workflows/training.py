"""``orchestrator train``: preflight, cluster check, MLflow run, Ray Train run, summary. A thin driver."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import JobSpec
from orchestrator.train.loop import ADAPTER_DIR
from orchestrator.workflows.console import TrainingConsole, training_console
from orchestrator.workflows.preflight import as_run_on, preflight


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    tracking_uri: str
    run_id: str
    metrics: dict[str, float]


def train(spec: JobSpec, verbose: bool = False, console: TrainingConsole | None = None,
          check_memory: bool = True) -> TrainResult:
    """Trains the job's adapter on Ray Train; the MLflow run ends FINISHED, or FAILED / KILLED on error.

    Raises:
        SpecError: bad input, found before any Ray worker starts (nothing is written), including a job whose
            memory estimate exceeds a worker's device or a node's RAM (unless ``check_memory`` is False).
        TrainingFailed: the workers failed beyond ``scaling.max_failures``.
        TrackingUnavailable: trained, but the tracking store stopped answering; the adapter is on disk.
    """
    from orchestrator.runtime import launcher
    from orchestrator.tracking import runs as tracking
    from orchestrator.tracking import sinks

    checked = preflight(spec)
    tracking.check_reachable(spec)
    known = spec.scaling.device_memory_gb or spec.scaling.host_memory_gb  # without a cluster: refuse before Ray
    if check_memory and known:
        launcher.check_memory(checked.planned, checked.shape, [])
    spec = with_local_adapter(spec, checked.data.label_names)
    launcher.connect(verbose)
    launcher.check_placement(spec)
    device = launcher.probe_device(spec)  # a GPU job: what its workers' GPUs are (precision, kernels, memory)
    planned = as_run_on(spec, device)
    if check_memory and not (spec.scaling.device_memory_gb and spec.scaling.host_memory_gb):
        launcher.check_memory(planned, checked.shape, launcher.cluster_nodes(), device)
    uri, run_id = tracking.start_run(spec, data_inputs(checked.data))
    sinks.deliver_pending(uri, run_id, spec.output_dir)  # what an earlier run could not deliver
    status = "FAILED"
    console = console or training_console()  # rich on a terminal, else lines (workflows.console.configure)
    try:
        with console, launcher.driver_messages(getattr(console, "notice", None), verbose):
            metrics = launcher.run_training(spec, uri, run_id, console, verbose)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        recorded = tracking.end_run(uri, run_id, status)
    adapter = str(Path(spec.output_dir, ADAPTER_DIR))
    pending = Path(spec.output_dir, sinks.PENDING_FILE)
    if pending.exists() or not recorded:
        raise tracking.TrackingUnavailable(
            f"trained; the adapter is at {adapter}, but the MLflow store at {uri} did not answer at the end"
            + (f" ({len(pending.read_text().splitlines())} calls wait in {pending})" if pending.exists() else "")
            + ". When it is back, rerun the same command: it trains nothing and records the run.")
    return TrainResult(adapter, uri, run_id, metrics)


def with_local_adapter(spec: JobSpec, label_names: list[str] | None) -> JobSpec:
    """The spec with ``model.adapter`` as a local folder: a registry URI (models:/NAME@alias) is downloaded
    once into ``output_dir/start_adapter`` by the driver, so every worker reads the same files."""
    if not spec.model.adapter:
        return spec
    from orchestrator.tracking import registry
    from orchestrator.tracking import runs as tracking
    from orchestrator.train.modeling import check_adapter_labels

    folder = registry.resolve_adapter(spec.model.adapter, tracking.tracking_uri(spec),
                                      str(Path(spec.output_dir, "start_adapter")))
    if label_names:
        check_adapter_labels(folder, label_names)
    return spec.model_copy(update={"model": spec.model.model_copy(update={"adapter": folder})})


def data_inputs(data) -> list[tuple]:
    """(context, source, sha256, pandas frame) per split: what :func:`tracking.start_run` records as inputs."""
    import pandas as pd

    def frame(split):
        if hasattr(split, "records"):  # causal LM: one column per field, chat messages as JSON text
            return pd.DataFrame([{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()}
                                 for r in split.records])
        return pd.DataFrame({"text": split.texts, "label": split.labels})

    return [(split.name, split.source, split.digest, frame(split))
            for split in (data.train, data.validation, data.test) if split is not None]
