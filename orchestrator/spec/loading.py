"""Reading a job: YAML file or mapping, key.path=value overrides, validation with messages that name the field,
relative paths made absolute; and reading back the job saved with an adapter, leniently."""

from __future__ import annotations

import difflib
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.spec.schema import PACKAGE_PREFIX, SPEC_VERSION, JobSpec, SpecError
from orchestrator.spec.space import check_space


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Reads a job file, applies ``key.path=value`` overrides and returns the validated spec.

    Raises:
        SpecError: with the key path and what to change, for any problem in the file or the overrides.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise SpecError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a job file is a mapping of sections (version, name, model, data, ...)")
    raw.setdefault("name", re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)[:64])
    for override in overrides:
        _apply_override(raw, override)
    return spec_from_dict(raw, source=str(path))


def spec_from_dict(raw: dict[str, Any], source: str = "spec") -> JobSpec:
    """Validates a plain mapping into a :class:`JobSpec` with relative paths made absolute."""
    if raw.get("version") != SPEC_VERSION:
        raise SpecError(f"{source}: version: must be {SPEC_VERSION} (got {raw.get('version')!r}); "
                        f"add 'version: {SPEC_VERSION}' as the first line")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as error:
        raise SpecError(f"{source}: " + "\n  ".join(_describe(e) for e in matched_branch(error.errors()))) from None
    spec = _resolve_paths(spec)
    if spec.tune:  # every point of the space must make a valid job
        problems = check_space(spec)
        if problems:
            raise SpecError(f"{source}: " + "\n  ".join(problems))
    return spec


