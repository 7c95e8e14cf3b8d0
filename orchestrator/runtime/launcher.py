"""Ray Train: connect or start a cluster, check the workers fit, build and run the trainer (shortcuts or stock).

Each Ray Train worker runs :func:`orchestrator.train.loop.train_worker` with a :class:`RayContext`. Progress
flows back to the driver's console through a small Ray queue (``ray.train.report`` blocks for the
controller's poll interval, so it is called only at evaluation and checkpoint steps).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.plan.placement import memory_share, placement_budget, placement_problem, worker_resources
from orchestrator.runtime import shortcuts
from orchestrator.spec import JobSpec, SpecError
from orchestrator.train import warmup

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


class TrainingFailed(RuntimeError):
    """The Ray Train run failed; the message holds the worker's error."""


class RayContext:
    """The worker side of Ray Train behind :class:`orchestrator.train.session.WorkerContext`."""

    def __init__(self, progress_queue):
        import ray
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.node_id = ray.get_runtime_context().get_node_id()
        self._queue = progress_queue

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None, name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint_dir else None)

    def progress(self, update: dict[str, Any]) -> None:
        if self._queue is not None and self.rank == 0:
            self._queue.actor.put_nowait.remote(update)  # fire and forget: never stall training on the console


def _worker_entry(config: dict[str, Any]) -> None:
    from orchestrator.train import warmup

    warmup.wait()  # the imports this process started when Ray created it
    from orchestrator.train.loop import train_worker

    spec = JobSpec.model_validate(config["spec"])
    import ray

    run_id = config["run_id"]
    if isinstance(run_id, ray.ObjectRef):  # a trial's child run, created by a task beside Ray Train's start-up
        run_id = ray.get(run_id)
    train_worker(spec, RayContext(config["progress"]), config["tracking_uri"], run_id)


IN_RAY_JOB = "ORCHESTRATOR_IN_RAY_JOB"  # set by `orchestrator submit` in the job's environment


def connect(verbose: bool = False) -> None:
    """Joins the cluster at $RAY_ADDRESS, or starts a local one; Ray's log noise stays out unless verbose."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray starts workers at nice 15; on a few cores Train's own actors then preempt the training workers
        # for their first ~40 steps (measured: 64 -> 85 samples/s ramp on 2 cores; flat at nice 0).
        os.environ.setdefault("RAY_worker_niceness", "0")
    # Loopback only. The dashboard serves Ray's state API, which Train's PlacementGroupCleaner needs to free a
    # stopped run's placement group (without it, an early-stopped trial's CPUs stay reserved and the search stalls).
    local = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1",
                                "_node_ip_address": "127.0.0.1"}
    here = os.getcwd()
    on_term = signal.getsignal(signal.SIGTERM)
    ray.init(
        address=address,
        **local,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
    )
    if callable(on_term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)  # ray.init replaces it with sys.exit: the run would end FAILED
    # Inside a Ray job (orchestrator submit), Ray re-extracts the uploaded working_dir under the running driver,
    # during ray.init or later, leaving this process's cwd on a deleted copy: os.getcwd() then fails (measured on
    # Ray 2.60, e.g. in MLflow's SQLite store). The spec's paths are absolute by now, so a job's driver moves to a
    # directory Ray does not manage; the cwd only has to exist for libraries that ask for it.
    if os.environ.get(IN_RAY_JOB):
        os.chdir(tempfile.gettempdir())
    elif os.path.isdir(here):
        os.chdir(here)


@contextmanager
def driver_messages(on_notice: Callable[[str], object] | None, verbose: bool = False) -> Iterator[None]:
    """While inside, what Ray itself prints on this driver reaches ``on_notice(text)`` (one call per message,
    raw: the caller strips and deduplicates) instead of the terminal: the raylet's messages (a worker died, was
    killed for memory) and the ERROR records of Ray's loggers (their first line; the traceback stays behind
    ``-v``). Verbose, or ``on_notice`` None: Ray prints as it does by default."""
    if verbose or on_notice is None:
        yield
        return
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # where the shortcuts are off, Ray prints them, uncoloured
    routed = shortcuts.route_driver_messages(on_notice)
    records = _RecordsTo(on_notice)
    handlers = logging.getLogger("ray").handlers
    for handler in handlers:
        handler.addFilter(records)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(records)
        if routed:
            shortcuts.route_driver_messages(None)


class _RecordsTo(logging.Filter):
    """A handler filter: a record of Ray's loggers goes to ``on_notice`` (its first line), not to the handler."""

    def __init__(self, on_notice: Callable[[str], object]):
        super().__init__()
        self._on_notice = on_notice

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            text = record.getMessage().strip()
            self._on_notice(text.splitlines()[0] if text else "")
        return False


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_placement(spec: JobSpec) -> None:
    """Refuses, with the numbers, a job whose workers the cluster cannot place (Ray would wait forever)."""
    problem = placement_problem(spec, cluster_nodes())
    if problem:
        raise SpecError(problem)


