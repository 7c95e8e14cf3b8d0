"""This process's accelerator as a :class:`orchestrator.plan.precision.Device`: read on each worker (where
precision ``auto`` is decided) and by the driver's one-GPU probe task."""

from __future__ import annotations

import importlib.util
import os

from orchestrator.plan.precision import CPU, KERNEL_PACKAGES, QUANTIZATION_PACKAGE, Device


def local_device(use_gpu: bool) -> Device:
    """The current CUDA device (``torch.cuda.current_device()``: Ray's worker context sets it to the worker's
    own GPU) when ``use_gpu``, else the CPU. Raises RuntimeError when a GPU is wanted and CUDA has none."""
    import torch

    if not use_gpu:
        return CPU
    if not torch.cuda.is_available():
        raise RuntimeError("scaling.use_gpu is true but this worker sees no CUDA device (torch "
                           f"{torch.__version__}, CUDA {torch.version.cuda}); check the node's driver and the "
                           "worker's CUDA_VISIBLE_DEVICES")
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    packages = frozenset(module for module, _ in [*KERNEL_PACKAGES.values(), QUANTIZATION_PACKAGE]
                         if importlib.util.find_spec(module))
    return Device("cuda", properties.name, (properties.major, properties.minor),
                  bool(torch.cuda.is_bf16_supported(including_emulation=False)), float(properties.total_memory),
                  packages)


def use_tf32(device: Device) -> None:
    """TF32 for the fp32 matmuls on Ampere and newer (torch's default keeps them at full fp32; cuDNN's
    convolutions already use TF32). The stable switch, valid on every torch 2.x."""
    import torch

    if device.tf32:
        torch.set_float32_matmul_precision("high")


class PeakMemory:
    """This worker's memory in use and its peak since the last :meth:`reset`: the CUDA allocator's on a GPU,
    the process's resident set on a CPU (Linux resets its high-water mark through /proc/self/clear_refs; where
    that is not allowed the peak runs from the start). The loop resets around each evaluation, so the training
    step's peak and the evaluation's are told apart."""

    def __init__(self, on_gpu: bool):
        self.on_gpu = on_gpu

    def now_mb(self) -> float:
        import torch

        if self.on_gpu:
            return torch.cuda.memory_allocated() / 2**20
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def peak_mb(self) -> float:
        import torch

        if self.on_gpu:
            return torch.cuda.max_memory_allocated() / 2**20
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset(self) -> None:
        import torch

        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        except OSError:
            pass
