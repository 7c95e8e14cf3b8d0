"""Output for logs nobody watches live (pod logs, cron mail, CI): one timestamped line per event, plain or JSON.

:mod:`orchestrator.workflows.console` picks these consoles when stderr is not a terminal (or ``--log-format``
says so); they consume the same events as the rich ones. Every line starts with the UTC time
(``2026-12-01T15:04:05Z``); a JSON line is one object with ``ts`` and ``event`` and the event's fields.
:class:`Notices` is the one place Ray's and the libraries' messages pass through: ANSI codes stripped, one line
each, each shown once.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["LineWriter", "Notices", "PlainCounter", "PlainStudyConsole", "PlainTrainingConsole", "plain_words",
           "strip_ansi"]

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")  # colour/cursor (CSI) and title (OSC) codes
_IDS = re.compile(r"\b[0-9a-f]{16,}\b|\b\d+(\.\d+)*\b")  # hex ids, numbers, addresses: not part of a message's identity


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def plain_words(text: str, limit: int = 400) -> str:
    """A library's message as one line: ANSI codes gone, whitespace collapsed, at most ``limit`` characters."""
    line = " ".join(strip_ansi(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Notices:
    """Shows each distinct message once (ANSI stripped, on one line), through ``show(source, text)``.

    Two messages are the same when they differ only in ids and numbers (Ray's "A worker died" paragraph names
    the worker, its pid and port each time)."""

    def __init__(self, show: Callable[[str, str], None]):
        self._show, self._seen = show, set()

    def __call__(self, text: str, source: str = "ray") -> bool:
        """Returns whether the message was shown (False: empty, or shown before)."""
        line = plain_words(text)
        key = (source, _IDS.sub("#", line))
        if not line or key in self._seen:
            return False
        self._seen.add(key)
        self._show(source, line)
        return True


def utc_stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class LineWriter:
    """Writes one event per line to ``stream``: ``TIME TEXT`` (plain) or a JSON object (json), flushed at once.

    Args:
        format: "plain" or "json".
        stream: default sys.stderr (read when writing, so pytest's capture and redirections see it).
        wall_clock: seconds since the epoch, for the timestamps (tests pass a fake one).
    """

    def __init__(self, format: str = "plain", stream: TextIO | None = None,
                 wall_clock: Callable[[], float] = time.time):
        if format not in ("plain", "json"):
            raise ValueError(f"format: 'plain' or 'json', not {format!r}")
        self.format, self._stream, self._clock = format, stream, wall_clock

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __call__(self, event: str, text: str, /, **fields: Any) -> None:
        stamp = utc_stamp(self._clock())
        if self.format == "json":
            line = json.dumps({"ts": stamp, "event": event, **{k: _plain(v) for k, v in fields.items()}},
                              default=str)
        else:
            line = f"{stamp} {strip_ansi(text)}"
        self.stream.write(line + "\n")
        self.stream.flush()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    if isinstance(value, float):
        return round(value, 6)
    return value


class PlainTrainingConsole:
    """The training loop's progress events (see ``WorkerContext.progress``) as lines: start, evaluations,
    warnings, samples and the end always; steps at most every ``progress_every_s`` seconds (0: every one)."""

    def __init__(self, write: LineWriter, progress_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.every, self._clock = write, progress_every_s, clock
        self.notice = Notices(lambda source, text: self.write("notice", f"{source}: {text}", source=source,
                                                              text=text))
        self._started = False
        self._last_line: float | None = None  # clock of the last step line
        self._since: tuple[float, int] | None = None  # (clock, step) at the start, for the ETA
        self._done = False

    def __enter__(self) -> PlainTrainingConsole:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is not None and not self._done:
            self.write("end", f"train stopped: {exc_type.__name__}", status="stopped", error=exc_type.__name__)

    def __call__(self, event: dict[str, Any]) -> None:
        kind, now = event.get("event"), self._clock()
        if kind == "start":
            step, total = event["step"], event["total"]
            note = f", resuming at step {step}" if step else ""
            if step == total:
                note = f", already trained to step {step}: evaluating and saving again"
            if self._started:
                note = f", workers restarted from the checkpoint at step {step}"
            share = 100 * event["trainable"] / event["total_params"]
            self.write("start", f"train start: {total} steps, {event['trainable']:,} of {event['total_params']:,} "
                       f"parameters trained ({share:.2f}%){note}" + (f"; {event['computes']}"
                                                                     if event.get("computes") else ""),
                       step=step, total=total, trainable=event["trainable"], total_params=event["total_params"],
                       computes=event.get("computes"), restarted=self._started)
            self._started, self._since, self._last_line = True, (now, step), now
        elif kind == "step":
            step, total = event["step"], event["total"]
            if self.every and self._last_line is not None and now - self._last_line < self.every \
                    and step != total:
                return
            self._last_line = now
            eta = self._eta(now, step, total)
            self.write("step", f"train step {step}/{total}  loss {event['train_loss']:.4f}  "
                       f"{event['samples_per_s']:.0f} samples/s  ETA {_duration(eta)}",
                       step=step, total=total, loss=event["train_loss"], samples_per_s=event["samples_per_s"],
                       eta_s=None if eta is None else round(eta))
        elif kind == "eval":
            metrics = {k: v for k, v in event.items() if k.startswith("eval_")}
            shown = "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items())
            self.write("eval", f"eval step {event['step']}/{event['total']}: {shown}", step=event["step"],
                       total=event["total"], **metrics)
        elif kind == "warning":  # our own words (e.g. MLflow unreachable, then reachable again): each one shown
            self.write("warning", f"warning: {' '.join(event['text'].split())}", text=event["text"])
        elif kind == "samples":
            when = "base model" if event["step"] == 0 else f"step {event['step']}"
            for prompt, completion in event["samples"]:
                self.write("sample", f"sample ({when}): {plain_words(prompt, 80)} -> "
                           f"{plain_words(completion, 160)}", step=event["step"], prompt=prompt,
                           completion=completion)
        elif kind == "done":
            self._done = True
            metrics = {k: v for k, v in event.items() if k.startswith(("eval_", "test_"))}
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if isinstance(v, float))
            self.write("end", f"train done: adapter {event.get('adapter')}  {shown}", status="finished",
                       adapter=event.get("adapter"), **metrics)

    def _eta(self, now: float, step: int, total: int) -> float | None:
        if self._since is None or step <= self._since[1]:
            return None
        seconds, first = now - self._since[0], self._since[1]
        return seconds / (step - first) * (total - step)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class PlainCounter:
    """Progress of a command's own loop over rows (``eval``) as lines: ``LABEL ROWS/TOTAL rows  R rows/s  ETA``,
    at most every ``progress_every_s`` seconds (0: after every batch), and always at the last row."""

    def __init__(self, write: LineWriter, label: str, progress_every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.write, self.label, self.every, self._clock = write, label, progress_every_s, clock
        self.total, self.done = 0, 0
        self._started = self._last_line = 0.0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self._started = self._last_line = self._clock()

    def advance(self, rows: int) -> None:
        self.done += rows
        now = self._clock()
        if self.every and now - self._last_line < self.every and self.done < self.total:
            return
        self._last_line = now
        elapsed = now - self._started
        rate = self.done / elapsed if elapsed > 0 else None
        eta = (self.total - self.done) / rate if rate else None
        self.write("progress", f"{self.label} {self.done}/{self.total} rows  "
                   f"{'-' if rate is None else f'{rate:.0f}'} rows/s  ETA {_duration(eta)}",
                   task=self.label, done=self.done, total=self.total,
                   rows_per_s=None if rate is None else round(rate, 2), eta_s=None if eta is None else round(eta))


class PlainStudyConsole:
    """A search's trial events as lines: started (with its config), each evaluation (the metric, the trial's
    best), stopped early or finished, failed (the error's first line); the trial table at the end.

    Args:
        board: the trials' rows (:class:`orchestrator.workflows.console.TrialBoard`), also giving the table.
    """

    def __init__(self, write: LineWriter, board):
        self.write, self.board = write, board
        self.notice = Notices(lambda source, text: self.write("notice", f"{source}: {text}", source=source,
                                                              text=text))

    def __enter__(self) -> PlainStudyConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.write.format == "json":
            for trial_id, row in self.board.trials.items():
                self.write("trial_summary", "", trial=trial_id, status=row["status"], config=row["config"],
                           evals=row["evals"], step=row["step"], latest=row["latest"], best=row["best"])
            return
        from rich.console import Console

        Console(file=self.write.stream, width=200, color_system=None, highlight=False,
                soft_wrap=True).print(self.board.table())

    def note(self, text: str) -> None:
        self.write("study", f"study: {text}", text=text)

    def __call__(self, kind: str, trial_id: str, config: dict[str, Any], data: dict[str, Any]) -> None:
        row = self.board.update(kind, trial_id, config, data)
        if kind == "start":
            shown = " ".join(f"{k}={_value(v)}" for k, v in sorted(config.items()))
            self.write("trial_start", f"trial {trial_id} started: {shown}", trial=trial_id, config=config)
        elif kind == "result" and self.board.metric in data:
            value = float(data[self.board.metric])
            self.write("trial_eval", f"trial {trial_id} step {row['step']}: {self.board.metric} {value:.4f} "
                       f"(best {row['best']:.4f})", trial=trial_id, step=row["step"],
                       **{self.board.metric: value, "best": row["best"]})
        elif kind == "complete":
            status = data.get("status", "ended")
            self.write("trial_end", f"trial {trial_id} {status} at step {row['step']}"
                       + (f", best {self.board.metric} {row['best']:.4f}" if row["best"] is not None else ""),
                       trial=trial_id, status=status, step=row["step"], best=row["best"])
        elif kind == "error":
            error = (data.get("error") or "unknown error").strip().splitlines()[0]
            self.write("trial_end", f"trial {trial_id} failed: {plain_words(error)}", trial=trial_id,
                       status="failed", step=row["step"], error=plain_words(error))

    def mark(self, statuses: dict[str, str]) -> None:
        self.board.mark(statuses)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
