"""What a worker's device decides: the precision ``auto`` resolves to, TF32, and whether an attention kernel
can run there. Pure: the device is described by a :class:`Device`, read on the worker
(:func:`orchestrator.train.device.local_device`) or probed from the driver.

Resolution (one rule, applied on the driver for ``validate``/preflight and again on each worker, where it is
authoritative):

- ``train.precision: auto``: bf16 on a GPU that has it (compute capability 8.0+: A100, H100, H200, L4, ...),
  fp16 on an older GPU (V100, T4), fp32 on CPU.
- ``model.dtype: auto``: follows the precision (bfloat16 under bf16, float16 under fp16, float32 under fp32),
  so the frozen base is loaded at half size under mixed precision.
- TF32 matmuls for the fp32 work on Ampere and newer (compute capability 8.0+).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.spec import JobSpec
from orchestrator.spec.schema import FLASH_KERNELS, is_hub_kernel


@dataclass(frozen=True)
class Device:
    """One worker's accelerator, as far as precision and attention care."""

    kind: str  # "cpu" or "cuda"
    name: str = "CPU"
    capability: tuple[int, int] | None = None  # CUDA compute capability
    bf16: bool = False  # bf16 arithmetic supported
    memory_bytes: float | None = None  # the device's total memory
    packages: frozenset[str] = field(default_factory=frozenset)  # attention / 4-bit packages importable there
    assumed: bool = False  # not seen: described by what the job's kind of device usually is

    @property
    def tf32(self) -> bool:
        return self.kind == "cuda" and self.capability is not None and self.capability >= (8, 0)


CPU = Device("cpu")
# A GPU worker the driver has not seen (no GPU free to probe, or planning without a cluster): what this project
# is run on (Ampere or newer).
ASSUMED_GPU = Device("cuda", "a GPU (not seen; assumed compute capability 8.0+)", (8, 0), True, assumed=True)
DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# What transformers imports for each kernel (``is_flash_attn_2_available`` and friends), and the pip name.
KERNEL_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                   "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (built from flash-attention/hopper)"),
                   "hub": ("kernels", "kernels")}
QUANTIZATION_PACKAGE = ("bitsandbytes", "bitsandbytes")  # what method qlora needs where the workers run


def default_device(spec: JobSpec) -> Device:
    return ASSUMED_GPU if spec.scaling.use_gpu else CPU


def resolve(spec: JobSpec, device: Device | None = None) -> JobSpec:
    """The spec with ``model.dtype`` and ``train.precision`` concrete for ``device`` (default: the job's kind of
    device, :func:`default_device`). A concrete value is kept as given."""
    device = device or default_device(spec)
    precision = spec.train.precision
    if precision == "auto":
        precision = ("bf16" if device.bf16 else "fp16") if device.kind == "cuda" else "fp32"
    dtype = DTYPE_OF[precision] if spec.model.dtype == "auto" else spec.model.dtype
    if precision == spec.train.precision and dtype == spec.model.dtype:
        return spec
    return spec.model_copy(update={"train": spec.train.model_copy(update={"precision": precision}),
                                   "model": spec.model.model_copy(update={"dtype": dtype})})


def problems(spec: JobSpec, device: Device, supports: dict[str, bool] | None = None) -> list[str]:
    """What cannot run on ``device``, each naming the field and the fix (empty: fine). ``supports``: the model
    class's own flags (``_supports_sdpa``, ``_supports_flash_attn``), when known."""
    found = []
    precision, attention = spec.train.precision, spec.model.attn_implementation
    if device.kind == "cuda" and not device.bf16 and precision == "bf16" and not device.assumed:
        found.append(f"train.precision: bf16 needs a GPU with bf16 (compute capability 8.0+); {device.name} has "
                     f"{_capability(device)}: use auto (fp16 there) or fp16")
    if device.kind == "cuda" and not device.bf16 and spec.model.dtype == "bfloat16" and not device.assumed:
        found.append(f"model.dtype: bfloat16 needs a GPU with bf16; {device.name} has {_capability(device)}: use "
                     "auto or float16")
    supports = supports or {}
    if attention == "sdpa" and supports.get("sdpa") is False:
        found.append("model.attn_implementation: this model has no SDPA attention in the installed transformers; "
                     "use eager")
    if attention in FLASH_KERNELS and supports.get("flash") is False:
        found.append(f"model.attn_implementation: this model does not support {attention}; use sdpa")
    needed = KERNEL_PACKAGES["hub"] if is_hub_kernel(attention) else KERNEL_PACKAGES.get(attention)
    if needed and device.kind == "cuda" and not device.assumed and needed[0] not in device.packages:
        found.append(f"model.attn_implementation: {attention} needs the {needed[0]} module where the workers run, "
                     f"and {device.name}'s node does not have it: pip install {needed[1]} into the workers' "
                     "environment (or use sdpa)")
    if spec.method.name == "qlora" and device.kind == "cuda" and not device.assumed \
            and QUANTIZATION_PACKAGE[0] not in device.packages:
        found.append(f"method.name: qlora needs the {QUANTIZATION_PACKAGE[0]} module where the workers run, and "
                     f"{device.name}'s node does not have it: pip install {QUANTIZATION_PACKAGE[1]} into the "
                     "workers' environment (or use lora)")
    if attention == "flash_attention_3" and device.kind == "cuda" and device.capability is not None \
            and device.capability < (9, 0) and not device.assumed:
        found.append(f"model.attn_implementation: flash_attention_3 runs on Hopper GPUs (compute capability 9.0+); "
                     f"{device.name} has {_capability(device)}: use flash_attention_2 or sdpa")
    return found


def describe(spec: JobSpec, device: Device) -> str:
    """One line: what the job computes in, on what (``validate`` prints it, the run logs it)."""
    resolved = resolve(spec, device)
    tf32 = ", TF32 matmuls" if device.tf32 and resolved.train.precision == "fp32" else ""
    where = device.name + (f" ({_capability(device)})" if device.capability and not device.assumed else "")
    return (f"precision {resolved.train.precision} (weights {resolved.model.dtype}{tf32}), attention "
            f"{spec.model.attn_implementation}, on {where}")


def _capability(device: Device) -> str:
    return f"compute capability {device.capability[0]}.{device.capability[1]}" if device.capability else "no CUDA"
