"""Ray Tune: the search space, scheduler and search algorithm as Tune objects,
and the trial driver that runs one full Ray Train job per trial.

Each trial is a small actor (it holds no CPU; it only waits on its Train controller) that builds the trial's
job with :func:`orchestrator.spec.space.trial_spec`, asks the study's :class:`TrialRuns` actor for the trial's
MLflow child run (answered beside Ray Train's start-up, not before it), and runs Ray Train's TorchTrainer
set-up (:func:`orchestrator.runtime.launcher.make_trainer`) with the spec's scaling and DeepSpeed settings.
``TuneReportCallback`` forwards every report from rank 0 (one
per evaluation) to Tune, so the scheduler sees each intermediate metric. Stopping a trial kills its actor, its
Train controller with it, and the study's placement-group watch (:mod:`orchestrator.runtime.shortcuts`; Ray
Train's own per-run cleaner on the stock path) frees the workers' resources.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from orchestrator.plan.search import TrialRecord
from orchestrator.runtime import shortcuts
from orchestrator.spec import JobSpec, SpecError
from orchestrator.spec.space import VARIANT, grid_points

TRIAL_DRIVER_MEMORY = 256 * 2**20  # logical bytes per trial actor: it must reserve something, and not a CPU


def study_path(spec: JobSpec) -> str:
    return os.path.join(spec.output_dir, "tune", spec.name)


def study_exists(spec: JobSpec) -> bool:
    from ray.tune import Tuner

    return Tuner.can_restore(study_path(spec))


def check_search_algorithm(spec: JobSpec) -> None:
    """Refuses an optional search algorithm that is not installed, before anything starts."""
    if spec.tune and spec.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SpecError("tune.search: optuna is not installed; pip install 'orchestrator[optuna]' "
                            "or use search: random") from None


def param_space(spec: JobSpec) -> dict[str, Any]:
    from ray import tune

    assert spec.tune is not None
    space = {}
    for path, dim in spec.tune.space.items():
        if path == VARIANT:  # Tune deep-merges mapping values; a variant travels as JSON text
            space[path] = tune.choice([json.dumps(v, sort_keys=True) for v in dim.args])
        elif dim.kind in ("choice", "grid"):  # grid axes come as points (search.grid_points), in a seeded order
            space[path] = tune.choice(list(dim.args))
        else:
            space[path] = getattr(tune, dim.kind)(*dim.args)
    return space


def _scheduler(spec: JobSpec, max_intervals: int):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule

    assert spec.tune is not None
    chosen = spec.tune.scheduler
    grace = min(chosen.grace_period, max_intervals)
    if chosen.name in ("asha", "hyperband"):  # hyperband: HyperBand's brackets, asynchronous (see the README)
        return AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_intervals, grace_period=grace,
                                       reduction_factor=chosen.reduction_factor,
                                       brackets=1 if chosen.name == "asha" else 3)
    if chosen.name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=grace, min_samples_required=2)
    return FIFOScheduler()


def _search_algorithm(spec: JobSpec, concurrency: int):
    from ray.tune.search import BasicVariantGenerator

    assert spec.tune is not None
    if spec.tune.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=spec.tune.seed)), max_concurrent=concurrency)
    points = [{k: json.dumps(v, sort_keys=True) if k == VARIANT else v for k, v in point.items()}
              for point in grid_points(spec)]
    return BasicVariantGenerator(points_to_evaluate=points or None, random_state=spec.tune.seed,
                                 max_concurrent=concurrency)


def _trial_entry(config: dict[str, Any], study: dict[str, Any]) -> None:
    """One trial: its job, its MLflow child run, its Ray Train run (resumed from its own checkpoints)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.runtime.launcher import TrainingFailed, make_trainer, worker_error
    from orchestrator.spec.space import trial_spec

    spec = JobSpec.model_validate(study["spec"])
    trial_id = ray.tune.get_context().get_trial_id()
    trial = trial_spec(spec, config, os.path.join(spec.output_dir, "trials", trial_id), trial_id)
    # The study's run keeper opens the child run beside Ray Train's start-up, not before it: the workers get the
    # run id as an object ref and read it when they open their sink.
    run_id = study["runs"].start.remote(trial_id, trial, config)
    watch = study["placement_groups"]  # None on the stock path: Ray Train's own cleaner guards the trial
    callbacks = [TuneReportCallback()] + ([shortcuts.watched_by(watch)] if watch is not None else [])
    trainer = make_trainer(trial, {"spec": trial.model_dump(), "progress": None, "tracking_uri": study["tracking_uri"],
                                   "run_id": run_id}, trial_id, study["verbose"], callbacks=callbacks,
                           fast=study["fast"])
    try:
        trainer.fit()
    except Exception as error:
        raise TrainingFailed(worker_error(error)) from None


