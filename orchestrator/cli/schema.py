"""``schema``: print the JSON Schema of job files."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``schema`` to the ``orchestrator`` command."""
    schema = commands.add_parser("schema", help="print the JSON Schema of job files")
    schema.set_defaults(handler=_schema, verbose=False)


def _schema(_args) -> int:
    from orchestrator.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
