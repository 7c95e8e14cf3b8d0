"""The MLflow model registry, the way this project uses it: adapters as model versions, aliases (never the
deprecated stages) for ``challenger`` and ``champion``, who/why tags on every alias move, an alias history for
rollback, and a lock so that two promotions never interleave.

Part of the tracking package, the only code that calls MLflow. Credentials come from the environment
only (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN); nothing here logs them.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.plan.promotion import history_after, parse_history, rollback_target
from orchestrator.spec import MODEL_NAME_PATTERN, SpecError
from orchestrator.tracking.runs import ADAPTER_ARTIFACT
from orchestrator.tracking.sinks import FIRST_ANSWER_TIMEOUT_S, fail_fast

LOCK_SUFFIX = ".promotion-lock"  # a registered model that exists while someone moves an alias
HISTORY_TAG = "orchestrator.alias_history.{alias}"
_NAME = re.compile(MODEL_NAME_PATTERN)


class RegistryError(SpecError):
    """An unknown model, alias or version, an unreachable registry, or a refused move; the message says what
    to fix."""


@dataclass(frozen=True)
class Ref:
    """``models:/NAME@alias``, ``models:/NAME/VERSION``, or the same without ``models:/``."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"models:/{self.name}" + (f"@{self.alias}" if self.alias else f"/{self.version}" if self.version else "")


def parse_ref(text: str) -> Ref:
    body = text[len("models:/"):] if text.startswith("models:/") else text
    name, alias, version = body, None, None
    if "@" in body:
        name, _, alias = body.partition("@")
    elif "/" in body:
        name, _, version = body.partition("/")
        if not version.isdigit():
            raise RegistryError(f"'{text}': a version is a number (models:/NAME/3); or use an alias "
                                "(models:/NAME@champion)")
    if not _NAME.match(name) or name.endswith(LOCK_SUFFIX) or (alias is not None and not alias):
        raise RegistryError(f"'{text}': not a registered model reference; write models:/NAME@alias or "
                            "models:/NAME/VERSION (names: letters, digits, '_', '.', '-'; no slashes or '..')")
    return Ref(name, alias, version)


def is_registry_ref(text: str) -> bool:
    return text.startswith("models:/")


def registry_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RegistryError("no tracking server: pass --tracking-uri URI or export MLFLOW_TRACKING_URI "
                            "(credentials, if any, in MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)")
    return uri


def connect(uri: str):
    """An ``MlflowClient`` on a store that answered a probe within seconds.

    Raises:
        RegistryError: when the store cannot be reached (nothing has been changed).
    """
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    if uri.startswith("http"):
        with fail_fast(FIRST_ANSWER_TIMEOUT_S):
            try:
                client.search_registered_models(max_results=1)
            except Exception as error:  # requests' ConnectionError, MlflowException, ...
                raise RegistryError(f"cannot reach the MLflow registry at {uri} ({type(error).__name__}: "
                                    f"{str(error)[:200]}); start the server or fix --tracking-uri / "
                                    "MLFLOW_TRACKING_URI") from None
    return client


def _missing(error: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", "")) or "not found" in str(error).lower()


def model_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000)
                  if not m.name.endswith(LOCK_SUFFIX))


def get_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if not _missing(error):
            raise
        import difflib

        names = model_names(client)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"registered: {', '.join(names) or 'none'}"
        raise RegistryError(f"no registered model '{name}'; {hint}") from None


