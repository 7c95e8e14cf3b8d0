"""Imports the training stack in a Ray Train worker process from the moment Ray starts the process.

Ray Train creates a worker process per worker and run (every search trial), then spends seconds setting it up
(train context, process group, callbacks) before the training function runs; the training stack's imports
(torch, DeepSpeed, transformers, PEFT, MLflow: 4-6 s on a CPU core) would only start after that. :func:`start`
is the worker processes' setup hook (``launcher.make_trainer``) and imports them in a background thread;
the training function calls :func:`wait` before its own imports. An import that fails here fails again, with
its real error, where the training loop imports the module.
"""

from __future__ import annotations

import importlib
import os
import threading

# In the order the training loop needs them. The last ones are what `deepspeed.initialize`, `MlflowClient` and
# PEFT import on first use (measured: ~1 s more on the critical path); a name a version lacks is skipped.
MODULES = ("torch", "torch.distributed", "deepspeed", "transformers", "transformers.modeling_utils", "peft",
           "mlflow", "mlflow.tracking", "orchestrator.train.loop", "deepspeed.runtime.zero.muon.muon_optimizer",
           "deepspeed.module_inject.auto_ep", "deepspeed.module_inject.auto_ep_layer")

ENV = "ORCHESTRATOR_WARMUP"  # the modules to import, comma-separated (set by launcher.make_trainer)

_thread: threading.Thread | None = None


def modules_for(tracking_uri: str | None) -> tuple[str, ...]:
    """What a worker of a job tracked at ``tracking_uri`` imports: the embedded SQLite store's module too
    (SQLAlchemy and Alembic, ~0.7 s) when rank 0 writes to one."""
    sql = ("mlflow.store.tracking.sqlalchemy_store",) if (tracking_uri or "").startswith(
        ("sqlite:", "postgresql", "mysql", "mssql")) else ()
    return MODULES + sql


def _import_all(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the training loop's own import reports it
            continue


def start() -> None:
    global _thread
    names = [name for name in os.environ.get(ENV, ",".join(MODULES)).split(",") if name]
    _thread = threading.Thread(target=_import_all, args=(names,), name="orchestrator-warmup", daemon=True)
    _thread.start()


def wait() -> None:
    if _thread is not None:
        _thread.join()
