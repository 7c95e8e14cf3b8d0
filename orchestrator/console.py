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
            TextColumn("loss {task.fields[loss]}"), TextColumn("eval acc {task.fields[accuracy]}"),
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
                               f"({100 * event['trainable'] / event['total_params']:.2f}%){note}")
        elif self._task is None:
            return
        elif kind == "step":
            self._progress.update(self._task, completed=event["step"], loss=f"{event['train_loss']:.4f}",
                                  rate=f"{event['samples_per_s']:.0f}")
        elif kind == "eval":
            self._progress.update(self._task, completed=event["step"], accuracy=f"{event['eval_accuracy']:.3f}")
            self.console.print(f"step {event['step']}/{event['total']}: eval loss {event['eval_loss']:.4f}  "
                               f"accuracy {event['eval_accuracy']:.4f}  macro-F1 {event['eval_macro_f1']:.4f}")
