"""What fits: a setting's device memory per worker (:mod:`orchestrator.plan.memory`) and host memory per node
(:mod:`orchestrator.plan.host_memory`) against what the workers have (:class:`Budget`); the cheapest setting that
fits both, the preflight refusal, and the table ``orchestrator plan`` prints. Pure."""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.plan.host_memory import HostEstimate, host_breakdown, host_estimate
from orchestrator.plan.memory import (
    Estimate,
    GiB,
    ModelShape,
    Setting,
    breakdown,
    candidates,
    estimate_job,
    job_setting,
    overrides,
    settings_for,
)
from orchestrator.plan.precision import resolve
from orchestrator.spec import JobSpec, SpecError


@dataclass(frozen=True)
class Budget:
    """What the job's workers have (bytes; None: not known), where each number comes from, and how many of the
    workers share a node's RAM."""

    device: float | None = None  # one worker's device
    host: float | None = None  # one node's RAM
    workers_per_node: int = 1
    device_where: str = "a worker's device"
    host_where: str = "a node"


@dataclass(frozen=True)
class Fit:
    """One setting's device estimate (per worker) and host estimate (per node)."""

    device: Estimate
    host: HostEstimate

    @property
    def setting(self) -> Setting:
        return self.device.setting

    def device_fits(self, budget: Budget) -> bool:
        return budget.device is None or self.device.total <= budget.device

    def host_fits(self, budget: Budget) -> bool:
        return budget.host is None or self.host.per_node <= budget.host

    def fits(self, budget: Budget) -> bool:
        return self.device_fits(budget) and self.host_fits(budget)


def fit_job(spec: JobSpec, shape: ModelShape, setting: Setting, workers_per_node: int, partitioned: bool = True,
            device_map: bool = True) -> Fit:
    """The job at ``setting``: its device estimate and its host estimate with ``workers_per_node`` workers on a
    node (``partitioned`` / ``device_map``: the loading paths, :func:`orchestrator.plan.host_memory.loading_path`)."""
    device = estimate_job(spec, shape, setting)
    unloaded = estimate_job(spec, shape, replace(setting, offload_params=False)) if setting.offload_params else device
    host = host_estimate(shape, setting, device, world=spec.scaling.num_workers, workers_per_node=workers_per_node,
                         gpu=spec.scaling.use_gpu, load_bytes=4 if resolve(spec).model.dtype == "float32" else 2,
                         weight_partition=unloaded.weights, partitioned=partitioned, device_map=device_map)
    return Fit(device, host)


def recommend(spec: JobSpec, shape: ModelShape, budget: Budget, method: str = "lora") -> Fit | None:
    """The cheapest setting of ``method`` (:func:`orchestrator.plan.memory.candidates`) that fits both the device
    and the node, or None."""
    for setting in candidates(spec, method):
        found = fit_job(spec, shape, setting, budget.workers_per_node)
        if found.fits(budget):
            return found
    return None


def check_fits(spec: JobSpec, shape: ModelShape, budget: Budget) -> Fit:
    """Raises SpecError, with the numbers and a setting that fits (if any), when the job as specified does not fit
    a worker's device or a node's RAM (each checked when known); returns the fit."""
    found = fit_job(spec, shape, job_setting(spec), budget.workers_per_node)
    if found.fits(budget):
        return found
    needs = []
    if not found.device_fits(budget):
        needs.append(f"about {found.device.total / GiB:.1f} GiB per worker ({breakdown(found.device)}) but "
                     f"{budget.device_where} has {budget.device / GiB:.1f} GiB")
    if not found.host_fits(budget):
        needs.append(f"about {found.host.per_node / GiB:.1f} GiB of host memory per node "
                     f"({host_breakdown(found.host)}) but {budget.host_where} has {budget.host / GiB:.1f} GiB")
    better = recommend(spec, shape, budget, found.setting.method)
    if better:
        changes = overrides(spec, better.setting)
        advice = (f"this fits: {better.setting.describe()} ({better.device.total / GiB:.1f} GiB per worker, "
                  f"{better.host.per_node / GiB:.1f} GiB per node; overrides: {' '.join(changes)})")
    else:
        advice = ("nothing LoRA can do fits; use larger devices or more of them with ZeRO-3" if
                  not found.device_fits(budget) else
                  "nothing LoRA can do fits; use nodes with more RAM, or spread the workers over more nodes")
    raise SpecError(f"memory: the job needs {', and '.join(needs)}; {advice}. (orchestrator plan JOB shows the "
                    "table; pass --skip-memory-check to launch anyway)")


