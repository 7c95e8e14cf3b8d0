"""Host memory (a node's RAM) before launch: what each worker holds in host RAM while it loads the base model and
while it trains, times the workers that share a node. Pure arithmetic over :class:`ModelShape` and the device
estimate (:mod:`orchestrator.plan.memory`).

**Loading**, by the path the workers take (:func:`loading_path`):

- ``partitioned``: ZeRO-3 (GPU or CPU). transformers builds the model under DeepSpeed's ``zero.Init`` (an
  ``HfDeepSpeedConfig`` alive during ``from_pretrained``), which partitions each module as it is created: a worker
  holds one module whole (the largest: the embedding or output layer, or an MLP projection) in the load dtype,
  and its partition of the weights (total / world x bytes), which sits in host RAM with parameter offload or on
  a CPU worker and on the GPU otherwise. Rank 0 alone reads the checkpoint, one safetensors shard at a time: its
  node holds one shard more.
- ``device map``: ZeRO 0-2 on a GPU, and QLoRA (4-bit weights are quantized on their way to the GPU). Each shard's
  tensors go straight to the local GPU: a worker holds about one shard.
- ``whole``: ZeRO 0-2 on CPU, and what a setting costs without the path above (``partitioned=False``,
  ``device_map=False``: the loop before them): each worker materializes the whole base in host RAM (total x
  load-dtype bytes) before DeepSpeed moves or partitions it.

A shard is the checkpoint's largest file when the model folder has them (``ModelShape.largest_shard``), else
transformers' default ``max_shard_size`` of 5 GB (or the whole model when smaller).

**Training**: optimizer offload keeps the fp32 master copy, Adam's m and v and the fp32 gradients of the trainable
parameters (16 bytes each) in host RAM, partitioned across the workers (ZeRO >= 1); parameter offload (ZeRO-3)
keeps the worker's partition of the weights there (pinned). A worker's loading peak and its training come one
after the other (the loaded copy is moved or partitioned before DeepSpeed allocates the optimizer): it holds the
larger of the two.

**On CPU the host RAM is the device**: the device estimate already counts weights, optimizer states, activations
and the process there, so a CPU worker holds the larger of its loading peak and its device estimate (with the
states that "offload to CPU" added back: they stay in the same RAM), counted once.

**Runtime**: each GPU worker process holds :data:`HOST_RUNTIME_GPU` of host RAM (Python with torch,
transformers, PEFT and DeepSpeed imported, as :data:`orchestrator.plan.memory.RUNTIME_CPU` measured, plus the
CUDA, cuBLAS and NCCL host libraries and pinned staging buffers: an allowance, not a measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.plan.memory import Estimate, GiB, ModelShape, Setting
from orchestrator.plan.placement import worker_resources
from orchestrator.spec import JobSpec

HOST_RUNTIME_GPU = 2.0 * GiB  # RUNTIME_CPU's 1 GiB of Python + torch et al., and ~1 GiB of CUDA/NCCL host side
DEFAULT_SHARD = 5e9  # transformers' default max_shard_size ("5GB") when the checkpoint's files are not known
GPUS_PER_NODE = 8  # the usual GPU node, for workers per node before a cluster says
OFFLOADED_BYTES = 16  # per trainable parameter: fp32 master, Adam m and v, fp32 gradients
PATHS = ("partitioned", "device map", "whole")


@dataclass(frozen=True)
class HostEstimate:
    """Bytes of host RAM: per worker while loading and while training, and per node."""

    path: str  # how the base loads: partitioned | device map | whole
    workers: int  # of the job's workers on one node
    loading: float  # per worker, while the base loads
    training: float  # per worker, while it trains (offloaded states; on CPU the whole device estimate)
    runtime: float  # per worker process (on CPU inside ``training``: the device estimate counts it)
    reader: float = 0.0  # rank 0's node: the one shard it reads more than the others (partitioned loading)

    @property
    def per_worker(self) -> float:
        return max(self.loading, self.training) + self.runtime

    @property
    def per_node(self) -> float:
        return self.workers * self.per_worker + self.reader


def loading_path(setting: Setting, gpu: bool, partitioned: bool = True, device_map: bool = True) -> str:
    """The path the base loads by (see the module docstring): ZeRO-3 partitioned; ZeRO 0-2 and QLoRA on a GPU a
    device map; ZeRO 0-2 on CPU the whole base on every worker. ``partitioned`` / ``device_map`` off: the whole
    base on every worker instead (the loop before those paths)."""
    if setting.method == "qlora" and gpu:
        return "device map" if device_map else "whole"
    if setting.zero_stage == 3:
        return "partitioned" if partitioned else "whole"
    return "device map" if gpu and device_map else "whole"


def host_estimate(shape: ModelShape, setting: Setting, device: Estimate, *, world: int, workers_per_node: int,
                  gpu: bool, load_bytes: int, weight_partition: float, partitioned: bool = True,
                  device_map: bool = True) -> HostEstimate:
    """Host RAM for one setting. ``device``: the setting's device estimate; ``load_bytes``: bytes per weight
    as loaded (the model dtype); ``weight_partition``: a worker's ZeRO-3 share of the weights in bytes (what
    parameter offload keeps in host RAM)."""
    path = loading_path(setting, gpu, partitioned, device_map)
    n = max(1, world)
    whole = shape.total_params * load_bytes
    shard = min(shape.largest_shard or DEFAULT_SHARD, whole)
    largest_module = max(shape.vocab, shape.intermediate, shape.hidden) * shape.hidden * load_bytes
    resident = setting.offload_params or not gpu  # where zero.Init keeps the partition: host RAM or the GPU
    loading = {"partitioned": largest_module + (weight_partition if resident else 0.0),
               "device map": shard, "whole": whole}[path]
    offloaded = 0.0
    if setting.offload_optimizer and setting.zero_stage >= 1:
        offloaded += device.trainable * OFFLOADED_BYTES / n
    if setting.offload_params and setting.zero_stage == 3:
        offloaded += weight_partition
    reader = shard if path == "partitioned" else 0.0
    if not gpu:  # the device is this RAM: its estimate (runtime included) plus what offload moved within it
        return HostEstimate(path, workers_per_node, loading + device.runtime, device.total + offloaded, 0.0, reader)
    return HostEstimate(path, workers_per_node, loading, offloaded, HOST_RUNTIME_GPU, reader)


def workers_per_node(spec: JobSpec, nodes: list[dict[str, float]]) -> int:
    """How many of the job's workers share a node: ``scaling.workers_per_node``; else, with the cluster's nodes,
    the most any node holds (a worker's resources; PACK fills a node first); else one under STRICT_SPREAD, and
    ``num_workers`` up to :data:`GPUS_PER_NODE` on a GPU job (one GPU each), all of them on CPU (one machine)."""
    scaling = spec.scaling
    if scaling.workers_per_node:
        return min(scaling.workers_per_node, scaling.num_workers)
    if scaling.placement_strategy == "STRICT_SPREAD":
        return 1
    need = worker_resources(spec)
    held = [min(int(node.get(k, 0) // v) for k, v in need.items() if v > 0) for node in nodes]
    if any(held):
        return min(max(held), scaling.num_workers)
    return min(scaling.num_workers, GPUS_PER_NODE) if scaling.use_gpu else scaling.num_workers


def node_memory(spec: JobSpec, nodes: list[dict[str, float]]) -> tuple[float | None, str]:
    """Bytes of host RAM one node has, and where that number comes from: ``scaling.host_memory_gb``; else the
    least Ray ``memory`` (RAM less the object store's share) of the nodes that can hold a worker; None when not
    known (no cluster yet, or no node says)."""
    if spec.scaling.host_memory_gb:
        return spec.scaling.host_memory_gb * GiB, "scaling.host_memory_gb"
    need = worker_resources(spec)
    sizes = [node["memory"] for node in nodes if node.get("memory")
             and min(int(node.get(k, 0) // v) for k, v in need.items() if v > 0)]
    return (min(sizes), "a node's Ray memory") if sizes else (None, "the cluster's nodes")


def host_breakdown(found: HostEstimate) -> str:
    """'8 workers x (loading 12.3 or training 4.5, + runtime 2.0) + rank 0's shard 4.7' in GiB."""
    text = (f"{found.workers} worker{'s' * (found.workers != 1)} x (loading {found.loading / GiB:.1f} "
            f"({found.path}) or training {found.training / GiB:.1f}"
            + (f", + runtime {found.runtime / GiB:.1f}" if found.runtime else "") + ")")
    return text + (f" + rank 0's shard {found.reader / GiB:.1f}" if found.reader else "")


__all__ = ["HOST_RUNTIME_GPU", "DEFAULT_SHARD", "HostEstimate", "loading_path", "host_estimate", "workers_per_node",
           "node_memory", "host_breakdown"]
