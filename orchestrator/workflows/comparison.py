"""``orchestrator compare``: fine-tuning methods side by side on the user's own job, measured.

Each method is one trial of a Ray Tune grid (the ``variant`` dimension: a set of spec fields per trial), so
methods run in parallel where the cluster holds them, each through the same Ray Train + DeepSpeed loop, on the
same data for the same number of steps, with no early stopping. The study's MLflow parent run gets one child
run per method and the comparison files. What cannot run here (QLoRA without a CUDA GPU, prefix tuning on a
model that takes no ``past_key_values``) is skipped with its reason, never silently.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.spec import JobSpec, SpecError
from orchestrator.spec.space import VARIANT, trial_spec, variant

# Learning rates typical of each method when the variant gives none (LoRA and QLoRA use the job's own):
# full fine-tuning of BERT-size models 2e-5..5e-5; IA3 3e-3 (Liu et al. 2022); prompt tuning 3e-2 and prefix
# tuning 1e-2 (PEFT's examples).
DEFAULT_LR = {"full": 5e-5, "ia3": 3e-3, "prompt": 3e-2, "prefix": 1e-2}
OPTIONS = {"r": "lora.r", "alpha": "lora.alpha", "lr": "train.learning_rate", "tokens": "method.num_virtual_tokens"}
COMPARE_DIR = "compare"


@dataclass(frozen=True)
class Variant:
    label: str  # as the user wrote it, e.g. lora:r=16
    fields: dict[str, Any]  # dotted spec field -> value

    def as_config(self) -> dict[str, Any]:
        return {"label": self.label, **self.fields}


@dataclass
class Comparison:
    rows: list[dict[str, Any]]
    skipped: dict[str, str]  # label -> reason
    files: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""
    parent_run_id: str = ""


def parse_methods(text: str, spec: JobSpec) -> list[Variant]:
    """``full,lora:r=8,lora:r=16:lr=1e-3,prefix,prompt:tokens=30,ia3,qlora``: one variant per comma-separated
    method, options after colons (r, alpha, lr, tokens).

    Raises:
        SpecError: an unknown method or option, a value that is not a number, a repeated label.
    """
    from orchestrator.spec import FINETUNE_METHODS

    variants = []
    for label in [part.strip() for part in text.split(",") if part.strip()]:
        name, *options = label.split(":")
        if name not in FINETUNE_METHODS:
            raise SpecError(f"--methods: '{name}' is not one of {', '.join(FINETUNE_METHODS)}")
        fields: dict[str, Any] = {"method.name": name}
        if name in DEFAULT_LR:
            fields["train.learning_rate"] = DEFAULT_LR[name]
        for option in options:
            key, _, value = option.partition("=")
            if key not in OPTIONS:
                raise SpecError(f"--methods: {label}: option '{key}' is not one of {', '.join(OPTIONS)} "
                                "(e.g. lora:r=16)")
            try:
                number = float(value)
            except ValueError:
                raise SpecError(f"--methods: {label}: {key}={value!r} is not a number") from None
            fields[OPTIONS[key]] = int(number) if key in ("r", "tokens") else number
        variants.append(Variant(label, fields))
    labels = [v.label for v in variants]
    if not variants or len(set(labels)) != len(labels):
        raise SpecError(f"--methods: give distinct methods, e.g. full,lora:r=8,lora:r=16,prompt,ia3 (got '{text}')")
    return variants


def runnable(spec: JobSpec, variants: list[Variant], num_labels: int | None) -> tuple[list[Variant], dict[str, str]]:
    """The variants that can run on this cluster and job, and the reason each other one cannot."""
    from orchestrator.train.shape import model_shape

    ok, skipped = [], {}
    for candidate in variants:
        try:
            trial = trial_spec(spec, {VARIANT: candidate.as_config()}, spec.output_dir, "check")
            model_shape(trial, num_labels)  # e.g. prefix tuning on a model without past_key_values
        except SpecError as error:
            skipped[candidate.label] = str(error).removeprefix("trial check: ").lstrip(": ")
            continue
        ok.append(candidate)
    return ok, skipped


def study_spec(spec: JobSpec, variants: list[Variant]) -> JobSpec:
    """The job as a grid study over the variants: same data, same steps, no early stopping, nothing registered."""
    from orchestrator.spec import spec_from_dict

    raw = spec.model_dump()
    metric = "eval_loss" if spec.model.task == "causal_lm" else "eval_accuracy"
    raw["tune"] = {"space": {VARIANT: {"grid": [v.as_config() for v in variants]}}, "metric": metric,
                   "search": "grid", "scheduler": {"name": "fifo"}, "register_best": False,
                   "max_concurrent_trials": "auto"}
    raw["output_dir"] = str(Path(spec.output_dir, COMPARE_DIR))
    raw["tracking"]["run_name"] = f"{spec.run_name()}-compare"
    raw["retrain"] = None
    return spec_from_dict(raw)


def compare(spec: JobSpec, methods: str, verbose: bool = False, check_memory: bool = True) -> Comparison:
    """Trains every runnable method and writes the comparison (Markdown, CSV, PNG) into
    ``output_dir/compare/`` and onto the study's MLflow parent run.

    Raises:
        SpecError: bad methods, or none of them can run here.
    """
    from orchestrator.tracking import runs as tracking
    from orchestrator.train.tasks import load_data
    from orchestrator.workflows.tuning import tune

    variants = parse_methods(methods, spec)
    labels = load_data(spec).label_names if spec.model.task == "sequence_classification" else None
    ok, skipped = runnable(spec, variants, len(labels) if labels else None)
    if not ok:
        raise SpecError("--methods: none of them can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    study = study_spec(spec, ok)
    result = tune(study, verbose=verbose, check_memory=check_memory)
    metric = study.tune.metric
    rows = comparison_rows(result.outcomes, metric, bool(spec.data.test), spec.train.learning_rate)
    folder = Path(study.output_dir, COMPARE_DIR)
    files = write_comparison(folder, rows, skipped, metric)
    tracking.log_study_summary(result.tracking_uri, result.parent_run_id, str(folder), {},
                               {"orchestrator.compared": ",".join(v.label for v in variants)})
    return Comparison(rows, skipped, files, result.tracking_uri, result.parent_run_id)


def comparison_rows(outcomes, metric: str, has_test: bool, job_lr: float) -> list[dict[str, Any]]:
    """One row per method: share of parameters trained, peak memory per worker, wall and training time, the
    task metric (validation, and test when the job has a test set), and each relative to full fine-tuning."""
    task_metric = metric.removeprefix("eval_")
    rows = []
    for o in outcomes:
        last = o.history[-1] if o.history else {}
        fields = variant(o.config.get(VARIANT, {}))
        trainable, total = last.get("trainable_params"), last.get("total_params")
        memory = max((row.get("train_memory_mb", 0.0) for row in o.history), default=None)
        row = {"method": fields.get("label", o.trial_id), "status": o.status,
               "learning rate": fields.get("train.learning_rate", job_lr),
               "trainable params": int(trainable) if trainable else None,
               "trained %": round(100 * trainable / total, 3) if trainable and total else None,
               "peak memory MiB": round(memory) if memory else None,
               "wall s": round(o.wall_seconds, 1), "train s": round(o.train_seconds, 1),
               f"val {task_metric}": _round(last.get(metric))}
        if has_test:
            row[f"test {task_metric}"] = _round(last.get(f"test_{task_metric}"))
        rows.append(row)
    full = next((r for r in rows if r["method"].split(":")[0] == "full" and r["status"] == "finished"), None)
    key = f"test {task_metric}" if has_test else f"val {task_metric}"
    for row in rows:
        relative = full is not None and row[key] is not None and full[key]
        row[f"{key} vs full"] = round(row[key] / full[key], 3) if relative else None
        row["memory vs full"] = round(row["peak memory MiB"] / full["peak memory MiB"], 3) \
            if full and row["peak memory MiB"] and full["peak memory MiB"] else None
        row["wall vs full"] = round(row["wall s"] / full["wall s"], 3) if full and full["wall s"] else None
    return rows


def _round(value) -> float | None:
    return None if value is None else round(float(value), 4)


def write_comparison(folder: Path, rows: list[dict[str, Any]], skipped: dict[str, str], metric: str
                     ) -> dict[str, str]:
    """comparison.md (the table, then each skipped method and why), comparison.csv and comparison.png."""
    from orchestrator.workflows.report import markdown

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "comparison.md", "csv": folder / "comparison.csv", "png": folder / "comparison.png"}
    text = markdown(rows)
    if skipped:
        text += "\n" + "\n".join(f"- **{label}** skipped: {reason}" for label, reason in skipped.items()) + "\n"
    paths["markdown"].write_text(text)
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _chart(paths["png"], rows, metric)
    return {k: str(v) for k, v in paths.items()}


def _chart(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_metric = metric.removeprefix("eval_")
    score = next((k for k in (f"test {task_metric}", f"val {task_metric}") if k in rows[0]), f"val {task_metric}")
    panels = [(score, score), ("trained %", "parameters trained (%)"), ("peak memory MiB", "peak memory per "
                                                                                           "worker (MiB)"),
              ("wall s", "wall time (s)")]
    labels = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(14, 0.5 * len(rows) + 2), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] or 0 for r in rows]
        ax.barh(labels, values, color=["#777" if r["method"].startswith("full") else "#3a7" for r in rows])
        ax.set_title(title, fontsize=9)
        if key == "trained %":
            ax.set_xscale("log")
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:g}", va="center", fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("fine-tuning methods on the same job, same data, same steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
