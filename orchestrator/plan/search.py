"""Pure decisions for a hyperparameter search: which fields may be searched, what each trial's job is, how
many trials run at once, each trial's outcome, and which rank to recommend. No Ray, no MLflow, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STOPPED_EARLY, FINISHED, FAILED = "stopped early", "finished", "failed"
























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
