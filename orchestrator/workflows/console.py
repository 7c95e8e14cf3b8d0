"""The driver's console: on a terminal, a progress bar (step, loss, eval metric, throughput, ETA) and a live
trial table; elsewhere (pod logs, cron mail, CI) timestamped lines, plain or JSON (:mod:`.log_lines`).

The choice is made once, by the CLI (:func:`configure`: ``--log-format``, ``--progress-every``); the workflows
build their console with :func:`training_console` / :func:`study_console` when none is injected, so a workflow
that calls another (retrain calls train and tune) honours it too.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orchestrator.workflows.log_lines import LineWriter, Notices, PlainCounter, PlainStudyConsole, PlainTrainingConsole

__all__ = ["LOG_FORMATS", "OutputChoice", "StudyConsole", "TrainingConsole", "TrialBoard", "configure", "counter",
           "log_format", "milestone", "study_console", "training_console"]

LOG_FORMATS = ("auto", "rich", "plain", "json")


@dataclass(frozen=True)
class OutputChoice:
    """How the driver shows progress. ``auto``: rich on a terminal, plain lines otherwise."""

    format: str = "auto"
    progress_every_s: float = 30.0  # plain/json: at most one training-progress line per this many seconds; 0: all


_choice = [OutputChoice()]


def configure(format: str = "auto", progress_every_s: float = 30.0) -> OutputChoice:
    """Sets the output of every console built from now on (the CLI calls it once per command)."""
    if format not in LOG_FORMATS:
        raise ValueError(f"--log-format: one of {', '.join(LOG_FORMATS)}, not {format!r}")
    if progress_every_s < 0:
        raise ValueError(f"--progress-every: seconds >= 0, not {progress_every_s}")
    _choice[0] = OutputChoice(format, float(progress_every_s))
    return _choice[0]


def log_format(stream=None) -> str:
    """The configured format resolved against the real stream: ``auto`` is rich only if it is a terminal."""
    chosen = _choice[0].format
    if chosen != "auto":
        return chosen
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "rich" if isatty is not None and isatty() else "plain"


def training_console():
    """The console :func:`orchestrator.workflows.training.train` uses when none is injected."""
    chosen = log_format()
    if chosen == "rich":
        return TrainingConsole()
    return PlainTrainingConsole(LineWriter(chosen), _choice[0].progress_every_s)


def study_console(metric: str, mode: str):
    """The console :func:`orchestrator.workflows.tuning.tune` uses when none is injected."""
    chosen = log_format()
    if chosen == "rich":
        return StudyConsole(metric, mode)
    return PlainStudyConsole(LineWriter(chosen), TrialBoard(metric, mode))


class _BarCounter:
    """:class:`PlainCounter`'s calls on a terminal: a transient rich bar."""

    def __init__(self, label: str):
        self._progress, self.label, self._task = Progress(transient=True), label, None

    def start(self, total: int) -> None:
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=total)

    def advance(self, rows: int) -> None:
        self._progress.advance(self._task, rows)

    def stop(self) -> None:
        self._progress.stop()


@contextmanager
def counter(label: str):
    """Progress over rows for a command's own loop (``eval``): yields an object with ``start(total)`` and
    ``advance(rows)``; a bar on a terminal, rate-limited lines (``--progress-every``) otherwise."""
    chosen = log_format()
    if chosen == "rich":
        bar = _BarCounter(label)
        try:
            yield bar
        finally:
            bar.stop()
    else:
        yield PlainCounter(LineWriter(chosen), label, _choice[0].progress_every_s)


def milestone(event: str, text: str, **fields: Any) -> None:
    """One timestamped line for a command without a progress console (``eval``: started, done) in plain and json
    formats; nothing on a terminal, where the command's own progress bar shows it."""
    chosen = log_format()
    if chosen != "rich":
        LineWriter(chosen)(event, text, **fields)


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
        self.notice = Notices(lambda source, text: self.console.print(f"{source}: {text}", markup=False,
                                                                      soft_wrap=True, style="yellow"))

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


class TrialBoard:
    """A search's trials as rows (status, searched values, evaluations, step, latest and best metric) and their
    table: what the live table shows on a terminal and the plain console prints at the end."""

    def __init__(self, metric: str, mode: str):
        self.metric, self.mode = metric, mode
        self.trials: dict[str, dict[str, Any]] = {}

    def update(self, kind: str, trial_id: str, config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Applies one trial event (start / result / complete / error); returns the trial's row."""
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
            row["status"] = data.get("status", "ended")
        elif kind == "error":
            row["status"] = "[red]failed"
        return row

    def mark(self, statuses: dict[str, str]) -> None:
        """Final statuses (finished / stopped early / failed) once the study knows them."""
        for trial_id, status in statuses.items():
            if trial_id in self.trials:
                self.trials[trial_id]["status"] = status

    def table(self):
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


class StudyConsole:
    """A live trial table for ``orchestrator tune``: status, searched values, evaluations, latest and best metric."""

    def __init__(self, metric: str, mode: str, console: Console | None = None):
        from rich.live import Live

        self.console = console or Console(stderr=True)
        self.board = TrialBoard(metric, mode)
        self.metric, self.mode, self.trials = metric, mode, self.board.trials
        self.notice = Notices(lambda source, text: self.console.print(f"{source}: {text}", markup=False,
                                                                      soft_wrap=True, style="yellow"))
        self._live = Live(self.board.table(), console=self.console, refresh_per_second=2, transient=False)

    def __enter__(self) -> StudyConsole:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._live.update(self.board.table())
        self._live.stop()
        self.console.print()

    def note(self, text: str) -> None:
        self.console.print(text)

    def __call__(self, kind: str, trial_id: str, config: dict[str, Any], data: dict[str, Any]) -> None:
        self.board.update(kind, trial_id, config, data)
        self._live.update(self.board.table())

    def mark(self, statuses: dict[str, str]) -> None:
        """Final statuses (finished / stopped early / failed) once the study knows them."""
        self.board.mark(statuses)
        self._live.update(self.board.table())


def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