class TrialRuns:
    """The one place a study's MLflow child runs are created (a Ray actor on the driver's node, since an
    embedded store is a path there): it imports MLflow and opens the store once per study, where a task per
    trial cost a fresh process doing both (~2.7 s of CPU per trial, measured)."""

    def __init__(self, tracking_uri: str, parent_run_id: str):
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id

    def ready(self) -> None:
        """Imports MLflow and opens the store (reading the parent run), before the first trial starts."""
        from orchestrator.tracking import runs

        runs.open_store(self.tracking_uri, self.parent_run_id)

    def start(self, trial_id: str, trial: JobSpec, config: dict[str, Any]) -> str:
        from orchestrator.tracking import runs as tracking

        return tracking.start_trial_run(self.tracking_uri, self.parent_run_id, trial_id, trial, config)


def _events_class():
    from ray import tune

    class Events(tune.Callback):
        """Forwards trial events to the driver's handler; pickled (in Tune's saved state) without it."""

        def __init__(self, handler):
            self.handler = handler

        def __getstate__(self):
            return {"handler": None}

        def __setstate__(self, state):  # unpickled by Tuner.restore in the driver: the resuming driver's handler
            self.handler = _resume_handler[0] if _resume_handler else None

        def _send(self, kind, trial, data):
            if self.handler is not None:
                self.handler(kind, trial.trial_id, trial.config, data)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._send("start", trial, {})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._send("result", trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._send("complete", trial, {})

        def on_trial_error(self, iteration, trials, trial, **info):
            self._send("error", trial, {"error": _trial_error(trial)})

    return Events


def _trial_error(trial) -> str:
    """The failed trial's error as :func:`orchestrator.runtime.launcher.worker_error` tells it (its last line)."""
    from orchestrator.runtime.launcher import worker_error

    try:
        error = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - the error file is unreadable: the summary still has the error
        return "error (see the trial's error file)"
    return worker_error(error) if error is not None else "error"


_resume_handler: list = []  # the handler a restored study's Events take (set by run_search before the restore)


def _Events(handler):  # noqa: N802 - builds the Tune callback class lazily so importing us does not import Ray
    return _events_class()(handler)


def run_search(spec: JobSpec, *, tracking_uri: str, parent_run_id: str, concurrency: int, max_intervals: int,
               on_event: Callable[[str, str, dict[str, Any], dict[str, Any]], None], resume: bool,
               verbose: bool = False) -> list[TrialRecord]:
    """Runs (or resumes) the study; returns every trial's record. ``on_event(kind, trial_id, config, data)``
    hears 'start', 'result', 'complete' and 'error' as they happen."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the console's trial table replaces Tune's own output
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C ends the study as KILLED, resumable
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # a resumed study knows of trials ended >5 s earlier
    from ray import tune

    from orchestrator.runtime.launcher import start_beside_driver, start_placement_group_watch, worker_error

    assert spec.tune is not None
    fast = shortcuts.enabled()  # decided here, once: trial actors need not share the driver's environment
    study = {"spec": spec.model_dump(), "tracking_uri": tracking_uri, "verbose": verbose, "fast": fast,
             # MLflow imported and the store opened once, before the first trial (an embedded store is a path on
             # the driver's node, hence soft=False)
             "runs": start_beside_driver(TrialRuns, tracking_uri, parent_run_id, soft=False),
             # one watch for the study's placement groups; the stock path keeps Ray Train's cleaner per trial
             "placement_groups": start_placement_group_watch() if fast else None}
    trainable = tune.with_resources(tune.with_parameters(_trial_entry, study=study),
                                    {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    run_config = tune.RunConfig(name=spec.name, storage_path=os.path.dirname(study_path(spec)), verbose=0,
                                callbacks=[_Events(on_event)], failure_config=tune.FailureConfig(max_failures=0))
    if resume:
        _resume_handler[:] = [on_event]  # the saved callbacks were pickled without their handler
        try:
            tuner = tune.Tuner.restore(study_path(spec), trainable, resume_unfinished=True, resume_errored=True)
        finally:
            _resume_handler.clear()
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.tune.metric, mode=spec.tune.direction(),
                                        num_samples=len(grid_points(spec)) or spec.tune.num_samples,
                                        scheduler=_scheduler(spec, max_intervals),
                                        search_alg=_search_algorithm(spec, concurrency)),
            run_config=run_config,
        )
    grid = tuner.fit()
    records = []
    for result in grid:
        frame = result.metrics_dataframe
        history = frame.to_dict("records") if frame is not None else []
        trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).split("_")[-2]
        error = worker_error(result.error) if result.error else None
        seconds = float((result.metrics or {}).get("time_total_s", 0.0))
        records.append(TrialRecord(str(trial_id), dict(result.config or {}), history, error, seconds))
    return records
