"""The docs stay true to the code: the README is a front door (short, every file it links exists), and
jobs/README.md is the spec reference generated from the schema, with every field in it."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from orchestrator.spec import json_schema
from orchestrator.spec.reference import MARKER, fields_markdown

REPO = Path(__file__).resolve().parents[1]
REGENERATE = ".venv/bin/python -m orchestrator.spec.reference jobs/README.md"


def test_readme_is_at_most_2000_words():
    words = len((REPO / "README.md").read_text(encoding="utf-8").split())
    assert words <= 2000, (f"README.md has {words} words, at most 2,000: keep one short section per capability and "
                           "move the detail to its reference (jobs/, tests/, cluster/ READMEs, BENCHMARKS.md)")


def test_every_file_the_readme_links_to_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    assert len(relative) >= 4, f"the README should link its references; found {relative}"
    missing = [t for t in relative if not (REPO / t.partition("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_jobs_readme_lists_every_spec_field_as_generated():
    text = (REPO / "jobs" / "README.md").read_text(encoding="utf-8")
    _, found, generated = text.partition(MARKER)
    assert found, f"jobs/README.md lost its marker line {MARKER!r}; put it back above the generated part"
    assert generated.strip() == fields_markdown().strip(), (
        f"jobs/README.md's field reference differs from orchestrator/spec/schema.py; regenerate it: {REGENERATE}")
    listed = set(re.findall(r"^\| `([^`]+)` \|", generated, re.MULTILINE))
    every = set(_schema_paths(json_schema()))  # pydantic's JSON Schema, walked independently of the generator
    assert every - listed == set(), f"fields missing from jobs/README.md: {sorted(every - listed)}"


def test_the_reference_generator_stays_in_the_pure_spec_package():
    tree = ast.parse((REPO / "orchestrator" / "spec" / "reference.py").read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    allowed = {name for name in imported
               if name.split(".")[0] in sys.stdlib_module_names | {"__future__", "pydantic"}
               or name.startswith("orchestrator.spec")}
    assert imported - allowed == set(), f"orchestrator/spec/reference.py imports {sorted(imported - allowed)}"


def _schema_paths(schema: dict, node: dict | None = None, prefix: str = ""):
    """Every field's dotted path in a pydantic JSON Schema; a dict of models (tune.space) as ``<field>``."""
    node = _resolve(schema, schema if node is None else node)
    for name, sub in node.get("properties", {}).items():
        yield f"{prefix}{name}"
        yield from _schema_paths(schema, sub, f"{prefix}{name}.")
    values = node.get("additionalProperties")
    if isinstance(values, dict) and "$ref" in values:
        yield from _schema_paths(schema, values, f"{prefix}<field>.")


def _resolve(schema: dict, node: dict) -> dict:
    options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        node = options[0]
    if "$ref" in node:
        return _resolve(schema, schema["$defs"][node["$ref"].rsplit("/", 1)[1]])
    return node


def test_every_spec_field_in_the_reference_says_what_it_means():
    """A field added without a ``description=`` or a trailing comment in schema.py would show an empty meaning."""
    from orchestrator.spec.reference import fields_markdown

    rows = [line for line in fields_markdown().splitlines() if line.startswith("| `")]
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]  # \| is in a cell
    empty = [row[0] for row in cells if not row[-1]]
    assert len(rows) > 100 and not empty, f"fields with no meaning in jobs/README.md: {empty}"