def get_version(client, ref: Ref):
    """The model version a reference points at (the latest version when it names neither alias nor version)."""
    from mlflow.exceptions import MlflowException

    model = get_model(client, ref.name)
    aliases = dict(getattr(model, "aliases", {}) or {})
    if ref.alias is not None:
        if ref.alias not in aliases:
            known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{ref}: model '{ref.name}' has no alias '{ref.alias}' (aliases: {known})")
        return client.get_model_version(ref.name, aliases[ref.alias])
    if ref.version is not None:
        try:
            return client.get_model_version(ref.name, ref.version)
        except MlflowException as error:
            if not _missing(error):
                raise
            numbers = sorted(int(v.version) for v in versions(client, ref.name))
            raise RegistryError(f"{ref}: model '{ref.name}' has no version {ref.version} "
                                f"(versions: {', '.join(map(str, numbers)) or 'none'})") from None
    found = versions(client, ref.name)
    if not found:
        raise RegistryError(f"{ref}: model '{ref.name}' has no versions")
    return max(found, key=lambda v: int(v.version))


def versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name = '{name}'", max_results=10_000))


def aliases_of(model) -> dict[str, str]:
    return {alias: str(version) for alias, version in (getattr(model, "aliases", {}) or {}).items()}


def key_metric(version, run=None) -> tuple[str, float] | None:
    """The version's headline number: the metric its creator named (gate or search), else test/eval accuracy."""
    tags = version.tags or {}
    name = tags.get("orchestrator.metric")
    if name:
        for key in (f"orchestrator.eval.{name}", f"orchestrator.{name}"):
            if key in tags:
                try:
                    return name, float(tags[key])
                except ValueError:
                    pass
    metrics = run.data.metrics if run is not None else {}
    for key in ("test_accuracy", "eval_accuracy", "eval_loss"):
        if key in metrics:
            return key, float(metrics[key])
    return None


def _run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # the run was deleted; the version outlives it
        return None


def evaluation(version, run) -> dict[str, float]:
    """The evaluation results a version has: tagged by a gate or search, or logged by the run that made it."""
    tags = version.tags or {}
    found = {}
    for key, value in tags.items():
        if key.startswith(("orchestrator.eval", "orchestrator.test")):
            try:
                name = key.removeprefix("orchestrator.")
                found[f"holdout_{name[5:]}" if name.startswith("eval.") else name] = float(value)
            except ValueError:
                continue
    if run is not None:
        found.update({k: v for k, v in run.data.metrics.items() if k.startswith(("eval_", "test_"))})
    return found


# ---------------------------------------------------------------------------------------------- reading


def list_versions(client, name: str | None = None, limit: int = 10) -> list[dict[str, Any]]:
    """One row per version (newest first, ``limit`` per model): aliases, base model, key metric, creator."""
    rows = []
    for model_name in [name] if name else model_names(client):
        model = get_model(client, model_name)
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases_of(model).items():
            by_version.setdefault(version, []).append(alias)
        for version in sorted(versions(client, model_name), key=lambda v: -int(v.version))[:limit]:
            tags = version.tags or {}
            run = None if "orchestrator.metric" in tags else _run(client, version.run_id)  # tags suffice
            metric = key_metric(version, run)
            rows.append({"model": model_name, "version": str(version.version),
                         "aliases": sorted(by_version.get(str(version.version), [])),
                         "base_model": tags.get("base_model") or (model.tags or {}).get("orchestrator.base_model", ""),
                         "metric": f"{metric[0]} {metric[1]:.4f}" if metric else "",
                         "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(version.creation_timestamp / 1000)),
                         "source": tags.get("orchestrator.snapshot") or tags.get("orchestrator.study")
                         or (f"compose {tags['orchestrator.compose_method']}"
                             if "orchestrator.compose_method" in tags else "")})
    return rows