def saved_spec(raw: Any, source: str) -> JobSpec:
    """The job saved with an adapter (``orchestrator_job.yaml``) as a :class:`JobSpec`, read leniently.

    Strict with job inputs, lenient with saved artifacts, as PEFT reads old adapter configs: keys this version
    does not know (at any depth; a field renamed or removed since the adapter was trained) are dropped with one
    warning naming them, and missing keys take the spec's defaults. The saved job was checked when it ran, so
    its search space is not re-checked and its paths, already absolute, are not resolved again.

    Raises:
        SpecError: naming ``source``, for another spec version or values that do not validate.
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: not a saved job (a mapping of sections); the adapter folder is damaged")
    if raw.get("version") != SPEC_VERSION:
        raise SpecError(f"{source}: version: saved with spec version {raw.get('version')!r}; this orchestrator "
                        f"reads version {SPEC_VERSION}: use the orchestrator that trained the adapter")
    dropped: list[str] = []
    known = _known_keys(raw, JobSpec, "", dropped)
    if dropped:
        warnings.warn(f"{source}: ignoring saved keys this version does not know: {', '.join(dropped)} "
                      "(saved by another version; the spec's defaults apply to whatever is missing)", stacklevel=2)
    try:
        return JobSpec.model_validate(known)
    except ValidationError as error:
        raise SpecError(f"{source}: the saved job does not validate: "
                        + "\n  ".join(_describe(e) for e in matched_branch(error.errors()))) from None


def _known_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str, dropped: list[str]) -> dict[str, Any]:
    """``raw`` without the keys ``model`` (and its sections, at any depth) does not have; their dotted paths
    are appended to ``dropped``."""
    kept = {}
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            dropped.append(f"{prefix}{key}")
        else:
            kept[key] = _known_values(value, field.annotation, f"{prefix}{key}.", dropped)
    return kept


def _known_values(value: Any, annotation: Any, prefix: str, dropped: list[str]) -> Any:
    if typing.get_origin(annotation) is dict and isinstance(value, dict):  # e.g. tune.space: field -> Dimension
        item = typing.get_args(annotation)[1]
        return {key: _known_values(v, item, f"{prefix}{key}.", dropped) for key, v in value.items()}
    section = next((a for a in (annotation, *typing.get_args(annotation))  # a section, optional or not
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return _known_keys(value, section, prefix, dropped) if section and isinstance(value, dict) else value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise SpecError(f"override {override!r}: write it as key.path=value, e.g. train.learning_rate=1e-3")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise SpecError(f"override {override!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value) if value else None


def matched_branch(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A union field's errors, from the branch the value took: ``data.train: [{path, weight: 0}]`` fails the
    ``str`` branch at its top and the list branch inside an item; the type mismatch of the branch not taken is
    dropped, and the branch's tag (``list[MixtureSource]``) leaves the field's path."""
    def tag_at(error) -> int | None:
        return next((i for i, part in enumerate(error["loc"]) if isinstance(part, str) and
                     (part in ("str", "int", "float", "bool") or "[" in part)), None)

    kept = []
    for error in errors:
        at = tag_at(error)
        deeper = at is not None and any(
            other is not error and tag_at(other) == at and other["loc"][:at] == error["loc"][:at]
            and len(other["loc"]) > len(error["loc"]) for other in errors)
        if deeper and error["type"].endswith("_type"):
            continue  # the branch the value did not take
        if at is not None and any(other is not error and other["loc"][:at] == error["loc"][:at]
                                  and len(other["loc"]) != len(error["loc"]) for other in errors):
            error = {**error, "loc": error["loc"][:at] + error["loc"][at + 1:]}
        kept.append(error)
    return kept


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error["loc"]]
    message = error["msg"]
    if message.startswith("Value error, @"):  # a cross-field rule names its own field
        field, _, message = message[len("Value error, @"):].partition(": ")
        return f"{field}: {message}"
    where = ".".join(location) or "(top level)"
    if location and location[-1] == "uri":
        return f"{where}: {message.removeprefix('Value error, ')}"  # never echo a URI: it may hold a password
    if error["type"] == "extra_forbidden":
        known = _fields_at(location[:-1])
        close = difflib.get_close_matches(location[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
        return f"{where}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{where}: required, not given"
    return f"{where}: {message} (got {error.get('input')!r})"


def _fields_at(location: list[str]) -> list[str]:
    """The keys known at a location of a job file (through optional sections and mappings like tune.space)."""
    model: Any = JobSpec
    parts = iter(location)
    for part in parts:
        field = model.model_fields.get(part)
        model = getattr(field, "annotation", None) if field else None
        if typing.get_origin(model) is dict:
            model = typing.get_args(model)[1]
            next(parts, None)  # the mapping's key, e.g. the dotted field in tune.space
        model = next((a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), model)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields)


def _absolute(path: str | None) -> str | None:
    if path is None or path.startswith(PACKAGE_PREFIX) or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _resolve_paths(spec: JobSpec) -> JobSpec:
    model_path = spec.model.path
    if Path(model_path).expanduser().exists() or model_path.startswith((".", "/", "~")):
        model_path = _absolute(model_path)
    train = spec.data.train
    train = ([source.model_copy(update={"path": _absolute(source.path)}) for source in train]
             if isinstance(train, list) else _absolute(train))
    data = spec.data.model_copy(update={"train": train, "validation": _absolute(spec.data.validation),
                                        "test": _absolute(spec.data.test)})
    cache_dir = spec.model.local_cache_dir  # "~" stays for each worker to expand: a node's own home
    if cache_dir and not cache_dir.startswith("~"):
        cache_dir = _absolute(cache_dir)
    adapter = spec.model.adapter
    if adapter and not adapter.startswith("models:/"):
        adapter = _absolute(adapter)
    retrain = spec.retrain
    if retrain:
        retrain = retrain.model_copy(update={"data": retrain.data.model_copy(update={
            "root": _absolute(retrain.data.root)})})
    return spec.model_copy(update={
        "output_dir": _absolute(spec.output_dir),
        "model": spec.model.model_copy(update={"path": model_path, "adapter": adapter,
                                                "local_cache_dir": cache_dir}),
        "retrain": retrain,
        "data": data,
        "deepspeed": spec.deepspeed.model_copy(update={"config": _absolute(spec.deepspeed.config)}),
    })
