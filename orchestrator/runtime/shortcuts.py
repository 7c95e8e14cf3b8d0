"""Ray's internals that cut each run's start-up: the only place that touches them, used only on the Ray
versions they were run on.

Every search trial is a Ray Train run, so each second of a run's start-up is paid once per trial. What these
buy (``tests/benchmarks/bench_startup.py`` run both ways, BENCHMARKS.md):

- :class:`TorchProcessGroup`: Ray's ``TorchConfig`` minus torch in the driver and the controller (the
  config's module imports torch; 2-4 s of CPU per trial), calling Ray's own process-group functions, with
  Ray's backend attributes and steps (``tests/test_backend.py`` compares them, and the workers' environment);
- :func:`trainer_class`: no per-run Ray Data ``DatasetManager`` actor (our workers read their own data),
  and no per-run ``PlacementGroupCleaner`` process where a study's :class:`PlacementGroupWatch` guards the run;
- :func:`worker_env`: each Train worker process imports the training stack from the moment Ray starts it
  (:mod:`orchestrator.train.warmup`, as Ray's worker-process setup hook);
- :func:`start_up_env`: the controller polls its workers every 0.25 s (Ray: 2 s), no node-drain watcher process.

:func:`enabled` decides. Off (``ORCHESTRATOR_STOCK_RAY=1``, or a Ray version not in :data:`RAN_ON`), the
launcher builds the stock public path: ``TorchTrainer`` with Ray's ``TorchConfig``, Ray's own placement-group
cleaner, no warm-up. Nothing else differs: the same training function runs either way.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any

STOCK_ENV = "ORCHESTRATOR_STOCK_RAY"  # "1": the stock public path, whatever the Ray version
RAN_ON = ("2.60.",)  # Ray versions the shortcuts were run on (a version prefix each); widen only after a run


def enabled(version: str | None = None, environ: dict[str, str] | None = None) -> bool:
    """Whether the shortcuts are used: the installed Ray (or ``version``) is one they were run on, and
    ``ORCHESTRATOR_STOCK_RAY`` is not set to 1."""
    environ = os.environ if environ is None else environ
    if environ.get(STOCK_ENV, "").strip() in ("1", "true", "yes"):
        return False
    version = version or metadata.version("ray")
    return version.startswith(RAN_ON)


def start_up_env() -> None:
    """Ray Train's settings read from the environment (the controller inherits them): its controller polls its
    workers every 0.25 s instead of 2 s (a finished run waits for the next poll before its workers stop: ~1-2 s
    per search trial), and no per-run node-drain watcher (our loop never asks ``ray.train.get_preemption_info``;
    it recovers from a lost node by its checkpoints). A user's own value wins."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def worker_env(modules: tuple[str, ...]) -> dict[str, str]:
    """Environment variables that make Ray run :func:`orchestrator.train.warmup.start` in each worker process as
    it starts (Ray's worker-process setup hook, read from the environment; the public ``runtime_env`` key is
    honoured only for a whole job), importing ``modules``."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from orchestrator.train import warmup

    return {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "orchestrator.train.warmup.start", warmup.ENV: ",".join(modules)}


@functools.cache
def trainer_class():
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
    """Ray's ``TorchConfig`` minus one thing: the driver and Ray Train's controller never import torch.
    ``TorchConfig``'s module imports torch, and every search trial runs a driver and a controller process of its
    own: 2-4 s of each trial on 2 cores.

    The rest is Ray's, and ``tests/test_backend.py`` holds it to Ray's on the installed version: the same fields
    and defaults (``backend`` None picks nccl when the workers have GPUs, else gloo; ``to_dict`` equal), the same
    backend class attributes (``share_cuda_visible_devices``: a GPU worker sees every GPU its run holds on its
    node, as DeepSpeed's ``cuda:LOCAL_RANK`` and NCCL's peer access need), and the same environment and process group on
    each worker, set up by Ray's own functions. Not carried over: TPUs (Ray's ``tpu_dist``), ``init_method="tcp"``
    (always env://), and Ray Train V1's worker group."""

    backend: str | None = None
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


# Run on the workers, importing Ray's torch functions (and torch) there, never in the controller.
def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


def _set_distributed_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()  # RANK, LOCAL_RANK, WORLD_SIZE, ..., ACCELERATE_TORCH_DEVICE, as torchrun


def _join_process_group(**options) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**options)  # with nccl: TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless the user set it


def _leave_process_group(**options) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(**options)


@functools.cache
def _backend_class():
    """``TorchConfig``'s backend (``_TorchBackend``) for the non-TPU case, step by step on Ray Train V2's
    worker group, calling Ray's functions on the workers (built on first use: importing this module does not
    import Ray)."""
    import ray
    from ray._private.ray_constants import env_integer
    from ray.train import constants
    from ray.train._internal.utils import get_address_and_port
    from ray.train.backend import Backend

    class TorchProcessGroupBackend(Backend):
        # Ray Train then sets CUDA_VISIBLE_DEVICES on each GPU worker to all the run's GPUs on its node (unless
        # TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES=0): local rank r uses cuda:r, and NCCL reaches its peers.
        share_cuda_visible_devices = True

        def on_start(self, worker_group, config: TorchProcessGroup) -> None:
            backend = config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0
                                         else "gloo")
            addr, port = worker_group.execute_single(0, get_address_and_port)
            worker_group.execute(_set_master, addr=addr, port=port)
            worker_group.execute(_set_distributed_env)  # on every worker before any joins, as Ray
            ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend, world_rank=rank,
                                                       world_size=len(worker_group), init_method="env://",
                                                       timeout_s=config.timeout_s)
                     for rank in range(len(worker_group))])

        def on_shutdown(self, worker_group, config: TorchProcessGroup) -> None:
            timeout_s = env_integer(constants.TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,  # as Ray: 30 s by default
                                    constants.DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S)
            try:
                ray.get(worker_group.execute_async(_leave_process_group,
                                                   destroy_process_group=len(worker_group) > 1), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                logging.getLogger(__name__).warning("torch process group shutdown timed out after %s s", timeout_s)

    return TorchProcessGroupBackend


def route_driver_messages(handler) -> bool:
    """Sends the messages Ray prints on the driver from its error channel (the raylet's "A worker died or was
    killed..." paragraph, out-of-memory kills, autoscaler events: Ray prints them raw, in colour, to stdout) to
    ``handler(text)`` instead; ``handler=None`` puts Ray's printer back. Returns False, changing nothing, where
    the shortcuts are off: Ray then prints them itself (uncoloured when RAY_COLOR_PREFIX=0)."""
    if not enabled():
        return False
    from ray._private import worker

    original = getattr(worker.print_to_stdstream, "ray_printer", worker.print_to_stdstream)
    if handler is None:
        worker.print_to_stdstream = original
        return True

    def routed(data, ignore_prefix):
        if data.get("pid") not in ("raylet", "autoscaler"):  # a worker's own output (-v): Ray prints it
            return original(data, ignore_prefix)
        for line in data.get("lines", []):
            handler(line)

    routed.ray_printer = original
    worker.print_to_stdstream = routed
    return True
