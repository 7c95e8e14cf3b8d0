"""Our Ray Train process-group backend (:class:`orchestrator.runtime.shortcuts.TorchProcessGroup`) against Ray's
own (``ray.train.torch.config.TorchConfig`` and its ``_TorchBackend``): the same class attributes, which Ray Train
reads to set the workers up (``share_cuda_visible_devices``: a GPU worker sees all its run's GPUs on its node,
as DeepSpeed's ``cuda:LOCAL_RANK`` and NCCL's peer access need), and the same environment on the workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.runtime.shortcuts import TorchProcessGroup
from orchestrator.spec import spec_from_dict
from tests.tiny import tiny_job

REPO = Path(__file__).resolve().parents[1]


def ray_class_attributes() -> dict[str, object]:
    """Every plain class attribute ``_TorchBackend`` has, from itself up to ``Backend``: no methods or properties,
    no dunders, and not ``_abc_impl`` (the ABC machinery's per-class cache, ``Backend``'s metaclass being an ABC)."""
    from ray.train.backend import Backend
    from ray.train.torch.config import _TorchBackend

    mro = _TorchBackend.__mro__
    return {name: getattr(_TorchBackend, name) for cls in mro[: mro.index(Backend) + 1]
            for name, value in vars(cls).items()
            if not name.startswith("__") and name != "_abc_impl"
            and not callable(value) and not isinstance(value, (property, staticmethod, classmethod))}


def test_our_backend_has_every_class_attribute_of_rays_torch_backend():
    attributes = ray_class_attributes()
    assert {"share_cuda_visible_devices", "has_replica_groups"} <= set(attributes)  # the walk finds them
    ours = TorchProcessGroup().backend_cls
    differ = {name: {"ray": ray, "ours": getattr(ours, name, "<missing>")} for name, ray in attributes.items()
              if getattr(ours, name, "<missing>") != ray}
    assert not differ, f"our backend's class attributes differ from ray.train.torch.config._TorchBackend: {differ}"


def test_our_config_describes_itself_as_rays_torch_config_does():
    from ray.train.torch.config import TorchConfig

    ours, ray = TorchProcessGroup(), TorchConfig()
    assert ours.to_dict() == ray.to_dict()  # backend None (nccl with GPUs, else gloo), env://, 1800 s
    assert TorchProcessGroup(backend="gloo", timeout_s=77).to_dict() == TorchConfig(backend="gloo",
                                                                                    timeout_s=77).to_dict()
    assert ours.framework == ray.framework


class RecordingWorkerGroup:
    """Ray Train V2's worker group as a backend sees it, recording each call instead of running it."""

    def __init__(self, workers: int, resources: dict[str, float]):
        self.workers, self.resources, self.calls = workers, resources, []

    def __len__(self) -> int:
        return self.workers

    def get_resources_per_worker(self) -> dict[str, float]:
        return self.resources

    def execute(self, fn, **kwargs):
        self.calls.append(("every worker", step(fn), kwargs))

    def execute_async(self, fn, **kwargs):
        self.calls.append(("every worker", step(fn), kwargs))
        return []

    def execute_single(self, rank, fn, **kwargs):
        self.calls.append((f"rank {rank}", step(fn), kwargs))
        return "10.0.0.7", 29500  # rank 0's address and a free port

    def execute_single_async(self, rank, fn, **kwargs):
        self.calls.append((f"rank {rank}", step(fn), kwargs))


STEPS = {  # Ray's function on a worker, and ours that does the same (importing torch on the worker only)
    "get_address_and_port": "address and port", "set_env_vars": "MASTER_ADDR/PORT",
    "_set_master": "MASTER_ADDR/PORT", "_set_torch_distributed_env_vars": "torchrun's env",
    "_set_distributed_env": "torchrun's env", "_setup_torch_process_group": "join the process group",
    "_join_process_group": "join the process group", "_shutdown_torch": "leave the process group",
    "_leave_process_group": "leave the process group"}


def step(fn) -> str:
    return STEPS.get(fn.__name__, fn.__name__)


@pytest.mark.parametrize("backend, resources", [(None, {"CPU": 1}), (None, {"CPU": 1, "GPU": 1}),
                                                ("gloo", {"CPU": 1, "GPU": 1}), ("nccl", {"CPU": 8, "GPU": 8})])
def test_our_backend_starts_and_stops_the_workers_as_rays_does(monkeypatch, backend, resources):
    """The same steps, in the same order, with the same arguments: the master's address on every worker, then
    torchrun's variables on every worker, then each rank joins (nccl when the workers have GPUs and no backend
    is named); at the end every worker leaves, waiting as long as Ray (``TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S``)."""
    import ray
    from ray.train.torch.config import TorchConfig

    waits = []
    monkeypatch.setattr(ray, "get", lambda refs, timeout=None: waits.append(timeout))
    monkeypatch.setenv("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "45")
    seen = {}
    for name, config in (("ray", TorchConfig(backend=backend, timeout_s=77)),
                         ("ours", TorchProcessGroup(backend=backend, timeout_s=77))):
        group, waits[:] = RecordingWorkerGroup(3, resources), []
        config.backend_cls().on_start(group, config)
        config.backend_cls().on_shutdown(group, config)
        seen[name] = group.calls, list(waits)
    assert seen["ours"] == seen["ray"]
    calls, waits = seen["ray"]
    joins = [kwargs for _, what, kwargs in calls if what == "join the process group"]
    assert [j["backend"] for j in joins] == [backend or ("nccl" if resources.get("GPU") else "gloo")] * 3
    assert [j["world_rank"] for j in joins] == [0, 1, 2] and {j["timeout_s"] for j in joins} == {77}
    assert waits[-1] == 45  # the shutdown's wait


# The environment a training function finds on each worker, and its process group's timeout. One fresh local
# Ray cluster with two fake GPUs (Ray assigns GPU ids and sets CUDA_VISIBLE_DEVICES without CUDA; torch sees no
# GPU, so Ray's context manager sets no device), in a process of its own: the suite's `ray_cluster` has no GPUs,
# and one process holds one cluster.
WORKER_KEYS = ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "NODE_RANK",
               "MASTER_ADDR", "ACCELERATE_TORCH_DEVICE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")
