"""``orchestrator tune``: a hyperparameter search where every trial is a full Ray Train + DeepSpeed job.

A thin driver: preflight (the job, the search space, the cluster), the study's MLflow parent run, the Tune run
(see :mod:`orchestrator.runtime.tune_launcher`), then the summary: results table and plots, rank advice, each trial's
status on its child run, and the best trial's adapter registered with the challenger alias.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan.batches import plan_batches
from orchestrator.plan.search import (
    FAILED,
    RankAdvice,
    TrialOutcome,
    best_finished,
    classify,
    plan_study,
    rank_advice,
    trial_outcome,
)
from orchestrator.spec import JobSpec, SpecError
from orchestrator.spec.space import VARIANT, trial_spec
from orchestrator.workflows.console import StudyConsole, study_console
from orchestrator.workflows.preflight import as_run_on, preflight
from orchestrator.workflows.training import data_inputs, with_local_adapter

SUMMARY_DIR = "summary"


class StudyFailed(RuntimeError):
    """No trial of the study finished; the message holds the trials' errors."""


@dataclass(frozen=True)
class StudyResult:
    outcomes: list[TrialOutcome]
    best: TrialOutcome
    advice: RankAdvice | None
    summary_dir: str
    files: dict[str, str]
    tracking_uri: str
    parent_run_id: str
    registered: tuple[str, str] | None  # (model name, version)
    concurrency: int


