"""The planner's view of a model (:class:`orchestrator.plan.memory.ModelShape`), counted on the meta device from its
config alone: no weights are read."""

from __future__ import annotations

from orchestrator.plan.memory import ModelShape
from orchestrator.spec import JobSpec, SpecError


def model_shape(spec: JobSpec, num_labels: int | None) -> ModelShape:
    """Counts the model's parameters on the meta device (config only; no weights are read)."""
    import torch
    from peft import get_peft_model

    from orchestrator.train.modeling import auto_class, load_model_config, lora_config, peft_config

    config = load_model_config(spec, num_labels)
    with torch.device("meta"):
        try:
            model = auto_class(spec.model.task).from_config(config, trust_remote_code=spec.model.trust_remote_code)
        except ValueError as error:
            raise SpecError(f"model.task: {spec.model.task} does not fit {spec.model.path} "
                            f"({type(config).__name__}): {str(error)[:200]}") from None
        total = sum(p.numel() for p in model.parameters())
        layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
        linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        in_blocks = [m for n, m in linear if any(f".{k}." in f".{n}." for k in range(layers))]
        gated = any(n.endswith("gate_proj") for n, _ in linear)
        method_trainable = total
        if spec.method.name == "prefix" and spec.model.task == "sequence_classification":
            _check_prefix_support(model)  # PEFT's classifier path needs it; the causal LM path passes a cache
        if spec.method.name not in ("lora", "qlora", "full"):
            other = get_peft_model(auto_class(spec.model.task).from_config(config), peft_config(spec))
            method_trainable = sum(p.numel() for p in other.parameters() if p.requires_grad)
        peft_model = get_peft_model(model, lora_config(spec.lora, spec.model.task))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        adapted = sum(m.in_features for n, m in peft_model.named_modules()
                      if n.endswith("lora_A.default") and isinstance(m, torch.nn.Linear))
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    heads = _get(config, "num_attention_heads", "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(
        total_params=total, block_linear_params=sum(m.weight.numel() for m in in_blocks),
        lora_trainable=trainable, lora_inputs_per_layer=adapted // max(1, layers), method_trainable=method_trainable,
        layers=layers, hidden=hidden,
        kv_hidden=hidden // heads * kv_heads, intermediate=_get(config, "intermediate_size", "n_inner") or 4 * hidden,
        heads=heads, vocab=getattr(config, "vocab_size", 0), gated_mlp=gated, causal_lm=spec.model.task == "causal_lm",
        attention_dropout=float(getattr(config, "attention_probs_dropout_prob", None)
                                or getattr(config, "attention_dropout", 0.0) or 0.0),
        largest_shard=largest_shard(spec))


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def largest_shard(spec: JobSpec) -> int | None:
    """Bytes of the model folder's largest weight file (what one reader holds while loading); from the index's
    total size over its shards when only the index is there; None for a folder without weights (a config
    alone, or a hub name not yet downloaded)."""
    import json
    from pathlib import Path

    from orchestrator.train.modeling import model_folder

    folder = Path(model_folder(spec.model))
    if not folder.is_dir():
        return None
    sizes = [p.stat().st_size for pattern in WEIGHT_FILES for p in folder.glob(pattern)]
    if sizes:
        return max(sizes)
    for index in folder.glob("*.index.json"):
        try:
            found = json.loads(index.read_text())
            shards = set(found["weight_map"].values())
            return int(found["metadata"]["total_size"] / max(1, len(shards)))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def attention_support(spec: JobSpec) -> dict[str, bool]:
    """The attention kernels the model class declares, by its own flags: ``sdpa`` (``_supports_sdpa``),
    ``flash`` (``_supports_flash_attn``: flash_attention_2/3 and flash kernels from the hub), ``flex``
    (``_supports_flex_attn``) and ``attention_backend`` (``_supports_attention_backend``: it calls attention
    through transformers' registry, which a kernels-hub kernel plugs into).

    The class is the one transformers builds for this config (the job's task), found in its model mapping; code
    shipped with the model folder (``trust_remote_code``) is built on the meta device instead. No weights are read.
    """
    cls = _model_class(spec)
    return {"sdpa": bool(cls._supports_sdpa), "flash": bool(cls._supports_flash_attn),
            "flex": bool(cls._supports_flex_attn),
            "attention_backend": bool(getattr(cls, "_supports_attention_backend", False))}


def _model_class(spec: JobSpec) -> type:
    from orchestrator.train.modeling import auto_class, load_model_config

    config = load_model_config(spec, None)
    factory = auto_class(spec.model.task)
    remote = spec.model.trust_remote_code and factory.__name__ in (getattr(config, "auto_map", None) or {})
    if not remote:
        try:
            return factory._model_mapping[type(config)]  # what from_config / from_pretrained pick, unbuilt
        except KeyError:
            raise SpecError(f"model.task: {spec.model.task} does not fit {spec.model.path} "
                            f"({type(config).__name__} has no {factory.__name__} class)") from None
    import torch

    with torch.device("meta"):
        return type(factory.from_config(config, trust_remote_code=True))


def _check_prefix_support(model) -> None:
    """Prefix tuning feeds learned keys/values as ``past_key_values``; PEFT needs the model (or its backbone)
    to take them, and fails only at the first forward pass otherwise."""
    import inspect

    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone)):
        raise SpecError(f"method.name: prefix tuning needs a model that takes past_key_values; "
                        f"{type(model).__name__} does not in this transformers version; use prompt, ia3 or lora")


def _get(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise SpecError(f"model.path: the config has none of {', '.join(names)}; cannot estimate its memory")
