"""ZeRO-3 partitioned loading, through transformers' DeepSpeed integration.

transformers loads a model partitioned only while an ``HfDeepSpeedConfig`` holding stage 3 is alive (it keeps a
weak reference to it: ``transformers.integrations.deepspeed.is_deepspeed_zero3_enabled``). Then
``from_pretrained`` builds the model inside ``deepspeed.zero.Init``, so each parameter is partitioned as its
module is constructed, and copies the checkpoint in one module at a time: the module's parameters are gathered,
rank 0 copies the file's values in, and they are partitioned again. The other ranks read only the files'
headers (meta tensors). Without the object, every worker materializes the whole base (Llama-3-70B in bf16:
140 GB of host RAM per worker) and DeepSpeed partitions it only afterwards.

transformers 5.24 merges every shard's tensors into one dict on rank 0 before copying
(``PreTrainedModel._load_pretrained_model``), and the safetensors pages stay mapped until that dict is dropped:
rank 0's RSS grows by the whole checkpoint (measured here: 1,037 MB on rank 0 for a 627 MB model, 5 shards).
:func:`one_shard_at_a_time` makes rank 0 hold one shard at a time instead: the merged dict holds only meta
tensors (the keys and shapes that every other rank already uses), and the copy runs transformers' own
``_load_state_dict_into_zero3_model`` once per shard, each shard's mapping dropped before the next is opened.
"""

from __future__ import annotations

import contextlib
import sys


def zero3_loading(deepspeed_config: dict):
    """The ``HfDeepSpeedConfig`` that turns on transformers' ZeRO-3 loading, or None below stage 3.

    The caller keeps the returned object alive from before ``from_pretrained`` until training ends (transformers
    reads it through a weak reference, in loading and in ``generate``); dropping it turns the integration off.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # an earlier job in this process may have left one alive (in a traceback)
    if int(deepspeed_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    import deepspeed
    import torch.distributed as dist

    # zero.Init reads the world size from deepspeed.comm, which knows the process group Ray Train made only once
    # told (before it, it counts 1 and refuses the batch sizes); deepspeed.initialize would do this later
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    return HfDeepSpeedConfig(deepspeed_config)


@contextlib.contextmanager
def one_shard_at_a_time(quantized: bool = False):
    """Within it, a ZeRO-3 ``from_pretrained`` copies the checkpoint shard by shard (see the module docstring).

    Outside ZeRO-3 loading it changes nothing, nor for a quantized base (``quantized``: transformers loads a
    4-bit base whole on each GPU even under ZeRO-3, through its other path, which must read real values).
    If this transformers lacks the two functions it wraps, loading goes on as transformers does it, with a
    warning (rank 0 then holds the whole checkpoint while loading).
    """
    from transformers import modeling_utils
    from transformers.integrations import is_deepspeed_zero3_enabled

    read = getattr(modeling_utils, "load_state_dict", None)
    copy_in = getattr(modeling_utils, "_load_state_dict_into_zero3_model", None)
    if quantized or not is_deepspeed_zero3_enabled():
        yield
        return
    if read is None or copy_in is None:
        print("warning: this transformers has no load_state_dict / _load_state_dict_into_zero3_model; ZeRO-3 "
              "rank 0 reads the whole checkpoint at once", file=sys.stderr)
        yield
        return
    files: list[str] = []

    def headers_only(checkpoint_file, map_location="cpu", **options):
        files.append(checkpoint_file)
        return read(checkpoint_file, map_location="meta", **options)

    def each_shard(model, merged: dict, load_config=None):
        import torch.distributed as dist

        where = "cpu" if dist.get_rank() == 0 else "meta"
        errors: list[str] = []
        missing: set[str] | None = None
        for file in files:
            shard = read(file, map_location=where)
            shard_errors, shard_missing = copy_in(model, shard, load_config)
            errors += shard_errors
            missing = set(shard_missing) if missing is None else missing & set(shard_missing)
            del shard  # unmaps the shard before the next one is read
        if missing is None:  # a state dict given in memory, not files: transformers' own path
            return copy_in(model, merged, load_config)
        return errors, missing

    modeling_utils.load_state_dict, modeling_utils._load_state_dict_into_zero3_model = headers_only, each_shard
    try:
        yield
    finally:
        modeling_utils.load_state_dict, modeling_utils._load_state_dict_into_zero3_model = read, copy_in


def cast_unpartitioned(model, deepspeed_config: dict) -> None:
    """Casts the floating-point parameters that are not ZeRO-3 parameters to the config's mixed precision.

    DeepSpeed casts a module to bf16/fp16 only when it was not built under zero.Init
    (``DeepSpeedEngine._cast_module_mixed_precision``: zero.Init parameters already have the config's dtype).
    What PEFT adds after loading is not: the adapter (fp32, PEFT's ``autocast_adapter_dtype``) and a copied
    classifier head, and ZeRO-3 refuses to flatten a mix of dtypes. Cast here, they train as they do below
    stage 3 (bf16 weights, fp32 master copies in the optimizer).
    """
    import torch

    dtype = (torch.bfloat16 if deepspeed_config.get("bf16", {}).get("enabled") else
             torch.float16 if deepspeed_config.get("fp16", {}).get("enabled") else None)
    if dtype is None or not any(hasattr(param, "ds_id") for param in model.parameters()):
        return  # not built under zero.Init (a 4-bit base): DeepSpeed casts the whole module itself
    for param in model.parameters():
        if not hasattr(param, "ds_id") and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def is_partitioned(model) -> bool:
    """Every parameter of the base (PEFT's adapter weights, made after loading, left out) is a ZeRO-3 parameter
    whose full value is not held here (``ds_status`` NOT_AVAILABLE)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    base = [p for name, p in model.named_parameters() if "lora_" not in name and "modules_to_save" not in name]
    return bool(base) and all(getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE for p in base)
