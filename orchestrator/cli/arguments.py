"""Arguments that several command groups take, so each command's help reads the same."""

from __future__ import annotations

import argparse

__all__ = ["adapter_arguments", "job_arguments", "output_arguments"]

PROGRESS_EVERY_S = 30.0  # a line per half minute: a 2-hour run logs ~240 progress lines


def adapter_arguments(command: argparse.ArgumentParser) -> None:
    """Adds what every command that uses a trained adapter takes: --adapter, --base, --tracking-uri, -v."""
    command.add_argument("--adapter", required=True,
                         help="adapter folder, or models:/NAME@alias | models:/NAME/VERSION")
    command.add_argument("--base", help="base model folder (default: the one the adapter was trained on)")
    command.add_argument("--tracking-uri", help="MLflow registry URI for models:/ (default: $MLFLOW_TRACKING_URI)")
    command.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs")


def job_arguments(command: argparse.ArgumentParser, job_help: str, memory_check: bool = False) -> None:
    """Adds what every command that reads a job file takes: the job, key.path=value overrides, -v.

    Args:
        command: the command's parser.
        job_help: the help of the job argument, naming the section the command needs.
        memory_check: also add ``--skip-memory-check`` (commands that launch workers).
    """
    command.add_argument("job", help=job_help)
    command.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
    command.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the libraries' logs")
    if memory_check:
        command.add_argument("--skip-memory-check", action="store_true",
                             help="launch even when the memory estimate exceeds a worker's device")


def output_arguments(command: argparse.ArgumentParser) -> None:
    """Adds how a long command shows its progress: --log-format, --progress-every."""
    command.add_argument("--log-format", choices=("auto", "rich", "plain", "json"), default="auto",
                         help="auto (default): a live progress bar / trial table on a terminal, timestamped lines "
                              "otherwise (pod logs, cron mail, CI); plain: those lines on a terminal too; json: one "
                              "JSON object per event on stderr, for log shippers")
    command.add_argument("--progress-every", type=_seconds, default=PROGRESS_EVERY_S, metavar="SECONDS",
                         help=f"plain/json: at most one training-progress line per SECONDS (default "
                              f"{PROGRESS_EVERY_S:g}; 0: every step logged); evaluations, trial events, warnings, "
                              "start and end always get their line")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"seconds >= 0, not {text}")
    return value
