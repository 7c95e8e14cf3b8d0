"""The promotion gate and the data snapshot rule of ``orchestrator retrain``, as pure functions.

Nothing here talks to MLflow or Ray: the driver (:mod:`orchestrator.workflows.retraining`) reads the registry,
calls these to decide, and writes the outcome back.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from orchestrator.spec import GATE_METRICS, JobSpec, RetrainSpec, SnapshotSpec, SpecError

PROMOTED, KEPT, FIRST = "promoted", "kept", "first_champion"

# Version tags written by retrain (and read by `registry` commands); every value is a string in MLflow.
TAG_DIGEST, TAG_SNAPSHOT, TAG_DECISION = "orchestrator.data_digest", "orchestrator.snapshot", "orchestrator.decision"
TAG_REASON = "orchestrator.reason"


@dataclass(frozen=True)
class Snapshot:
    name: str
    folder: str
    files: dict[str, str]  # split -> file path
    digest: str  # sha256 over the split files' names and bytes


def pick_snapshot(names: list[str], rule: SnapshotSpec) -> str:
    """The snapshot folder name the rule selects: the pinned one, else the greatest name matching the pattern.

    Raises:
        SpecError: naming retrain.data when nothing matches.
    """
    matching = sorted(n for n in names if fnmatch.fnmatchcase(n, rule.pattern))
    if rule.snapshot is not None:
        if rule.snapshot not in matching:
            raise SpecError(f"retrain.data.snapshot: '{rule.snapshot}' is not a snapshot under {rule.root} "
                            f"(matching '{rule.pattern}': {', '.join(matching[-5:]) or 'none'})")
        return rule.snapshot
    if not matching:
        raise SpecError(f"retrain.data.pattern: no folder under {rule.root} matches '{rule.pattern}' "
                        f"(found: {', '.join(sorted(names)[:8]) or 'nothing'})")
    return matching[-1]


def snapshot_job(spec: JobSpec, snapshot: Snapshot, tracking_uri: str) -> JobSpec:
    """The job that trains the challenger: the snapshot's files as data, its own output folder and run name
    (so a rerun on the same snapshot resumes instead of starting over), and the retrain job's tracking store."""
    data = spec.data.model_copy(update={"train": snapshot.files["train"],
                                        "validation": snapshot.files.get("validation"),
                                        "test": snapshot.files.get("test")})
    if data.validation is None and data.validation_split is None:
        raise SpecError("retrain.data.validation: give a validation file name, or set data.validation_split")
    if data.validation is not None and data.validation_split is not None:
        data = data.model_copy(update={"validation_split": None})
    tracking = spec.tracking.model_copy(update={"run_name": f"{spec.run_name()}-{snapshot.name}", "uri": tracking_uri})
    job = spec.model_copy(update={"data": data, "tracking": tracking,
                                  "output_dir": str(Path(spec.output_dir, "snapshots", snapshot.name))})
    if job.tune is not None:
        job = job.model_copy(update={"tune": job.tune.model_copy(update={"register_best": False})})
    return job


@dataclass(frozen=True)
class Decision:
    outcome: str  # PROMOTED, KEPT or FIRST
    promote: bool
    reason: str


def decide(rule: RetrainSpec, challenger: float, champion: float | None, champion_version: str | None) -> Decision:
    """The gate: beat the champion by the margin, or (no champion yet) reach the minimum."""
    name, direction = rule.metric, GATE_METRICS[rule.metric]
    if champion is None:
        if rule.minimum is None or (challenger >= rule.minimum if direction == "max" else challenger <= rule.minimum):
            floor = f"meets the minimum {rule.minimum:g}" if rule.minimum is not None else "no minimum set"
            return Decision(FIRST, True, f"no champion yet; challenger {name} {challenger:.4f} ({floor})")
        return Decision(KEPT, False, f"no champion yet, and challenger {name} {challenger:.4f} misses the "
                                     f"minimum {rule.minimum:g}")
    gap = challenger - champion
    if rule.better(challenger, champion):
        return Decision(PROMOTED, True, f"challenger {name} {challenger:.4f} beats champion v{champion_version} "
                                        f"{champion:.4f} by {gap:+.4f} (margin {rule.margin:g})")
    return Decision(KEPT, False, f"challenger {name} {challenger:.4f} against champion v{champion_version} "
                                 f"{champion:.4f}: {gap:+.4f}, short of the margin {rule.margin:g}")


def decision_tags(snapshot: Snapshot, rule: RetrainSpec, decision: Decision, challenger: float,
                  champion: float | None, champion_version: str | None) -> dict[str, str]:
    """What the challenger's version carries: enough to audit the decision without the run."""
    return {TAG_DIGEST: snapshot.digest, TAG_SNAPSHOT: snapshot.name, TAG_DECISION: decision.outcome,
            TAG_REASON: decision.reason, "orchestrator.metric": rule.metric,
            f"orchestrator.eval.{rule.metric}": repr(challenger), "orchestrator.margin": repr(rule.margin),
            "orchestrator.champion_version": champion_version or "",
            "orchestrator.champion_value": "" if champion is None else repr(champion)}


def history_after(history: list[str], version: str, limit: int = 50) -> list[str]:
    """The alias's version history with ``version`` appended (bounded: a model tag holds at most 5000 chars)."""
    return (history + [version])[-limit:]


def rollback_target(history: list[str], current: str | None) -> tuple[str, list[str]]:
    """The version the alias goes back to, and the history after the rollback.

    Raises:
        SpecError: when there is no earlier version to go back to.
    """
    trail = list(history)
    while trail and trail[-1] == current:
        trail.pop()  # the current holder (possibly promoted twice in a row)
    if not trail:
        raise SpecError("rollback: the alias has no previous version to go back to "
                        f"(history: {', '.join(history) or 'empty'})")
    return trail[-1], trail


def parse_history(text: str | None) -> list[str]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
