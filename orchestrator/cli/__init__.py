"""The ``orchestrator`` command. Thin: parse arguments, call one function, print, pick the exit code.

Each command group is a module here, owning its parser and its output: ``training`` (train, validate, tune,
retrain), ``submit``, ``registry``, ``serving`` (generate, eval, predict, merge, export), ``planning`` (compare,
plan), ``composition`` (compose) and ``schema``. Each has one ``register(commands)``; its handlers import the heavy
libraries when they run, so parsing imports none of torch, Ray or MLflow.

Exit codes: 0 success, 1 training failed (a search: no trial finished), 2 bad input (spec, data, model, cluster
resources, registry references, unreachable services), 3 retrain kept the champion (the challenger did not pass the
gate), 4 trained but the MLflow store did not answer at the end (the adapter is on disk; rerun to record it),
128 + the signal when interrupted: 130 Ctrl-C, 143 SIGTERM (checkpoints stay; rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

from orchestrator.cli import composition, planning, registry, schema, serving, submit, training

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_KEPT", "EXIT_UNRECORDED", "build_parser", "main"]

from orchestrator.cli.arguments import PROGRESS_EVERY_S
from orchestrator.cli.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_KEPT, EXIT_UNRECORDED

# In the order `orchestrator --help` lists their commands.
COMMAND_MODULES = (training, submit, registry, serving, planning, composition, schema)


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore")
    for name in ("ray", "mlflow", "alembic", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The ``orchestrator`` parser: each command module adds its commands, with a ``handler`` default."""
    parser = argparse.ArgumentParser(prog="orchestrator", description="Distributed LoRA fine-tuning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


_signalled: list[int] = []  # SIGTERM, once received (Ray Train re-raises interrupts as a plain KeyboardInterrupt)


def _raise_terminated(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, ``kill``), handled as Ctrl-C: runs end KILLED, checkpoints stay, reruns resume."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Runs one ``orchestrator`` command and returns its exit code (the module docstring lists them).

    Args:
        argv: the arguments after ``orchestrator``; None reads the command line and also handles SIGTERM.
    """
    args = build_parser().parse_args(argv)
    _quiet(args.verbose)
    from orchestrator.workflows import console

    # Once per command: every console the workflows build (retrain's train and tune too) reads this choice.
    console.configure(getattr(args, "log_format", "auto"), getattr(args, "progress_every", PROGRESS_EVERY_S))
    if argv is None:  # the command itself, not a caller's main([...]) (a caller keeps its own SIGTERM handling)
        signal.signal(signal.SIGTERM, _raise_terminated)
    from orchestrator.runtime.launcher import TrainingFailed
    from orchestrator.spec import SpecError
    from orchestrator.tracking.runs import TrackingUnavailable
    from orchestrator.workflows.tuning import StudyFailed

    try:
        return args.handler(args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingFailed as error:
        print(f"error: training failed: {error}\n  (rerun with -v for the workers' logs; rerunning the same job "
              "resumes from its last checkpoint)", file=sys.stderr)
        return EXIT_FAILED
    except StudyFailed as error:
        print(f"error: search failed: {error}\n  (rerun with -v for the workers' logs)", file=sys.stderr)
        return EXIT_FAILED
    except TrackingUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNRECORDED
    except KeyboardInterrupt:
        print("interrupted; rerun the same job to resume from its last checkpoint (a search: orchestrator tune JOB "
              "--resume)", file=sys.stderr)
        return 128 + (signal.SIGTERM if signal.SIGTERM in _signalled else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
