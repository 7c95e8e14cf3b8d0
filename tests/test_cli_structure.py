"""The CLI's shape: one module per command group, each registering only its own commands, a short
``build_parser`` that loops over them, and no heavy library imported to parse a command line."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import orchestrator.cli
from orchestrator.cli import build_parser

# In the order `orchestrator --help` lists them.
COMMANDS = ["train", "validate", "tune", "retrain", "submit", "registry", "generate", "eval", "predict", "merge",
            "export", "compare", "plan", "compose", "schema"]
GROUPS = {"training": ["train", "validate", "tune", "retrain"], "submit": ["submit"], "registry": ["registry"],
          "serving": ["generate", "eval", "predict", "merge", "export"], "planning": ["compare", "plan"],
          "composition": ["compose"], "schema": ["schema"]}
CLI = Path(orchestrator.cli.__file__).parent


def _registered(register) -> dict[str, argparse.ArgumentParser]:
    commands = argparse.ArgumentParser(prog="orchestrator").add_subparsers(dest="command")
    register(commands)
    return dict(commands.choices)


@pytest.mark.parametrize("group", GROUPS)
def test_each_module_registers_only_its_own_commands_with_its_own_handlers(group):
    module = importlib.import_module(f"orchestrator.cli.{group}")
    parsers = _registered(module.register)
    assert list(parsers) == GROUPS[group]
    for name, parser in parsers.items():
        handler = parser.get_default("handler")
        assert callable(handler) and handler.__module__ == module.__name__, name  # it owns its output too


def test_the_modules_together_register_exactly_the_commands_in_order():
    assert [name for group in GROUPS for name in GROUPS[group]] == COMMANDS
    assert [module.__name__ for module in orchestrator.cli.COMMAND_MODULES] == \
        [f"orchestrator.cli.{group}" for group in GROUPS]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(commands.choices) == COMMANDS


def test_build_parser_is_a_short_loop_over_the_modules():
    body = inspect.getsource(build_parser).splitlines()[1:]  # less the def line
    assert len(body) < 25, f"build_parser is {len(body)} lines: add commands in a module's register()"
    assert "add_parser(" not in inspect.getsource(build_parser)


def test_no_cli_module_imports_another_modules_private_name():
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("orchestrator"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}: make it public or move it"


def test_parsing_every_command_imports_no_heavy_library():
    """The handlers import torch, Ray and MLflow when they run: `orchestrator X --help` takes a moment, not seconds."""
    heavy = ("torch", "ray", "mlflow", "transformers", "deepspeed", "peft")
    code = ("import sys\nfrom orchestrator.cli import build_parser\nparser = build_parser()\n"
            f"for command in {COMMANDS!r}:\n"
            "    try:\n        parser.parse_args([command, '--help'])\n    except SystemExit:\n        pass\n"
            f"print(sorted(name for name in {heavy!r} if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "[]"
