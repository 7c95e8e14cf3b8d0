"""This process's accelerator as a :class:`orchestrator.plan.precision.Device`: read on each worker (where
precision ``auto`` is decided) and by the driver's one-GPU probe task."""

from __future__ import annotations

import importlib.util

from orchestrator.plan.precision import CPU, KERNEL_PACKAGES, Device


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
    packages = frozenset(module for module, _ in KERNEL_PACKAGES.values() if importlib.util.find_spec(module))
    return Device("cuda", properties.name, (properties.major, properties.minor),
                  bool(torch.cuda.is_bf16_supported(including_emulation=False)), float(properties.total_memory),
                  packages)


def use_tf32(device: Device) -> None:
    """TF32 for the fp32 matmuls on Ampere and newer (torch's default keeps them at full fp32; cuDNN's
    convolutions already use TF32). The stable switch, valid on every torch 2.x."""
    import torch

    if device.tf32:
        torch.set_float32_matmul_precision("high")