def show(client, ref: Ref) -> dict[str, Any]:
    """Everything a reviewer needs about one version: params, metrics, lineage and the alias moves."""
    version = get_version(client, ref)
    model = get_model(client, ref.name)
    run = _run(client, version.run_id)
    tags = dict(version.tags or {})
    params = dict(run.data.params) if run else {}
    run_tags = dict(run.data.tags) if run else {}
    lineage = {
        "run_id": version.run_id,
        "run_name": run.info.run_name if run else None,
        "experiment_id": run.info.experiment_id if run else None,
        "study_run_id": tags.get("orchestrator.study_run_id") or run_tags.get("mlflow.parentRunId"),
        "study": tags.get("orchestrator.study") or run_tags.get("orchestrator.study"),
        "base_model": tags.get("base_model") or params.get("model.path"),
        "data_digest": tags.get("orchestrator.data_digest") or run_tags.get("data.train.sha256"),
        "data_digests": {k.split(".")[1]: v for k, v in run_tags.items()
                         if k.startswith("data.") and k.endswith(".sha256")},
        "snapshot": tags.get("orchestrator.snapshot"),
        "source": version.source,
    }
    wanted = ("lora.", "train.learning_rate", "train.epochs", "train.max_steps", "model.", "trainable_")
    return {"name": ref.name, "version": str(version.version),
            "aliases": sorted(a for a, v in aliases_of(model).items() if v == str(version.version)),
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(version.creation_timestamp / 1000)),
            "params": {k: v for k, v in sorted(params.items()) if k.startswith(wanted)},
            "metrics": evaluation(version, run),
            "lineage": lineage,
            "tags": {k: v for k, v in sorted(tags.items())}}


def pull(client, ref: Ref, dest: str) -> tuple[str, str]:
    """Downloads the version's PEFT adapter folder to ``dest`` (complete or not at all); returns (dest, version).

    Raises:
        RegistryError: for an unknown reference, a non-empty ``dest``, or a download that is not an adapter.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    target = Path(dest).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise RegistryError(f"--to {target}: exists and is not empty; give a new folder")
    version = get_version(client, ref)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pull-", dir=target.parent))
    try:
        uri = client.get_model_version_download_uri(ref.name, version.version)
        try:  # MLflow refuses listed paths that leave the folder ('..', absolute); we say so and write nothing
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging),
                                                              tracking_uri=client.tracking_uri))
        except MlflowException as error:
            raise RegistryError(f"{ref} (version {version.version}): downloading {uri} failed or was refused: "
                                f"{str(error)[:300]}; nothing was written to {target}") from None
        if any(p.is_symlink() or not p.resolve().is_relative_to(staging.resolve()) for p in folder.rglob("*")):
            raise RegistryError(f"{ref} (version {version.version}): the download holds links or paths outside "
                                f"the folder; refused, nothing was written to {target}")
        if not (folder / "adapter_config.json").is_file():
            raise RegistryError(f"{ref} (version {version.version}) is not a PEFT adapter: no adapter_config.json "
                                f"in {uri}")
        if target.exists():
            target.rmdir()
        os.replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target), str(version.version)


def resolve_adapter(reference: str, tracking_uri: str, cache_dir: str) -> str:
    """A local adapter folder for ``model.adapter``: a folder as it is, a registry URI downloaded once into
    ``cache_dir/<name>-v<version>``."""
    if not is_registry_ref(reference):
        if not Path(reference, "adapter_config.json").is_file():
            raise SpecError(f"model.adapter: {reference} is not a PEFT adapter folder (no adapter_config.json)")
        return reference
    ref = parse_ref(reference)
    client = connect(tracking_uri)
    version = get_version(client, ref)
    target = Path(cache_dir, f"{ref.name}-v{version.version}")
    if not (target / "adapter_config.json").is_file():
        pull(client, Ref(ref.name, version=str(version.version)), str(target))
    return str(target)


# ---------------------------------------------------------------------------------------------- writing


def register_adapter(client, name: str, run_id: str, tags: dict[str, str], source: str | None = None) -> str:
    """Registers the run's adapter (``runs:/run_id/adapter``) as a new version of ``name``; returns it.

    The first version of a run is reused, so rerunning a study or a retrain registers nothing twice.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags={"orchestrator.base_model": tags.get("base_model", "")})
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    existing = [v for v in versions(client, name) if v.run_id == run_id]
    if existing:
        return str(min(int(v.version) for v in existing))
    source = source or f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT}"
    return str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@contextmanager