def probe_device(spec: JobSpec):
    """A GPU worker's device (:class:`orchestrator.plan.precision.Device`: name, compute capability, bf16,
    memory, the attention packages importable there), read by a one-GPU Ray task on the cluster; None for a CPU
    job, or when no GPU is free within a minute (the workers then check it themselves)."""
    if not spec.scaling.use_gpu:
        return None
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def read_device():
        from orchestrator.train.device import local_device

        return local_device(True)

    try:
        return ray.get(read_device.remote(), timeout=60)
    except Exception:  # noqa: BLE001 - busy or unreadable: the workers read their own device
        return None


def device_memory(spec: JobSpec, nodes: list[dict[str, float]], device=None) -> tuple[float | None, str]:
    """Bytes of memory one worker's device has, and where that number comes from: ``scaling.device_memory_gb``;
    else a GPU's total memory as :func:`probe_device` read it (``device``); else, on CPU, each worker's share of
    a node's Ray ``memory`` (:func:`orchestrator.plan.placement.memory_share`). None when it cannot be told."""
    if spec.scaling.device_memory_gb:
        return spec.scaling.device_memory_gb * 1024**3, "scaling.device_memory_gb"
    if spec.scaling.use_gpu:
        if device is None or device.memory_bytes is None:
            return None, "the cluster's GPUs (not readable)"
        return device.memory_bytes, f"the cluster's GPUs ({device.name})"
    share = memory_share(nodes, worker_resources(spec), spec.scaling.num_workers)
    return (share, "each worker's share of a node's Ray memory") if share else (None, "the cluster")


def check_memory(spec: JobSpec, shape, nodes: list[dict[str, float]], device=None) -> None:
    """Refuses, with the numbers, a job whose estimate exceeds a worker's device (:mod:`orchestrator.plan.memory`)
    or a node's RAM (:mod:`orchestrator.plan.host_memory`), each checked where it is known."""
    from orchestrator.plan.fitting import Budget, check_fits
    from orchestrator.plan.host_memory import node_memory, workers_per_node

    available, where = device_memory(spec, nodes, device)
    host, host_where = node_memory(spec, nodes)
    if available is not None or host is not None:
        check_fits(spec, shape, Budget(available, host, workers_per_node(spec, nodes), where, host_where))


