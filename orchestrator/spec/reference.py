"""The job-file reference in ``jobs/README.md``, generated from :class:`~orchestrator.spec.schema.JobSpec`.

Every field's dotted path, type (with its range), default and meaning comes from the schema itself: pydantic's
``model_fields`` and each field's ``description=``, or else the trailing ``# comment`` on the field's line in
schema.py. Nested sections get a table each. ``tests/test_docs.py`` fails when jobs/README.md and this differ.

    python -m orchestrator.spec.reference                    # print the generated part
    python -m orchestrator.spec.reference jobs/README.md     # rewrite it in place, below the marker line
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from orchestrator.spec import schema

MARKER = "<!-- Generated from orchestrator/spec/schema.py: python -m orchestrator.spec.reference jobs/README.md -->"

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def fields_markdown(spec: type[BaseModel] = schema.JobSpec) -> str:
    """The Markdown reference of every field of ``spec``: one table per section, nested sections after their
    parent, each row the field's dotted path, type, default and meaning."""
    blocks: list[str] = []
    _section(spec, "", "top level", blocks)
    return "\n\n".join(blocks) + "\n"


def _section(model: type[BaseModel], prefix: str, title: str, blocks: list[str]) -> None:
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _section_model(field.annotation)
        if inner is not None:
            nested.append((inner, path))
        elif (value := _dict_of_models(field.annotation)) is not None:
            nested.append((value, f"{path}.<field>"))
        meaning = field.description or _comments().get((model.__name__, name), "")
        rows.append(f"| `{path}` | {_cell(_field_type(field))} | {_cell(_default(field))} | {_cell(meaning)} |")
    doc = model.__dict__.get("__doc__")
    intro = [_plain(inspect.cleandoc(doc))] if doc else []
    blocks.append("\n\n".join([f"## {title}", *intro, "\n".join(rows)]))
    for inner, path in nested:
        _section(inner, f"{path}.", f"`{path}`", blocks)


def _field_type(field: FieldInfo) -> str:
    if _section_model(field.annotation) is not None:
        return "section" + (" or null" if _optional(field.annotation) else "")
    bounds = _constraints(field.metadata)  # a field's own range applies to its value, not to null
    if bounds and _optional(field.annotation):
        kinds = [_type(arg) for arg in typing.get_args(field.annotation) if arg is not type(None)]
        return " | ".join(kinds) + bounds + " | null"
    return _type(field.annotation) + bounds


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0]) + _constraints([m for extra in args[1:] for m in _metadata(extra)])
    if origin is Literal:
        return " | ".join(_value(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type(arg) for arg in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    if origin is tuple:
        return f"[{', '.join(_type(arg) for arg in args)}]"
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _metadata(extra: Any) -> list[Any]:
    return list(extra.metadata) if isinstance(extra, FieldInfo) else [extra]


def _constraints(metadata: list[Any]) -> str:
    said = []
    for item in metadata:
        said += [f"{sign} {getattr(item, key)}" for key, sign in _BOUNDS.items()
                 if getattr(item, key, None) is not None]
        if getattr(item, "min_length", None) is not None:
            said.append(f"at least {item.min_length}")
        if getattr(item, "pattern", None) is not None:
            said.append(f"matching `{item.pattern}`")
    return f" ({', '.join(said)})" if said else ""


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        made = field.default_factory()
        return "its fields' defaults" if isinstance(made, BaseModel) else f"`{_value(made)}`"
    return f"`{_value(field.default)}`"


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``X`` or ``X | None``), if it is a section of its own."""
    candidates = [a for a in typing.get_args(annotation) if a is not type(None)] if _optional(annotation) \
        else [annotation]
    if len(candidates) == 1 and isinstance(candidates[0], type) and issubclass(candidates[0], BaseModel):
        return candidates[0]
    return None


def _dict_of_models(annotation: Any) -> type[BaseModel] | None:
    """The value model of a ``dict[str, Model]`` field (``tune.space``)."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        return value if isinstance(value, type) and issubclass(value, BaseModel) else None
    return None


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


@functools.cache
def _comments() -> dict[tuple[str, str], str]:
    """(class, field) -> the trailing ``# comment`` on the field's lines in schema.py: the meaning of a field
    declared without ``description=``."""
    source = inspect.getsource(schema)
    by_line = {token.start[0]: token.string.lstrip("#").strip()
               for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                lines = [by_line[n] for n in range(item.lineno, (item.end_lineno or item.lineno) + 1) if n in by_line]
                if lines:
                    found[(node.name, item.target.id)] = " ".join(lines)
    return found


def _plain(text: str) -> str:
    """A docstring as Markdown: Sphinx roles and double backticks become code spans, lines are joined."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return " ".join(text.split())


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _rewrite(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    head, found, _ = text.partition(MARKER)
    if not found:
        raise SystemExit(f"{path}: no marker line {MARKER!r}; add it where the generated part starts")
    path.write_text(f"{head}{MARKER}\n\n{fields_markdown()}", encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _rewrite(Path(sys.argv[1]))
    else:
        sys.stdout.write(fields_markdown())