def promotion_lock(client, name: str, stale_after_s: float = 600.0, wait_s: float | None = None):
    """Holds the model's promotion lock: a registered model ``NAME.promotion-lock`` whose creation is atomic in
    the registry, so racing drivers on different machines take turns. A lock older than ``stale_after_s`` (its
    holder died), or one whose holder ran on this machine and is gone, is broken."""
    from mlflow.exceptions import MlflowException

    lock, holder = f"{name}{LOCK_SUFFIX}", f"{who()} pid {os.getpid()}"
    deadline = time.monotonic() + (stale_after_s if wait_s is None else wait_s)
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "since": repr(time.time()),
                                                       "host": socket.gethostname(), "pid": str(os.getpid())},
                                           description=f"held while {holder} moves aliases of {name}")
            break
        except MlflowException as error:
            if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released in between
        tags = held.tags or {}
        age = time.time() - float(tags.get("since", "0") or 0)
        if age > stale_after_s or _dead_here(tags):
            client.delete_registered_model(lock)  # its holder died mid-promotion
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"model '{name}' is locked by {held.tags.get('holder')} for {age:.0f} s; wait, or if "
                                f"that process is gone delete the registered model '{lock}'")
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException:
            pass  # broken as stale by someone else


def _dead_here(tags: dict[str, str]) -> bool:
    """Whether a lock's holder ran on this machine and is gone (killed, crashed): its lock need not age out."""
    pid = tags.get("pid", "")
    if tags.get("host") != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    return False


def move_alias(client, name: str, alias: str, version: str, reason: str, action: str = "promote") -> str | None:
    """Points ``alias`` at ``version`` and records who/why/when and the previous holder on the version, plus the
    alias history on the model (for rollback). Call it under :func:`promotion_lock`. Returns the previous version.

    Tags are written before the alias moves: a failure in between leaves the alias where it was.
    """
    model = get_model(client, name)
    previous = aliases_of(model).get(alias)
    prefix, done = f"orchestrator.{alias}", {"promote": "promoted", "rollback": "rolled_back"}[action]
    for key, value in {f"{prefix}.{done}_by": who(), f"{prefix}.{done}_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       f"{prefix}.reason": reason[:4000], f"{prefix}.previous_version": previous or ""}.items():
        client.set_model_version_tag(name, version, key, value)
    history = parse_history((model.tags or {}).get(HISTORY_TAG.format(alias=alias)))
    if not history and previous:
        history = [previous]  # an alias set before this tool kept history
    history = history_after(history, version) if action == "promote" else history
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))
    client.set_registered_model_alias(name, alias, version)
    return previous


def promote(client, name: str, version: str, alias: str, reason: str, allow_unevaluated: bool = False) -> str | None:
    """``registry promote``: refuses a version without evaluation results; returns the alias's previous version."""
    target = get_version(client, Ref(name, version=version))
    if not allow_unevaluated and not evaluation(target, _run(client, target.run_id)):
        raise RegistryError(f"{name} version {version} has no evaluation results (no eval_/test_ metrics on its run, "
                            "no orchestrator.eval tags); evaluate it first (orchestrator retrain evaluates before "
                            "it promotes)")
    with promotion_lock(client, name):
        return move_alias(client, name, alias, str(target.version), reason)


def rollback(client, name: str, alias: str, reason: str) -> tuple[str, str]:
    """``registry rollback``: the alias goes back to the version that held it before; returns (from, to)."""
    with promotion_lock(client, name):
        model = get_model(client, name)
        current = aliases_of(model).get(alias)
        if current is None:
            raise RegistryError(f"model '{name}' has no alias '{alias}' to roll back")
        history = parse_history((model.tags or {}).get(HISTORY_TAG.format(alias=alias)))
        target, trail = rollback_target(history, current)
        client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(trail))
        move_alias(client, name, alias, target, reason, action="rollback")
    return current, target
