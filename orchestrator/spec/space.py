"""A search space applied to a job: which fields may be searched, the points of a grid, and the job one trial runs.
Pure (pydantic only)."""

from __future__ import annotations

import difflib
import itertools
import json
import math
import random
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.spec.schema import Dimension, JobSpec, SpecError

NOT_SEARCHABLE = ("version", "name", "output_dir", "tune", "registry", "tracking", "scaling", "retrain")


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
