"""The only module that talks to Ray: connect or start a cluster, check the workers fit, run the TorchTrainer.

Each Ray Train worker runs :func:`orchestrator.train.loop.train_worker` with a :class:`RayContext`. Progress
flows back to the driver's console through a small Ray queue (``ray.train.report`` blocks for the
controller's poll interval, so it is called only at evaluation and checkpoint steps).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from orchestrator.plan.placement import placement_problem, worker_resources
from orchestrator.spec import JobSpec, SpecError

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


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each live node."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def check_placement(spec: JobSpec) -> None:
    """Refuses, with the numbers, a job whose workers the cluster cannot place (Ray would wait forever)."""
    problem = placement_problem(spec, cluster_nodes())
    if problem:
        raise SpecError(problem)


def device_memory(spec: JobSpec, nodes: list[dict[str, float]]) -> tuple[float | None, str]:
    """Bytes of memory one worker's device has, and where that number comes from: ``scaling.device_memory_gb``;
    else a GPU's total memory read by a one-GPU Ray task; else, on CPU, the smallest share of a node's Ray
    ``memory`` resource among the workers that node can hold. None when it cannot be told."""
    from orchestrator.plan.placement import worker_resources

    if spec.scaling.device_memory_gb:
        return spec.scaling.device_memory_gb * 1024**3, "scaling.device_memory_gb"
    if spec.scaling.use_gpu:
        import ray

        @ray.remote(num_gpus=1, num_cpus=0)
        def gpu_memory() -> int:
            import torch

            return torch.cuda.get_device_properties(0).total_memory

        try:
            return float(ray.get(gpu_memory.remote(), timeout=60)), "the cluster's GPUs"
        except Exception:  # no GPU free within a minute: launch, and let the workers report
            return None, "the cluster's GPUs (not readable)"
    need = worker_resources(spec)
    shares = []
    for node in nodes:
        fit = min(int(node.get(k, 0) // v) for k, v in need.items() if v > 0)
        if fit and node.get("memory"):
            shares.append(node["memory"] / min(fit, spec.scaling.num_workers))
    return (min(shares), "each worker's share of a node's Ray memory") if shares else (None, "the cluster")


def check_memory(spec: JobSpec, shape, nodes: list[dict[str, float]]) -> None:
    """Refuses, with the numbers, a job whose estimate (:mod:`orchestrator.plan.memory`) exceeds a worker's device."""
    from orchestrator.plan.memory import check_fits

    available, where = device_memory(spec, nodes)
    if available is not None:
        check_fits(spec, shape, available, where)


def placement_budget(spec: JobSpec) -> tuple[float, int]:
    """(seconds one attempt at placing the worker group may wait, Ray Train's controller_failure_limit): the
    attempts add up to ``scaling.resource_wait_s``; None keeps Ray's default of retrying forever (-1)."""
    wait = spec.scaling.resource_wait_s
    if wait is None:
        return 60.0, -1
    attempt = min(wait, 60.0)
    return attempt, math.ceil(wait / attempt) - 1


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


def make_trainer(spec: JobSpec, loop_config: dict[str, Any], name: str, verbose: bool, callbacks=()):
    """The Ray Train trainer for one training job (Ray's TorchTrainer, with :class:`TorchProcessGroup` as its
    torch config); rerunning with the same name and output folder resumes it."""
    import ray.train

    # Each attempt to place the worker group waits `attempt_s` (Ray Train propagates the variable to its
    # controller); failed attempts are retried up to scaling.resource_wait_s in all. Ray's default retries
    # forever: a run that lost a node for good would hang instead of failing.
    attempt_s, retries = placement_budget(spec)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(attempt_s)
    # The controller polls its workers this often (Ray's default: 2 s); a finished run waits for the next poll
    # before its workers are shut down, so each trial of a search ended ~1-2 s late.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray Train starts a process per run to watch for node drains and hand the news to the training function
    # (ray.train.get_preemption_info); our loop does not ask, and recovers from a lost node by its checkpoints.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return _trainer_class()(
        _worker_entry,
        train_loop_config=loop_config,
        backend_config=TorchProcessGroup(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=worker_resources(spec),
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=os.path.join(spec.output_dir, "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=spec.scaling.max_failures,
                                                   controller_failure_limit=retries),
            worker_runtime_env=worker_runtime_env(spec, loop_config["tracking_uri"], verbose),
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING"),
            callbacks=list(callbacks),
        ),
    )


