"""Pure decisions for a hyperparameter search: which fields may be searched, what each trial's job is, how
many trials run at once, each trial's outcome, and which rank to recommend. No Ray, no MLflow, no torch.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import random
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.spec import Dimension, JobSpec, SpecError

NOT_SEARCHABLE = ("version", "name", "output_dir", "tune", "registry", "tracking", "scaling", "retrain")
STOPPED_EARLY, FINISHED, FAILED = "stopped early", "finished", "failed"
VARIANT = "variant"  # a dimension whose values are whole sets of {dotted field: value} (and a "label"), as compare uses


def searchable_fields() -> list[str]:
    """Every dotted leaf field of a job a search may vary (not its identity, outputs, tracking or resources)."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        paths = []
        for name, info in model.model_fields.items():
            nested = next((a for a in (info.annotation, *typing.get_args(info.annotation))
                           if isinstance(a, type) and issubclass(a, BaseModel)), None)
            paths += walk(nested, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
        return paths

    return [p for p in walk(JobSpec, "") if p.split(".")[0] not in NOT_SEARCHABLE]


def dimension_points(dimension: Dimension) -> list[Any]:
    """The values that bound a dimension: every listed value, or both ends of a range."""
    if dimension.kind in ("choice", "grid"):
        return list(dimension.args)
    low, high = dimension.args
    return [low, high - 1] if dimension.kind == "randint" else [low, high]


def check_space(spec: JobSpec) -> list[str]:
    """Problems with ``tune.space``, each naming its field: unknown or unsearchable paths, and values that
    would make an invalid job (checked at every listed value and at both ends of every range)."""
    assert spec.tune is not None
    problems, fields = [], searchable_fields()
    for path, dimension in spec.tune.space.items():
        where = f"tune.space.{path}"
        if path == VARIANT:
            values = dimension.args if dimension.kind in ("grid", "choice") else []
            bad = [v for v in values if not isinstance(v, dict) or any(k != "label" and k not in fields for k in v)]
            if not values or bad:
                problems.append(f"{where}: a grid or choice of mappings from searchable fields to values; "
                                f"not {bad[:1] or dimension.kind}")
                continue
        elif path not in fields:
            if path.split(".")[0] in NOT_SEARCHABLE:
                problems.append(f"{where}: cannot be searched (identity, outputs, tracking and resources are "
                                f"fixed for a study)")
            else:
                close = difflib.get_close_matches(path, fields, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else "searchable fields: " + ", ".join(fields)
                problems.append(f"{where}: not a job field; {hint}")
            continue
        for value in dimension_points(dimension):
            try:
                trial_spec(spec, {path: value}, spec.output_dir, "check")
            except SpecError as error:
                detail = str(error).split(": ", 1)[-1]
                problems.append(f"{where}: value {value!r} makes an invalid job: {detail}")
                break
    return problems


def trial_spec(spec: JobSpec, config: dict[str, Any], output_dir: str, trial_id: str) -> JobSpec:
    """The plain training job one trial runs: the study's job with the trial's values, its own output folder
    and run name, and no search section. Checkpoints happen at evaluations, so each report carries the metric.

    Raises:
        SpecError: the values make an invalid job.
    """
    raw = spec.model_dump()
    raw["tune"] = None
    if raw.get("retrain"):  # a retrain's search: the trial itself is a plain training run
        raw["retrain"]["challenger"] = "train"
    for path, value in config.items():
        for inner, inner_value in (variant(value).items() if path == VARIANT else [(path, value)]):
            if inner != "label":
                _set(raw, inner, inner_value)
    raw["output_dir"] = output_dir
    raw["name"] = f"{spec.name}-{trial_id}"[:64]
    raw["tracking"]["run_name"] = f"{spec.run_name()}-{trial_id}"
    train = raw["train"]
    if train["checkpoint_every_steps"] is not None and train["eval_every_steps"] is None:
        train["checkpoint_every_steps"] = None  # default: at every evaluation
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as error:
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}".replace("Value error, @", "")
                            for e in error.errors())
        raise SpecError(f"trial {trial_id}: {message}") from None


def variant(value: dict | str) -> dict[str, Any]:
    """A variant's fields; Ray Tune carries them as JSON text (it would deep-merge a mapping)."""
    return json.loads(value) if isinstance(value, str) else value


def _set(raw: dict, path: str, value: Any) -> None:
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def trials_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float], num_workers: int,
                    strategy: str) -> int:
    """How many trials' worker groups the cluster holds at once (0 if not even one fits).

    A worker cannot span nodes; PACK/SPREAD may spread a trial's workers over any nodes, STRICT_PACK keeps them
    on one node, STRICT_SPREAD puts each on a different node.
    """
    fits = [min(int(node.get(k, 0) // v) for k, v in per_worker.items() if v > 0) for node in nodes]
    if strategy == "STRICT_PACK":
        return sum(n // num_workers for n in fits)
    if strategy == "STRICT_SPREAD":
        trials = 0
        while sum(min(n, trials + 1) for n in fits) >= (trials + 1) * num_workers and trials < 10_000:
            trials += 1
        return trials
    return sum(fits) // num_workers


def concurrency(requested: str | int, fitting: int, num_trials: int) -> int:
    """Trials run at once: what the cluster holds ('auto'), or the requested cap if lower; never more than the
    trials there are. Running more than fit would leave trials waiting on each other's resources."""
    limit = fitting if requested == "auto" else min(int(requested), fitting)
    return max(1, min(limit, num_trials))


def grid_axes(spec: JobSpec) -> dict[str, list[Any]]:
    """The dimensions tried exhaustively: grid ones, and choice ones under ``search: grid``."""
    assert spec.tune is not None
    return {path: list(d.args) for path, d in spec.tune.space.items()
            if d.kind == "grid" or (spec.tune.search == "grid" and d.kind == "choice")}


def grid_points(spec: JobSpec) -> list[dict[str, Any]]:
    """Every grid combination, ``num_samples`` times, each repeat in its own seeded shuffled order.

    With early stopping the order matters: trials that start first have nothing to be compared against and
    are promoted, so a nested order (all of one learning rate first) would bias the search; a seeded shuffle
    does not, and a rerun with the same seed tries the same points in the same order.
    """
    axes = grid_axes(spec)
    if not axes:
        return []
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    points = []
    for repeat in range(spec.tune.num_samples):
        order = list(combos)
        random.Random(spec.tune.seed * 7919 + repeat).shuffle(order)
        points += order
    return points


def num_trials(spec: JobSpec) -> int:
    """Trials a random/grid search runs: the grid's size times num_samples (grid axes multiply)."""
    assert spec.tune is not None
    grid = math.prod(len(d.args) for d in spec.tune.space.values() if d.kind == "grid" or
                     (spec.tune.search == "grid" and d.kind == "choice"))
    return grid * spec.tune.num_samples


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
