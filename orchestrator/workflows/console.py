"""The driver's console: a progress bar with step, loss, eval metric, throughput and ETA."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingConsole:
    """Consumes the training loop's progress events (see ``WorkerContext.progress``)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval {task.fields[accuracy]}"),
            TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task = None

    def __enter__(self) -> TrainingConsole:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            if self._task is None:
                self._task = self._progress.add_task("train", total=event["total"], completed=event["step"],
                                                     loss="-", accuracy="-", rate="-")
            else:  # Ray restarted the workers from a checkpoint
                self._progress.update(self._task, completed=event["step"])
            note = f" (resuming at step {event['step']})" if event["step"] else ""
            if event["step"] == event["total"]:
                note = f" (already trained to step {event['step']}: evaluating and saving again)"
            self.console.print(f"training {event['trainable']:,} of {event['total_params']:,} parameters "
                               f"({100 * event['trainable'] / event['total_params']:.2f}%){note}"
                               + (f"; {event['computes']}" if event.get("computes") else ""))
        elif self._task is None:
            return
        elif kind == "step":
            self._progress.update(self._task, completed=event["step"], loss=f"{event['train_loss']:.4f}",
                                  rate=f"{event['samples_per_s']:.0f}")
        elif kind == "eval" and "eval_accuracy" in event:
            self._progress.update(self._task, completed=event["step"], accuracy=f"acc {event['eval_accuracy']:.3f}")
            self.console.print(f"step {event['step']}/{event['total']}: eval loss {event['eval_loss']:.4f}  "
                               f"accuracy {event['eval_accuracy']:.4f}  macro-F1 {event['eval_macro_f1']:.4f}")
        elif kind == "eval":  # a causal LM
            self._progress.update(self._task, completed=event["step"], accuracy=f"ppl {event['eval_perplexity']:.2f}")
            self.console.print(f"step {event['step']}/{event['total']}: eval loss {event['eval_loss']:.4f}  "
                               f"perplexity {event['eval_perplexity']:.3f}")
        elif kind == "warning":
            self.console.print(f"warning: {event['text']}", markup=False, soft_wrap=True)
        elif kind == "samples":
            when = "base model" if event["step"] == 0 else f"step {event['step']}"
            for prompt, completion in event["samples"]:
                answer = " ".join(completion.split())[:160]
                self.console.print(f"  sample ({when}): {prompt[:80]} -> {answer}", markup=False, soft_wrap=True)


class StudyConsole:
    """A live trial table for ``orchestrator tune``: status, searched values, evaluations, latest and best metric."""

    def __init__(self, metric: str, mode: str, console: Console | None = None):
        from rich.live import Live

        self.console = console or Console(stderr=True)
        self.metric, self.mode = metric, mode
        self.trials: dict[str, dict[str, Any]] = {}
        self._live = Live(self._table(), console=self.console, refresh_per_second=2, transient=False)

    def __enter__(self) -> StudyConsole:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self._table())
        self._live.stop()
        self.console.print()

    def __call__(self, kind: str, trial_id: str, config: dict[str, Any], data: dict[str, Any]) -> None:
        row = self.trials.setdefault(trial_id, {"config": config, "status": "pending", "evals": 0, "latest": None,
                                                "best": None, "step": 0})
        if kind == "start":
            row["status"] = "running"
        elif kind == "result" and self.metric in data:
            value = float(data[self.metric])
            row.update(evals=row["evals"] + 1, latest=value, step=int(data.get("step", 0)))
            better = max if self.mode == "max" else min
            row["best"] = value if row["best"] is None else better(row["best"], value)
        elif kind == "complete":
            row["status"] = "ended"
        elif kind == "error":
            row["status"] = "[red]failed"
        self._live.update(self._table())

    def mark(self, statuses: dict[str, str]) -> None:
        """Final statuses (finished / stopped early / failed) once the study knows them."""
        for trial_id, status in statuses.items():
            if trial_id in self.trials:
                self.trials[trial_id]["status"] = status

    def _table(self):
        from rich.table import Table

        table = Table(title=f"trials ({self.metric}, {self.mode})", expand=False)
        keys = sorted({k for row in self.trials.values() for k in row["config"]})
        for column in ("trial", "status", *keys, "evals", "step", "latest", "best"):
            table.add_column(column, justify="right" if column not in ("trial", "status") else "left",
                             no_wrap=column in ("trial", "status"))
        for trial_id, row in self.trials.items():
            shown = [_short(row["config"].get(k)) for k in keys]
            table.add_row(trial_id, row["status"], *shown, str(row["evals"]), str(row["step"]),
                          _short(row["latest"]), _short(row["best"]))
        return table


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