def plan_table(spec: JobSpec, shape: ModelShape, budget: Budget) -> list[str]:
    """The lines ``orchestrator plan`` prints: every method at every ZeRO stage (device GiB per device, host GiB
    per node), then the recommendation."""
    world, per_node = spec.scaling.num_workers, budget.workers_per_node
    share = 100 * shape.lora_trainable / shape.total_params
    lines = [f"model: {spec.model.path} ({shape.total_params / 1e6:.1f}M parameters, {shape.layers} layers, hidden "
             f"{shape.hidden}); LoRA r={spec.lora.r} trains {shape.lora_trainable / 1e6:.2f}M ({share:.2f}%)",
             f"job:   {world} data-parallel workers ({per_node} per node), micro-batch {spec.train.micro_batch_size}"
             f" x {spec.data.max_length} tokens, precision {resolve(spec).train.precision}, gradient checkpointing "
             f"{'on' if spec.train.gradient_checkpointing else 'off'}; GiB per device, host GiB per node:", ""]
    header = ["method", "ZeRO", "weights", "grads", "optimizer", "buckets", "activations", "runtime", "total",
              "host/node", "loading", "fits"]
    rows, known = [], budget.device is not None or budget.host is not None
    for setting in settings_for(spec):
        found = fit_job(spec, shape, setting, per_node)
        fits = "-" if not known else ("yes" if found.fits(budget) else
                                      "no (host)" if found.device_fits(budget) else "no")
        if setting.method == "qlora" and not spec.scaling.use_gpu:
            fits = "needs a CUDA GPU"
        device = found.device
        rows.append([setting.method, str(setting.zero_stage)] +
                    [f"{v / GiB:.2f}" for v in (device.weights, device.gradients, device.optimizer, device.buffers,
                                                device.activations, device.runtime, device.total)]
                    + [f"{found.host.per_node / GiB:.1f}", found.host.path, fits])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) if 1 <= i <= 9 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in [header, *rows]]
    lines.append("")
    if budget.device is None and budget.host is None:
        lines.append("pass --device-memory (e.g. 80GiB) and --host-memory (e.g. 1TB) for a recommendation")
        return lines
    job = fit_job(spec, shape, job_setting(spec), per_node)
    have = " and ".join(part for part in (
        f"{job.device.total / GiB:.2f} GiB per device of {budget.device / GiB:.1f} GiB" if budget.device else "",
        f"{job.host.per_node / GiB:.1f} GiB per node of {budget.host / GiB:.1f} GiB" if budget.host else "") if part)
    lines.append(f"as specified ({job.setting.describe()}): {have}: {'fits' if job.fits(budget) else 'does NOT fit'}")
    if job.fits(budget):
        return lines
    for method in ("lora", "qlora") if spec.scaling.use_gpu else ("lora",):
        best = recommend(spec, shape, budget, method)
        if best:
            changes = overrides(spec, best.setting)
            lines.append(f"recommended: {best.setting.describe()}: {best.device.total / GiB:.2f} GiB per device, "
                         f"{best.host.per_node / GiB:.1f} GiB per node"
                         + (f" (overrides: {' '.join(changes)})" if changes else " (the job as it is)"))
            return lines
    limits = " and ".join(part for part in (f"{budget.device / GiB:.1f} GiB per device" if budget.device else "",
                                            f"{budget.host / GiB:.1f} GiB per node" if budget.host else "") if part)
    lines.append(f"nothing fits {limits}: not LoRA at any ZeRO stage, micro-batch, checkpointing or offload"
                 + (" nor QLoRA" if spec.scaling.use_gpu else "") +
                 "; use devices with more memory, or more workers with ZeRO-3")
    return lines


__all__ = ["Budget", "Fit", "fit_job", "recommend", "check_fits", "plan_table"]