def worker_runtime_env(spec: JobSpec, tracking_uri: str | None, verbose: bool) -> dict[str, Any]:
    """The Ray Train workers' runtime environment. Each worker process starts importing the training stack
    the moment Ray starts it, while Ray Train is still setting it up (:mod:`orchestrator.train.warmup`, run as Ray's
    worker-process setup hook)."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from orchestrator.train import warmup

    return {"env_vars": {"DS_ACCELERATOR": "cuda" if spec.scaling.use_gpu else "cpu",
                         "TRANSFORMERS_VERBOSITY": "info" if verbose else "error",
                         "TOKENIZERS_PARALLELISM": "false",
                         "HF_HUB_DISABLE_PROGRESS_BARS": "0" if verbose else "1",
                         WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "orchestrator.train.warmup.start",
                         warmup.ENV: ",".join(warmup.modules_for(tracking_uri))}}


@functools.cache
def _trainer_class():
    """Ray Train's data-parallel trainer, without the Ray Data actor it starts for every run even when the run
    has no Ray datasets (a DatasetManager process: ~1.4 s of CPU per run, per search trial; our workers read
    their own data, :mod:`orchestrator.train.tasks`), and without its per-run placement-group cleaner process when the
    run is watched by a :class:`PlacementGroupWatch` instead (:func:`watched_by`)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class Trainer(DataParallelTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            drop = (DatasetsCallback, PlacementGroupCleanerCallback) if any(
                getattr(c, "replaces_placement_group_cleaner", False) for c in callbacks) else (DatasetsCallback,)
            return [c for c in callbacks if not isinstance(c, drop)]

    return Trainer


class PlacementGroupWatch:
    """Removes the placement group of a Ray Train run whose controller died without removing it; one per
    search study, a Ray actor (no CPU) on the driver's node, watching every trial.

    When Tune stops a trial early it ends the trial's process, and Ray ends the trial's Train controller with
    it: the workers die, their placement group stays reserved until someone removes it. Ray Train starts a
    cleaner process per run for this (``PlacementGroupCleaner``: a fresh process importing Ray Train, per
    trial, polling the dashboard every second, and at the run's end stopping it waits up to that second).
    Here one thread asks Ray's control store (GCS) every ``interval_s`` whether each watched controller is
    still alive (~0.5 ms a question), and removes the group of one that is dead, unless already removed.
    A study's watcher ends with the study's driver, and Ray removes the driver's placement groups then."""

    def __init__(self, interval_s: float = 0.2):
        self._groups: dict[str, Any] = {}  # controller actor id -> its worker group's placement group
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, args=(interval_s,), name="placement-group-watch", daemon=True).start()

    def ready(self) -> None:
        """Returns once the actor runs."""

    def watch(self, controller_id: str, group) -> None:
        """The controller's current worker group is placed in ``group`` (a restarted group replaces the last)."""
        with self._lock:
            self._groups[controller_id] = group

    def release(self, controller_id: str) -> None:
        """The controller shut its worker group down itself (placement group removed)."""
        with self._lock:
            self._groups.pop(controller_id, None)

    def watched(self) -> list[str]:
        with self._lock:
            return list(self._groups)

    def _watch(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            with self._lock:
                watched = list(self._groups.items())
            for controller_id, group in watched:
                try:
                    if _actor_alive(controller_id):
                        continue
                    _remove_unless_removed(group)
                except Exception as error:  # noqa: BLE001 - GCS briefly unreachable: ask again next round
                    logging.getLogger(__name__).warning("placement group watch: %s", error)
                    continue
                with self._lock:
                    if self._groups.get(controller_id) is group:
                        del self._groups[controller_id]


def _actor_alive(actor_id: str) -> bool:
    from ray._private.state import actors

    return actors(actor_id=actor_id).get("State") != "DEAD"


def _remove_unless_removed(group) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    if ray.util.placement_group_table(group).get("state", "REMOVED") != "REMOVED":
        logging.getLogger(__name__).info("removing placement group %s of a Ray Train run that died", group.id.hex())
        remove_placement_group(group)


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
    """A running :class:`PlacementGroupWatch` on the driver's node; pass it to :func:`watched_by`."""
    return start_beside_driver(PlacementGroupWatch)


def watched_by(watch):
    """The Ray Train callback (``RunConfig.callbacks``) that has ``watch`` guard the run's placement group, in
    place of Ray Train's per-run cleaner process."""
    return _watched_class()(watch)


@functools.cache
def _watched_class():
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

    class Watched(ControllerCallback, WorkerGroupCallback):
        replaces_placement_group_cleaner = True

        def __init__(self, watch):
            self.watch, self.controller_id = watch, None

        def after_controller_start(self, train_run_context) -> None:
            self.controller_id = ray.get_runtime_context().get_actor_id()

        def after_worker_group_start(self, worker_group) -> None:
            group = worker_group.get_worker_group_state().placement_group_handle.placement_group
            try:
                ray.get(self.watch.watch.remote(self.controller_id, group), timeout=60)
            except Exception as error:  # noqa: BLE001 - as Ray's cleaner: the run goes on, unguarded
                logging.getLogger(__name__).warning(
                    "placement group %s is not watched (%s): if this run's controller dies, its resources stay "
                    "reserved until the study's driver ends", group.id.hex(), error)

        async def before_controller_shutdown(self) -> None:  # the worker group, and its group, are gone
            self.watch.release.remote(self.controller_id)

    return Watched


@dataclass
class TorchProcessGroup:
    """Ray's ``TorchConfig`` (env:// process group, one rank per worker, Ray's own setup functions), minus one
    thing: the driver and Ray Train's controller never import torch. ``TorchConfig``'s module imports torch, and
    every search trial runs a driver and a controller process of its own: 2-4 s of each trial on 2 cores."""

    backend: str = "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return _backend_class()

    @property
    def train_func_context(self):
        return _TorchDeviceContext

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class _TorchDeviceContext:
    """On each worker around the training function: Ray's (sets the CUDA device of a GPU worker)."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


def _join_process_group(**options) -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    _set_torch_distributed_env_vars()  # RANK, LOCAL_RANK, WORLD_SIZE, ... as torchrun sets them
    _setup_torch_process_group(**options)


def _leave_process_group(**options) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(**options)


@functools.cache
def _backend_class():
    """``TorchConfig``'s backend for the non-TPU case, calling the same functions on the workers (built on
    first use: importing this module does not import Ray)."""
    import ray
    from ray.train._internal.utils import get_address_and_port
    from ray.train.backend import Backend

    class TorchProcessGroupBackend(Backend):
        def on_start(self, worker_group, config: TorchProcessGroup) -> None:
            addr, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute(_set_master, addr=addr, port=port)
            ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=config.backend,
                                                       world_rank=rank, world_size=len(worker_group),
                                                       init_method="env://", timeout_s=config.timeout_s)
                     for rank in range(len(worker_group))])

        def on_shutdown(self, worker_group, config: TorchProcessGroup) -> None:
            try:
                ray.get(worker_group.execute_async(_leave_process_group,
                                                   destroy_process_group=len(worker_group) > 1), timeout=30)
            except ray.exceptions.GetTimeoutError:
                logging.getLogger(__name__).warning("torch process group shutdown timed out after 30 s")

    return TorchProcessGroupBackend


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
