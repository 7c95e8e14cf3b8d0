"""Pure decisions for a hyperparameter search: the study's plan (trials, how many at once, the evaluation
budget), each trial's outcome from what Tune recorded, the best trial, and which rank to recommend. No Ray, no
MLflow, no torch. (Which fields may be searched and what each trial's job is: :mod:`orchestrator.spec.space`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from orchestrator.plan.batches import BatchPlan, plan_batches
from orchestrator.plan.placement import concurrency, trials_that_fit, worker_resources
from orchestrator.spec import JobSpec
from orchestrator.spec.space import num_trials, trial_spec

STOPPED_EARLY, FINISHED, FAILED = "stopped early", "finished", "failed"


@dataclass(frozen=True)
class StudyPlan:
    """How a study runs on a given cluster."""

    trials: int  # planned: the grid times num_samples, or optuna's num_samples
    fitting: int  # trials whose worker groups the cluster holds at once
    concurrency: int  # trials run at once
    max_intervals: int  # evaluations a trial may report: the schedulers' budget

    def sentence(self, spec: JobSpec) -> str:
        assert spec.tune is not None
        return (f"study {spec.name}: {self.trials} trials, {self.concurrency} at a time ({self.fitting} fit the "
                f"cluster), scheduler {spec.tune.scheduler.name}, budget {self.max_intervals} evaluations per trial")


def plan_study(spec: JobSpec, nodes: list[dict[str, float]], batches: BatchPlan) -> StudyPlan:
    """The study's plan on a cluster of ``nodes`` (each node's total resources), for the job's batch plan."""
    assert spec.tune is not None
    fitting = trials_that_fit(nodes, worker_resources(spec), spec.scaling.num_workers, spec.scaling.placement_strategy)
    planned = spec.tune.num_samples if spec.tune.search == "optuna" else num_trials(spec)
    max_intervals = spec.tune.scheduler.max_intervals or math.ceil(batches.total_steps / batches.eval_every_steps)
    return StudyPlan(planned, fitting, concurrency(spec.tune.max_concurrent_trials, fitting, planned), max_intervals)


@dataclass(frozen=True)
class TrialRecord:
    """What Tune knows about one trial after the search (including trials finished before a resume)."""

    trial_id: str
    config: dict[str, Any]
    history: list[dict[str, Any]]  # every report, in order
    error: str | None
    seconds: float  # the trial driver's time from start to its last report


@dataclass
class TrialOutcome:
    """What one trial did, as the study summary reports it."""

    trial_id: str
    config: dict[str, Any]
    status: str  # finished / stopped early / failed
    history: list[dict[str, float]] = field(default_factory=list)  # one row per evaluation: step, metric, ...
    error: str | None = None
    wall_seconds: float = 0.0  # the trial's start to its end, as Tune saw it
    train_seconds: float = 0.0  # the worker's own forward/backward/step time
    eval_seconds: float = 0.0  # the worker's own evaluation time
    run_id: str | None = None

    @property
    def overhead(self) -> float:
        """Share of the trial's wall time spent outside training and evaluation (start-up, reporting, ...)."""
        return (self.wall_seconds - self.train_seconds - self.eval_seconds) / self.wall_seconds \
            if self.wall_seconds else 0.0

    def best(self, metric: str, mode: str) -> float | None:
        values = [row[metric] for row in self.history if metric in row]
        if not values:
            return None
        return max(values) if mode == "max" else min(values)

    @property
    def steps(self) -> int:
        return int(max((row.get("step", 0) for row in self.history), default=0))


def trial_outcome(spec: JobSpec, record: TrialRecord, num_train_examples: int, run_id: str | None,
                  wall_seconds: float | None = None) -> TrialOutcome:
    """One trial's outcome: its evaluations (the reports that carry the study's metric), its status against its
    own step budget, and its times. ``wall_seconds``: the driver's clock when it saw the trial start and end,
    else (a trial that ended before a resume) Tune's."""
    assert spec.tune is not None
    history = [row for row in record.history if spec.tune.metric in row]
    total = plan_batches(trial_spec(spec, record.config, spec.output_dir, record.trial_id),
                         num_train_examples).total_steps
    steps = int(max((row.get("step", 0) for row in history), default=0))
    last = history[-1] if history else {}
    return TrialOutcome(record.trial_id, record.config, classify(steps, total, record.error is not None), history,
                        record.error, record.seconds if wall_seconds is None else wall_seconds,
                        float(last.get("train_seconds", 0.0)), float(last.get("evaluation_seconds", 0.0)), run_id)


def best_finished(outcomes: list[TrialOutcome], metric: str, mode: str) -> TrialOutcome | None:
    """The finished trial whose final evaluation is best: that is the adapter it saved."""
    scored = [o for o in outcomes if o.status == FINISHED and o.history and metric in o.history[-1]]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda o: o.history[-1][metric])


def classify(reported_steps: int, total_steps: int, errored: bool) -> str:
    """A trial's status: failed if it errored, finished if it trained every step, else stopped early."""
    if errored:
        return FAILED
    return FINISHED if reported_steps >= total_steps else STOPPED_EARLY


@dataclass(frozen=True)
class RankAdvice:
    rank: int
    value: float
    best_rank: int
    best_value: float
    tolerance: float
    per_rank: dict[int, float]

    def sentence(self, metric: str) -> str:
        if self.rank == self.best_rank:
            return f"use rank {self.rank}: it has the best {metric} ({self.value:.4f}); no smaller rank is " \
                   f"within {self.tolerance:.1%}"
        return (f"use rank {self.rank}: its best {metric} {self.value:.4f} is within {self.tolerance:.1%} of the "
                f"overall best {self.best_value:.4f} (rank {self.best_rank}) at {self.best_rank / self.rank:g}x "
                f"fewer adapter parameters")


def rank_advice(outcomes: list[TrialOutcome], base_rank: int, metric: str, mode: str,
                tolerance: float) -> RankAdvice | None:
    """The smallest LoRA rank whose best metric is within ``tolerance`` (relative) of the overall best."""
    per_rank: dict[int, float] = {}
    for outcome in outcomes:
        value = outcome.best(metric, mode)
        if value is None:
            continue
        rank = int(outcome.config.get("lora.r", base_rank))
        better = max if mode == "max" else min
        per_rank[rank] = better(per_rank.get(rank, value), value)
    if not per_rank:
        return None
    best_rank = (max if mode == "max" else min)(per_rank, key=per_rank.__getitem__)
    best = per_rank[best_rank]
    margin = abs(best) * tolerance

    def close_enough(value: float) -> bool:
        return value >= best - margin if mode == "max" else value <= best + margin

    rank = min(r for r, v in per_rank.items() if close_enough(v))
    return RankAdvice(rank, per_rank[rank], best_rank, best, tolerance, dict(sorted(per_rank.items())))
