"""Saving and sampling a ZeRO-3 engine without gathering more of the model at once than the task needs.

ZeRO-3 partitions every parameter across the ranks; a forward pass gathers each module's weights before it runs
and frees them after. Two things need more than that, and both stay bounded here:

- **Saving a fully fine-tuned model** goes through DeepSpeed's consolidated 16-bit state dict: one module's own
  parameters gathered at a time, copied to rank 0's CPU, freed before the next module. The whole model is never
  resident on any accelerator, and only rank 0 holds the CPU copy. (Gathering every trainable parameter at once,
  which is what LoRA's save does with its small adapter, would put the whole model on every rank for full
  fine-tuning.) DeepSpeed's ``stage3_gather_16bit_weights_on_model_save`` switch is not needed: it only gates
  DeepSpeed's own ``save_16bit_model``, which writes a pickled ``pytorch_model.bin``; we write safetensors.
- **Sampling** greedy completions runs ``model.generate``, whose every generated token is one forward pass; under
  ZeRO-3 each pass gathers every layer again, so a 32-token completion gathers the model 32 times. When the
  gathered model fits on every rank's device (the common case: LoRA on an 8B model is 16 GB in bf16), the model
  is gathered once per call with DeepSpeed's ``unwrap_model_for_generation`` (its ZeRO-3 hooks off while the
  weights are local), and each rank completes its own share of the prompts. When it does not fit (a 70B model is
  140 GB), the per-token synced path stays, with one notice: slow, but bounded in memory, as training itself is.
"""

from __future__ import annotations

# Of a device's free memory, the share the gathered model may take: the rest is for the KV cache, activations
# and the allocator's fragmentation (a few prompts of a few hundred tokens: far below 10 % on any real model).
GATHER_SHARE = 0.9


def consolidated_state_dict(engine) -> dict | None:
    """The whole model's state dict (names as ``model.named_parameters()``, the engine's dtype, on the CPU) on
    rank 0, None on the others; every rank must call it. DeepSpeed's consolidated 16-bit state dict (the path
    Hugging Face's Trainer and Accelerate take); where an installed DeepSpeed lacks that private method, the same
    module-by-module gather through the public ``GatheredParameters``."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    consolidate = getattr(engine, "_zero3_consolidated_16bit_state_dict", None)
    if consolidate is not None:
        state = consolidate()
    else:
        state = {} if dist.get_rank() == 0 else None
        for prefix, child in module.named_modules():
            own = list(child.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):  # this module's own weights only
                if state is not None:
                    state.update({f"{prefix}.{name}" if prefix else name: p.detach().to("cpu", copy=True)
                                  for name, p in child.named_parameters(recurse=False)})
    if state is None:
        return None
    # What save_pretrained got before: the parameters under their first name (a tied weight once; buffers are
    # rebuilt by from_pretrained), so the saved files are the same as ever.
    return {name: state[name] for name, _ in module.named_parameters()}


def gathered_bytes(model) -> int:
    """Bytes the whole model takes gathered: ZeRO-3 parameters report their full size in ``ds_numel``."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def free_bytes(device) -> int:
    """Memory this rank can still allocate on ``device``: the CUDA driver's free memory, or the CPU's available
    memory (``MemAvailable``; its reading is 0 where /proc is missing, which keeps the synced path)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fits_gathered(model_bytes: int, free: list[int]) -> bool:
    """Whether every rank (``free``: each one's free bytes) can hold the whole model gathered."""
    return all(model_bytes <= GATHER_SHARE * available for available in free)


def generate_zero3(engine, prompts: list[str], complete, notice) -> list[str]:
    """Completions of ``prompts`` under ZeRO-3, on every rank (all of them must call it, with the same prompts).

    ``complete(prompts, synced)`` runs the greedy completions (:func:`orchestrator.train.tasks.generate` bound to
    the model and tokenizer); ``notice(text)`` is told once per call when the model is too large to gather and
    the per-token synced path runs instead. Gathered, each rank completes every ``world_size``-th prompt and the
    completions travel by ``all_gather_object``: completions are per prompt, so they are the same as one rank's.
    """
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    free: list[int | None] = [None] * world_size
    dist.all_gather_object(free, free_bytes(engine.device))  # every rank takes the same decision
    need = gathered_bytes(engine.module)
    try:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation
    except ImportError:  # an older DeepSpeed: the synced path
        unwrap_model_for_generation = None
    if unwrap_model_for_generation is None or not fits_gathered(need, free):
        notice(f"sampling under ZeRO-3 gathers every layer at each generated token: the whole model "
               f"({need / 2**30:.1f} GiB) does not fit in {GATHER_SHARE:.0%} of the smallest rank's free memory "
               f"({min(free) / 2**30:.1f} GiB)" if unwrap_model_for_generation else
               "sampling under ZeRO-3 gathers every layer at each generated token: this DeepSpeed has no "
               "unwrap_model_for_generation")
        return complete(prompts, True)
    with unwrap_model_for_generation(engine):  # one gather of the whole model, its ZeRO-3 hooks off meanwhile
        mine = complete(prompts[rank::world_size], False)
    shares: list[list[str] | None] = [None] * world_size
    dist.all_gather_object(shares, mine)
    return [shares[i % world_size][i // world_size] for i in range(len(prompts))]


__all__ = ["consolidated_state_dict", "fits_gathered", "gathered_bytes", "generate_zero3"]
