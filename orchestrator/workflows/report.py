"""A study's summary files: the results table (CSV and Markdown), plots (PNG) and summary.json."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from orchestrator.plan.search import FINISHED, RankAdvice, TrialOutcome


def table_rows(outcomes: list[TrialOutcome], metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial, best first: id, status, searched values, metric (best and final), steps, times."""
    keys = sorted({k for o in outcomes for k in o.config})

    def order(o: TrialOutcome) -> float:
        best = o.best(metric, mode)
        return math.inf if best is None else (-best if mode == "max" else best)

    rows = []
    for o in sorted(outcomes, key=order):
        final = o.history[-1].get(metric) if o.history else None
        rows.append({
            "trial": o.trial_id, "status": o.status, **{k: o.config.get(k) for k in keys},
            f"best {metric}": _round(o.best(metric, mode)), f"final {metric}": _round(final),
            "evaluations": len(o.history), "steps": o.steps, "wall s": round(o.wall_seconds, 1),
            "train s": round(o.train_seconds, 1), "eval s": round(o.eval_seconds, 1),
            "overhead": f"{o.overhead:.0%}" if o.wall_seconds else "",
            "error": o.error or "",
        })
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r[h] is None else str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(folder: str | Path, outcomes: list[TrialOutcome], metric: str, mode: str,
                  best: TrialOutcome | None, advice: RankAdvice | None, extra: dict[str, Any]) -> dict[str, str]:
    """Writes results.csv, results.md, the plots and summary.json into ``folder``; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = table_rows(outcomes, metric, mode)
    paths = {"csv": folder / "results.csv", "markdown": folder / "results.md", "json": folder / "summary.json"}
    with open(paths["csv"], "w", newline="") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    paths["markdown"].write_text(markdown(rows))
    paths.update(_plots(folder, outcomes, metric, mode, advice))
    summary = {
        "metric": metric, "mode": mode,
        "best": None if best is None else {"trial": best.trial_id, "config": best.config,
                                           "value": best.history[-1].get(metric), "run_id": best.run_id},
        "rank_advice": None if advice is None else {"rank": advice.rank, "value": advice.value,
                                                    "best_rank": advice.best_rank, "best_value": advice.best_value,
                                                    "tolerance": advice.tolerance,
                                                    "per_rank": {str(k): v for k, v in advice.per_rank.items()}},
        "trials": len(outcomes),
        "finished": sum(o.status == FINISHED for o in outcomes),
        "total_steps": sum(o.steps for o in outcomes),
        "trial_times": [{"trial": o.trial_id, "status": o.status, "wall_s": round(o.wall_seconds, 1),
                         "train_s": round(o.train_seconds, 1), "eval_s": round(o.eval_seconds, 1),
                         "overhead": round(o.overhead, 3)} for o in outcomes],
        **extra,
    }
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    return {k: str(v) for k, v in paths.items()}


def _plots(folder: Path, outcomes: list[TrialOutcome], metric: str, mode: str,
           advice: RankAdvice | None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in outcomes:
        points = [(row["step"], row[metric]) for row in o.history if metric in row and "step" in row]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, linestyle="--" if o.status != FINISHED else "-",
                    label=f"{o.trial_id} ({o.status})")
    ax.set(xlabel="optimizer step", ylabel=metric, title=f"{metric} during training (dashed: stopped early)")
    if len(outcomes) <= 12:
        ax.legend(fontsize=6)
    paths["curves"] = folder / "metric_curves.png"
    fig.tight_layout()
    fig.savefig(paths["curves"], dpi=110)
    plt.close(fig)

    if advice is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        ranks = list(advice.per_rank)
        ax.plot(ranks, list(advice.per_rank.values()), marker="o")
        ax.axhline(advice.best_value * (1 - advice.tolerance if mode == "max" else 1 + advice.tolerance),
                   linestyle=":", color="gray", label=f"within {advice.tolerance:.1%} of best")
        ax.axvline(advice.rank, linestyle="--", color="green", label=f"advised rank {advice.rank}")
        ax.set(xscale="log", xlabel="LoRA rank r", ylabel=f"best {metric}", title="best metric by rank")
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.legend(fontsize=7)
        paths["rank"] = folder / "metric_by_rank.png"
        fig.tight_layout()
        fig.savefig(paths["rank"], dpi=110)
        plt.close(fig)

    scored = [(o.config["train.learning_rate"], o.config["lora.r"], o.best(metric, mode)) for o in outcomes
              if "train.learning_rate" in o.config and "lora.r" in o.config and o.best(metric, mode) is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(6, 4))
        lrs, ranks, values = zip(*scored)
        points = ax.scatter(lrs, ranks, c=values, cmap="viridis", s=60)
        fig.colorbar(points, label=f"best {metric}")
        ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="LoRA rank r",
               title="learning rate x rank")
        paths["lr_rank"] = folder / "lr_by_rank.png"
        fig.tight_layout()
        fig.savefig(paths["lr_rank"], dpi=110)
        plt.close(fig)
    return paths