def run_training(spec: JobSpec, tracking_uri: str, run_id: str, on_progress: Callable[[dict], None],
                 verbose: bool = False) -> dict[str, float]:
    """Runs the job on the connected cluster; returns rank 0's final metrics.

    Raises:
        TrainingFailed: when the workers fail beyond ``scaling.max_failures``.
    """
    import ray
    from ray.util.queue import Empty, Queue

    # On the driver's node: losing a worker node must not take the console's progress with it.
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": driver_node()})
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            try:
                on_progress(progress.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue actor is gone at shutdown
                return

    trainer = make_trainer(spec, {"spec": spec.model_dump(), "progress": progress, "tracking_uri": tracking_uri,
                                  "run_id": run_id}, spec.run_name(), verbose)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    # fit() sets a Ctrl-C handler that aborts the run; it holds the run's controller, which Ray ends only once
    # no handle is left: a driver that lives on (a notebook, a test session) kept a controller process per run.
    on_int = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        result = trainer.fit()
    except Exception as error:  # Ray wraps worker errors in TrainingFailedError and friends
        raise TrainingFailed(worker_error(error)) from error
    finally:
        if on_int is not None:
            signal.signal(signal.SIGINT, on_int)
        stop.set()
        thread.join(timeout=2)
        try:
            while not progress.empty():  # deliver what arrived after the pump stopped
                on_progress(progress.get_nowait())
        except ray.exceptions.RayError:
            pass  # the queue's node is gone: its last lines are lost, the outcome is not
    if result.error:
        raise TrainingFailed(worker_error(result.error))
    return dict(result.metrics or {})


def make_trainer(spec: JobSpec, loop_config: dict[str, Any], name: str, verbose: bool, callbacks=(),
                 fast: bool | None = None):
    """The Ray Train trainer for one training job; rerunning with the same name and output folder resumes it.

    ``fast`` (default: :func:`orchestrator.runtime.shortcuts.enabled`) builds Ray Train's data-parallel trainer
    with the start-up shortcuts of :mod:`orchestrator.runtime.shortcuts`; otherwise Ray's stock ``TorchTrainer``
    with its ``TorchConfig``. The same training function runs either way.
    """
    import ray.train

    fast = shortcuts.enabled() if fast is None else fast
    # Each attempt to place the worker group waits `attempt_s` (Ray Train propagates the variable to its
    # controller); failed attempts are retried up to scaling.resource_wait_s in all. Ray's default retries
    # forever: a run that lost a node for good would hang instead of failing.
    attempt_s, retries = placement_budget(spec.scaling.resource_wait_s)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(attempt_s)
    backend = "nccl" if spec.scaling.use_gpu else "gloo"
    env = worker_env_vars(spec, verbose)
    if fast:
        shortcuts.start_up_env()
        env.update(shortcuts.worker_env(warmup.modules_for(loop_config["tracking_uri"])))
    options = {
        "train_loop_config": loop_config,
        "scaling_config": ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=worker_resources(spec),
            placement_strategy=spec.scaling.placement_strategy,
        ),
        "run_config": ray.train.RunConfig(
            name=name,
            storage_path=os.path.join(spec.output_dir, "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures,
                                                   controller_failure_limit=retries),
            worker_runtime_env={"env_vars": env},
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            callbacks=list(callbacks),
        ),
    }
    if fast:
        return shortcuts.trainer_class()(_worker_entry, backend_config=shortcuts.TorchProcessGroup(
            backend=backend, timeout_s=spec.scaling.collective_timeout_s),
                                         **options)
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(_worker_entry, torch_config=TorchConfig(backend=backend,
                                                                timeout_s=spec.scaling.collective_timeout_s),
                        **options)


def worker_env_vars(spec: JobSpec, verbose: bool) -> dict[str, str]:
    """The Ray Train workers' environment: DeepSpeed's accelerator and the libraries' log levels."""
    return {"DS_ACCELERATOR": "cuda" if spec.scaling.use_gpu else "cpu",
            "TRANSFORMERS_VERBOSITY": "info" if verbose else "error",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_DISABLE_PROGRESS_BARS": "0" if verbose else "1"}


def driver_node(soft: bool = True):
    """Ray's scheduling strategy for a helper that belongs beside the driver (``soft=False``: only there)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=soft)


def start_beside_driver(cls, *args, soft: bool = True):
    """An actor of ``cls`` (no CPU) on the driver's node, returned once its ``ready()`` has returned."""
    import ray

    actor = ray.remote(num_cpus=0)(cls).options(scheduling_strategy=driver_node(soft)).remote(*args)
    ray.get(actor.ready.remote())
    return actor


def start_placement_group_watch():
    """A running :class:`orchestrator.runtime.shortcuts.PlacementGroupWatch` on the driver's node; pass it to
    :func:`orchestrator.runtime.shortcuts.watched_by`."""
    return start_beside_driver(shortcuts.PlacementGroupWatch)


# A worker whose process died (killed, OOM, lost node). When one dies mid-step, the others fail too, with the
# collective's error on the broken connection (gloo: "Connection reset by peer"); Ray lists every worker's
# failure, in no fixed order, and the death is the cause.
WORKER_DEATHS = ("WorkerHealthCheckFailedError", "ActorDiedError", "RayActorError", "ActorUnavailableError")


def worker_error(error: BaseException) -> str:
    """The last line of the worker's traceback (the actual error), not Ray's wrapping; a worker's death before
    the errors it caused in the others."""
    failures = list((getattr(error, "worker_failures", None) or {}).values())
    error = next((f for f in failures if type(f).__name__ in WORKER_DEATHS), error)
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else type(error).__name__
