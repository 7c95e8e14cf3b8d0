"""Where a worker's metrics go: a small Protocol, MLflow on rank 0, a null sink elsewhere, and a buffer that keeps
calls locally (bounded) while the server does not answer."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol


class MetricSink(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, folder: str, artifact_path: str) -> None: ...
    def log_table(self, columns: dict[str, list], artifact_file: str) -> None: ...
    def close(self) -> int: ...


class NullSink:
    """What ranks other than 0 get: every call does nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifacts(self, folder: str, artifact_path: str) -> None: ...
    def log_table(self, columns: dict[str, list], artifact_file: str) -> None: ...
    def close(self) -> int:
        return 0


class MlflowSink:
    """Writes to an existing MLflow run (created by the driver) through ``MlflowClient``."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self._client, self._run_id = MlflowClient(tracking_uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._client.log_batch(self._run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self._run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        self._client.log_artifacts(self._run_id, folder, artifact_path)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """Appends rows to the run's table (MLflow appends when the artifact file exists already)."""
        self._client.log_table(self._run_id, columns, artifact_file)

    def close(self) -> int:
        return 0


PENDING_FILE = "mlflow_pending.jsonl"  # in output_dir: what a worker could not deliver, for the next run


class BufferedSink:
    """An MLflow sink that never stops training: a call that fails (server down, timeout) waits in a bounded
    local queue, and the queue is delivered in order, oldest first, once the server answers again (tried at most
    every ``retry_every_s``, each attempt short). Past ``max_pending`` the oldest metric batches are dropped and
    counted. :meth:`close` writes whatever is still undelivered to ``pending_file`` for the driver."""

    def __init__(self, inner: MetricSink, pending_file: str, max_pending: int = 10_000, retry_every_s: float = 15.0,
                 clock=time.monotonic, warn=None):
        self._warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
        self._inner, self._pending_file = inner, Path(pending_file)
        self._queue: deque[tuple[str, tuple]] = deque()
        self._max, self._retry_every_s, self._clock = max_pending, retry_every_s, clock
        self._next_try, self.dropped, self._warned = 0.0, 0, False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", {k: float(v) for k, v in metrics.items()}, step)

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", {k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call("set_tags", dict(tags))

    def log_artifacts(self, folder: str, artifact_path: str) -> None:
        self._call("log_artifacts", folder, artifact_path)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        self._call("log_table", columns, artifact_file)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _call(self, method: str, *args) -> None:
        self._queue.append((method, args))
        while len(self._queue) > self._max:
            oldest = next((i for i, (name, _) in enumerate(self._queue) if name == "log_metrics"), 0)
            del self._queue[oldest]
            self.dropped += 1
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Delivers the queue in order; False (and keeps the rest) at the first failure."""
        if not self._queue or (not force and self._clock() < self._next_try):
            return not self._queue
        with fail_fast():
            while self._queue:
                method, args = self._queue[0]
                try:
                    with patient_upload(method):
                        getattr(self._inner, method)(*args)
                except Exception as error:  # requests' ConnectionError, MlflowException, timeouts
                    self._next_try = self._clock() + self._retry_every_s
                    if not self._warned:
                        self._warn(f"MLflow is unreachable ({type(error).__name__}: {str(error)[:200]}); training "
                                   f"goes on, keeping up to {self._max} calls locally and retrying every "
                                   f"{self._retry_every_s:g} s")
                        self._warned = True
                    return False
                self._queue.popleft()
        if self._warned:
            self._warn("MLflow is reachable again; every kept call was delivered")
            self._warned = False
        return True

    def close(self) -> int:
        """A last delivery attempt; what is left (and the dropped count) goes to ``pending_file`` (JSON lines),
        written atomically. Returns the number of calls left undelivered."""
        if self.dropped and self._queue:
            self._queue.append(("set_tags", ({"orchestrator.metric_batches_dropped": str(self.dropped)},)))
        if self.flush(force=True):
            self._pending_file.unlink(missing_ok=True)
            return 0
        partial = self._pending_file.with_suffix(".partial")
        partial.write_text("".join(json.dumps({"call": m, "args": list(a)}) + "\n" for m, a in self._queue))
        os.replace(partial, self._pending_file)
        return len(self._queue)
def deliver_pending(uri: str, run_id: str, output_dir: str) -> int:
    """Delivers what an earlier run's worker left in ``output_dir/mlflow_pending.jsonl`` (then removes it);
    returns how many calls were delivered."""
    path = Path(output_dir, PENDING_FILE)
    if not path.exists():
        return 0
    calls = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sink = MlflowSink(uri, run_id)
    with fail_fast():
        for call in calls:
            with patient_upload(call["call"]):
                getattr(sink, call["call"])(*call["args"])
    path.unlink()
    return len(calls)


PROBE_TIMEOUT_S = 5  # a call that only asks or records numbers: an unreachable server is known in seconds
# Preflight's reachability probe: a server that takes the connection gets this long for its first answer (one
# restarted on a busy machine took over 5 s; the run then failed as "cannot reach"); a refused one fails at once.
FIRST_ANSWER_TIMEOUT_S = 30
UPLOAD_TIMEOUT_S = 300  # an upload's requests may take long on a busy server (a refused connection still fails)
UPLOADS = ("log_artifacts", "log_table")


@contextmanager
def patient_upload(method: str):
    """Inside :func:`fail_fast`, an upload's requests get :data:`UPLOAD_TIMEOUT_S` instead of the probe's 5 s
    (measured: on a loaded 2-core machine a tiny adapter's upload to a local server overran 5 s)."""
    if method not in UPLOADS:
        yield
        return
    with fail_fast(UPLOAD_TIMEOUT_S):
        yield


@contextmanager
def fail_fast(timeout_s: float = PROBE_TIMEOUT_S):
    """MLflow retries HTTP calls for minutes by default; a preflight probe should answer in seconds."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=f"{timeout_s:g}")
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