def tune(spec: JobSpec, resume: bool = False, verbose: bool = False, console: StudyConsole | None = None,
         check_memory: bool = True) -> StudyResult:
    """Runs (or, with ``resume``, continues) the job's search.

    Raises:
        SpecError: bad input or a cluster that cannot hold one trial, before any trial starts.
        StudyFailed: no trial finished.
    """
    from orchestrator.plan.placement import placement_problem
    from orchestrator.runtime import launcher, tune_launcher
    from orchestrator.tracking import runs as tracking
    from orchestrator.train.modeling import check_target_modules, linear_module_names

    if spec.tune is None:
        raise SpecError("tune: this job has no tune section; add one (see jobs/quickstart_search.yaml) "
                        "or run it with orchestrator train")
    checked = preflight(spec)
    labels = checked.data.label_names
    names, _ = linear_module_names(spec, len(labels) if labels else None)
    for path, dimension in spec.tune.space.items():
        if path == "lora.target_modules":
            for value in dimension.args:
                check_target_modules(spec.lora.model_copy(update={"target_modules": value}), names)
    tune_launcher.check_search_algorithm(spec)
    tracking.check_reachable(spec)
    spec = with_local_adapter(spec, checked.data.label_names)
    exists = tune_launcher.study_exists(spec)
    if exists and not resume:
        raise SpecError(f"output_dir: a study already exists in {tune_launcher.study_path(spec)}; pass --resume to "
                        "continue it, or set another output_dir")
    if resume and not exists:
        raise SpecError(f"--resume: no study to resume in {tune_launcher.study_path(spec)}; run without --resume")

    if check_memory:
        from orchestrator.plan.memory import heaviest
        from orchestrator.train.shape import model_shape

        heavy = heaviest(spec)  # the largest rank, micro-batch and length the space can pick must fit
        heavy_shape = model_shape(heavy, len(labels) if labels else None)
        if spec.scaling.device_memory_gb or spec.scaling.host_memory_gb:  # known without a cluster: before Ray
            launcher.check_memory(as_run_on(heavy, None), heavy_shape, [])
    launcher.connect(verbose)
    nodes = launcher.cluster_nodes()
    problem = placement_problem(spec, nodes)
    if problem:
        raise SpecError(f"one trial does not fit the cluster: {problem}")
    device = launcher.probe_device(spec)  # a GPU job: what its workers' GPUs are (precision, kernels, memory)
    as_run_on(spec, device)
    if check_memory and not (spec.scaling.device_memory_gb and spec.scaling.host_memory_gb):
        launcher.check_memory(as_run_on(heavy, device), heavy_shape, nodes, device)
    study = plan_study(spec, nodes, checked.plan)

    uri, parent = tracking.start_run(spec, data_inputs(checked.data))
    metric, mode = spec.tune.metric, spec.tune.direction()
    console = console or study_console(metric, mode)  # rich on a terminal, else lines (workflows.console.configure)
    console.note(study.sentence(spec))
    status = "FAILED"
    started, ended = {}, {}  # trial id -> monotonic seconds, for trials run by this driver
    steps: dict[str, int] = {}  # trial id -> the last step it reported

    def on_event(kind: str, trial_id: str, config: dict, data: dict) -> None:
        if kind == "start":
            started.setdefault(trial_id, time.monotonic())
        elif kind == "result" and "step" in data:
            steps[trial_id] = int(data["step"])
        elif kind in ("complete", "error"):
            ended[trial_id] = time.monotonic()
        if kind == "complete":  # finished, or stopped by the scheduler before its last step
            total = plan_batches(trial_spec(spec, config, spec.output_dir, trial_id), checked.train_rows).total_steps
            data = {**data, "status": classify(steps.get(trial_id, 0), total, False)}
        console(kind, trial_id, config, data)

    try:
        with console, launcher.driver_messages(getattr(console, "notice", None), verbose):
            records = tune_launcher.run_search(spec, tracking_uri=uri, parent_run_id=parent,
                                               concurrency=study.concurrency, max_intervals=study.max_intervals,
                                               on_event=on_event, resume=resume, verbose=verbose)
            runs = tracking.trial_runs(uri, parent)
            outcomes = [trial_outcome(spec, record, checked.train_rows, runs.get(record.trial_id),
                                      ended[record.trial_id] - started[record.trial_id]
                                      if record.trial_id in ended and record.trial_id in started else None)
                        for record in records]
            for outcome in outcomes:
                if outcome.run_id:
                    tracking.end_trial_run(uri, outcome.run_id, outcome.status, outcome.error)
            console.mark({o.trial_id: o.status for o in outcomes})
        best = best_finished(outcomes, metric, mode)
        if best is None:
            errors = "; ".join(f"{o.trial_id}: {o.error}" for o in outcomes if o.status == FAILED)[:2000]
            raise StudyFailed(f"no trial finished ({len(outcomes)} trials; errors: {errors or 'none'})")
        advice = None if VARIANT in spec.tune.space else \
            rank_advice(outcomes, spec.lora.r, metric, mode, spec.tune.rank_tolerance)
        folder = Path(spec.output_dir, SUMMARY_DIR)
        files = _write_summary(folder, outcomes, spec, best, advice, study.concurrency)
        registered = None
        if spec.tune.register_best:
            from orchestrator.tracking import registry

            client, name = registry.connect(uri), spec.registered_model_name()
            version = registry.register_adapter(client, name, best.run_id, _version_tags(spec, best, parent))
            with registry.promotion_lock(client, name):
                registry.move_alias(client, name, spec.registry.challenger_alias, version,
                                    f"best trial {best.trial_id} of study {spec.name}")
            registered = (name, version)
        best_value = best.history[-1][metric]
        tracking.log_study_summary(uri, parent, str(folder), {f"best_{metric}": best_value,
                                                              "trials": len(outcomes),
                                                              "total_steps": sum(o.steps for o in outcomes)},
                                   {"orchestrator.best_trial": best.trial_id,
                                    **({"orchestrator.advised_rank": str(advice.rank)} if advice else {})})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, parent, status)
    return StudyResult(outcomes, best, advice, str(folder), files, uri, parent, registered, study.concurrency)


def _write_summary(folder: Path, outcomes, spec: JobSpec, best, advice, running: int) -> dict[str, str]:
    from orchestrator.workflows.report import write_summary

    assert spec.tune is not None
    return write_summary(folder, outcomes, spec.tune.metric, spec.tune.direction(), best, advice,
                         {"study": spec.name, "scheduler": spec.tune.scheduler.name, "search": spec.tune.search,
                          "max_concurrent_trials": running,
                          "advice": advice.sentence(spec.tune.metric) if advice else None})


def _version_tags(spec: JobSpec, best: TrialOutcome, parent_run_id: str) -> dict[str, str]:
    import json

    assert spec.tune is not None
    metric = spec.tune.metric
    return {"orchestrator.study": spec.name, "orchestrator.study_run_id": parent_run_id,
            "orchestrator.trial_id": best.trial_id, "orchestrator.metric": metric,
            f"orchestrator.{metric}": repr(float(best.history[-1][metric])),
            "orchestrator.config": json.dumps(best.config, sort_keys=True),
            "base_model": spec.model.path}

