"""``orchestrator train``: preflight, cluster check, MLflow run, Ray Train run, summary. A thin driver."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator.console import TrainingConsole
from orchestrator.preflight import preflight
from orchestrator.spec import JobSpec
from orchestrator.train_loop import ADAPTER_DIR


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    tracking_uri: str
    run_id: str
    metrics: dict[str, float]


def train(spec: JobSpec, verbose: bool = False, console: TrainingConsole | None = None) -> TrainResult:
    """Trains the job's adapter on Ray Train; the MLflow run ends FINISHED, or FAILED / KILLED on error.

    Raises:
        SpecError: bad input, found before any Ray worker starts (nothing is written).
        TrainingFailed: the workers failed beyond ``scaling.max_failures``.
    """
    from orchestrator import launcher, tracking

    checked = preflight(spec)
    tracking.check_reachable(spec)
    launcher.connect(verbose)
    launcher.check_placement(spec)
    uri, run_id = tracking.start_run(spec, data_inputs(checked.data))
    status = "FAILED"
    console = console or TrainingConsole()
    try:
        with console:
            metrics = launcher.run_training(spec, uri, run_id, console, verbose)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, run_id, status)
    return TrainResult(str(Path(spec.output_dir, ADAPTER_DIR)), uri, run_id, metrics)


def data_inputs(data) -> list[tuple]:
    """(context, source, sha256, pandas frame) per split: what :func:`tracking.start_run` records as inputs."""
    import pandas as pd

    return [(split.name, split.source, split.digest, pd.DataFrame({"text": split.texts, "label": split.labels}))
            for split in (data.train, data.validation, data.test) if split is not None]
