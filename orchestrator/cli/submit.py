"""``submit``: run an orchestrator command on a remote Ray cluster through the Ray Jobs API."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``submit`` to the ``orchestrator`` command."""
    remote = commands.add_parser("submit", help="run an orchestrator command on a Ray cluster via the Ray Jobs API",
                                 description="Uploads the current folder and this orchestrator package, runs "
                                             "'orchestrator COMMAND JOB' on the cluster, streams its logs and exits "
                                             "with its exit code.")
    remote.add_argument("job", help="job YAML file under the current folder")
    remote.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
    remote.add_argument("--address", required=True, help="the head's job API, e.g. http://HEAD:8265")
    remote.add_argument("--command", dest="command_name", default="train", choices=("train", "tune", "retrain",
                                                                                    "validate"))
    remote.add_argument("--no-wait", action="store_true", help="print the job id and return")
    remote.set_defaults(handler=_submit, verbose=False)


def _submit(args) -> int:
    from orchestrator.runtime.submit import submit

    return submit(args.job, args.overrides, args.address, args.command_name, wait=not args.no_wait)