PROBE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import ray

    from orchestrator.runtime.launcher import make_trainer
    from orchestrator.spec import JobSpec
    from orchestrator.train import warmup

    spec, out, keys = JobSpec.model_validate_json(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    os.environ["RAY_worker_niceness"] = "0"  # as launcher.connect: Train's own actors must not starve the workers
    ray.init(num_cpus=2, num_gpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)

    def probe(config):
        import torch
        import torch.distributed as dist

        import ray.train

        group = dist.distributed_c10d._get_default_group()
        seen = {key: os.environ.get(key) for key in keys}
        seen.update(MASTER_PORT="MASTER_PORT" in os.environ, backend=dist.get_backend(),
                    world_size=dist.get_world_size(), cuda=torch.cuda.is_available(),
                    timeout_s=group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
        folder = out / config["path"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{ray.train.get_context().get_world_rank()}.json").write_text(json.dumps(seen))

    for path, fast in (("stock", False), ("fast", True)):  # stock first: the fast path's start-up env stays out
        trainer = make_trainer(spec, {"path": path, "tracking_uri": None}, f"backend-{path}", False, fast=fast)
        # What make_trainer built, with three changes: the probe instead of the training loop, gloo instead of
        # the NCCL a GPU spec asks for (this machine has no CUDA; the timeout stays the spec's), and the fast
        # path's worker warm-up importing only torch (the probe's import; the whole stack costs ~7 s here).
        assert trainer.backend_config.timeout_s == spec.scaling.collective_timeout_s, trainer.backend_config
        trainer.backend_config.backend = "gloo"
        trainer.train_loop_per_worker = probe
        worker_env = trainer.run_config.worker_runtime_env["env_vars"]
        assert (warmup.ENV in worker_env) == fast, worker_env
        if fast:
            worker_env[warmup.ENV] = "torch"
        trainer.fit()
    ray.shutdown()
""")


@pytest.mark.integration
def test_the_workers_find_the_environment_rays_torch_backend_sets(tmp_path):
    """Both paths of :func:`orchestrator.runtime.launcher.make_trainer` (the shortcuts' trainer with our
    ``TorchProcessGroup``, and Ray's ``TorchTrainer`` with its ``TorchConfig``) run one probe on 2 workers with a
    fake GPU each; each rank's environment and process-group timeout must be the same on both, every worker must
    see both GPUs of its node (``CUDA_VISIBLE_DEVICES=0,1``), and ``scaling.collective_timeout_s`` must be the
    process group's timeout. The trainers are make_trainer's own (scaling, run config, worker environment,
    backend config with the spec's timeout), their training function swapped for the probe (the real one trains
    a model), their backend for gloo (no NCCL without CUDA), and the fast path's warm-up cut to torch: going
    through make_trainer proves the spec reaches the process group on both paths."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("fake GPUs: on a machine with CUDA the workers would set real devices")
    spec = spec_from_dict(tiny_job(tmp_path, tmp_path / "model", tmp_path / "data",
                                   scaling={"use_gpu": True, "collective_timeout_s": 77}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES", "TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)  # a fresh cluster, and Ray's default sharing
    done = subprocess.run([sys.executable, "-c", PROBE, spec.model_dump_json(), str(tmp_path / "seen"),
                           json.dumps(WORKER_KEYS)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = {path: {int(f.stem): json.loads(f.read_text()) for f in (tmp_path / "seen" / path).glob("*.json")}
            for path in ("stock", "fast")}
    assert sorted(seen["stock"]) == sorted(seen["fast"]) == [0, 1], seen
    for rank in (0, 1):
        stock, fast = seen["stock"][rank], seen["fast"][rank]
        assert fast == stock, f"rank {rank}: ours {fast} != Ray's {stock}"
        assert stock["CUDA_VISIBLE_DEVICES"] == "0,1", stock  # each worker sees the node's two GPUs
        assert stock["ACCELERATE_TORCH_DEVICE"] == f"cuda:{rank}", stock  # cuda:LOCAL_RANK, as DeepSpeed picks
        assert stock["LOCAL_RANK"] == stock["RANK"] == str(rank) and stock["LOCAL_WORLD_SIZE"] == "2", stock
        assert stock["MASTER_PORT"] and stock["backend"] == "gloo" and not stock["cuda"], stock
        assert stock["timeout_s"] == 77, stock  # scaling.collective_timeout_s reaches the process group
