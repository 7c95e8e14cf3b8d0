"""Using a trained adapter in this process: find its base model, load both, generate.

An adapter this project saved carries ``orchestrator_job.yaml`` (the job that trained it, with the data format
resolved), read back as a typed :class:`JobSpec` (leniently: keys this version does not know are dropped with
a warning), so the base model, the prompt format, the columns and the truncation length are training's;
``--base`` overrides the base for adapters from elsewhere (PEFT's ``base_model_name_or_path`` is the fallback).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestrator.spec import DataSpec, JobSpec, ModelSpec, SpecError, saved_spec
from orchestrator.train.modeling import JOB_FILE, cache_home


@dataclass(frozen=True)
class LoadedAdapter:
    folder: str
    model: object  # peft.PeftModel, in eval mode
    tokenizer: object
    task: str  # causal_lm or sequence_classification
    base: ModelSpec
    chat: bool = False  # a causal LM trained on chat data: prompts are wrapped in the chat template
    labels: list[str] | None = None  # a classifier's label names, in its head's order
    # the data section of the job that trained it; the spec's defaults for an adapter from elsewhere (no saved job)
    trained_data: DataSpec = field(default_factory=DataSpec)


def adapter_folder(reference: str, tracking_uri: str | None) -> str:
    """A local folder for a folder path or a registry URI (models:/NAME@alias, downloaded once into the cache)."""
    from orchestrator.tracking import registry

    if registry.is_registry_ref(reference):
        uri = registry.registry_uri(tracking_uri)
        store = hashlib.sha256(uri.encode()).hexdigest()[:12]  # NAME-vN is unique within one registry only
        cache = cache_home() / "adapters" / store
        return registry.resolve_adapter(reference, uri, str(cache))
    if not Path(reference, "adapter_config.json").is_file():
        raise SpecError(f"--adapter: {reference} is not a PEFT adapter folder (no adapter_config.json) and not a "
                        "registry URI (models:/NAME@alias or models:/NAME/VERSION)")
    return reference


def saved_job(folder: str) -> JobSpec | None:
    """The job an adapter of this project was trained with (``orchestrator_job.yaml``), or None for others.

    Raises:
        SpecError: naming the file, when it is not YAML, of another spec version, or does not validate.
    """
    saved = Path(folder, JOB_FILE)
    if not saved.is_file():
        return None
    try:
        raw = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise SpecError(f"{saved}: the job saved with the adapter is not readable YAML: {error}") from None
    return saved_spec(raw, str(saved))


SERVING_ATTENTION = ("sdpa", "eager")  # the kernels that run on CPU and GPU in float32


def base_model_spec(folder: str, base: str | None, task: str, job: JobSpec | None) -> ModelSpec:
    """The base the adapter was trained on (``job``: its saved job, if any), as a :class:`ModelSpec`."""
    if base:
        return ModelSpec(path=base, task=task)
    if job is not None:
        # Serving loads the base in float32 on whatever this process has (often a CPU): the job's flash or hub
        # kernel may not run here, so only sdpa and eager carry over (eager: eval reproduces training closely).
        attention = job.model.attn_implementation if job.model.attn_implementation in SERVING_ATTENTION else "sdpa"
        return ModelSpec(path=job.model.path, gguf_file=job.model.gguf_file, task=task,
                         trust_remote_code=job.model.trust_remote_code, attn_implementation=attention)
    recorded = json.loads(Path(folder, "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        raise SpecError(f"--base: {folder} does not say which base model it adapts; pass --base MODEL_FOLDER")
    return ModelSpec(path=recorded, task=task)


TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "sequence_classification"}


def load_adapter(reference: str, base: str | None = None, tracking_uri: str | None = None,
                 task: str | None = None) -> LoadedAdapter:
    """Loads base + adapter (a folder or a registry URI) in eval mode, on this process's CPU or GPU.

    Raises:
        SpecError: not a PEFT adapter, a task other than ``task``, or a base it does not fit.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.train.modeling import adapter_labels, model_folder

    folder = adapter_folder(reference, tracking_uri)
    task_type = json.loads(Path(folder, "adapter_config.json").read_text()).get("task_type")
    found = TASK_TYPES.get(task_type or "")
    if found is None or (task and found != task):
        wanted = f"a {task} adapter" if task else "a causal_lm or sequence_classification adapter"
        raise SpecError(f"--adapter: {folder} is a {task_type} adapter; this command needs {wanted}")
    job = saved_job(folder)
    spec = base_model_spec(folder, base, found, job)
    labels = adapter_labels(folder)
    # sdpa as transformers' default (sdpa where the model has it, else eager): lenient with a base from elsewhere
    attention = None if spec.attn_implementation == "sdpa" else spec.attn_implementation
    if found == "sequence_classification":
        if labels is None:
            raise SpecError(f"--adapter: {folder} has no labels.json; it is not a classifier this project trained")
        base_model = AutoModelForSequenceClassification.from_pretrained(
            model_folder(spec), num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, use_safetensors=True, ignore_mismatched_sizes=True,
            trust_remote_code=spec.trust_remote_code, attn_implementation=attention)
    else:
        base_model = AutoModelForCausalLM.from_pretrained(model_folder(spec), use_safetensors=True,
                                                          trust_remote_code=spec.trust_remote_code,
                                                          attn_implementation=attention)
    try:
        model = PeftModel.from_pretrained(base_model, folder).eval()
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names do not match
        raise SpecError(f"--adapter: {folder} does not fit the base {spec.path}: {str(error)[:300]}; "
                        "pass --base with the model it was trained on") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = job.data if job is not None else DataSpec()
    chat = found == "causal_lm" and data.format == "chat" and bool(getattr(tokenizer, "chat_template", None))
    return LoadedAdapter(folder, model, tokenizer, found, spec, chat, labels, data)


def load_causal_adapter(reference: str, base: str | None = None, tracking_uri: str | None = None) -> LoadedAdapter:
    return load_adapter(reference, base, tracking_uri, task="causal_lm")


def complete(loaded: LoadedAdapter, prompt: str, max_new_tokens: int, raw: bool = False) -> str:
    """A greedy completion; the prompt goes through the chat template when the adapter was trained on chats."""
    from orchestrator.train.lm_data import render_chat
    from orchestrator.train.tasks import generate

    chat = loaded.chat and not raw
    text = render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True) if chat \
        else prompt
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return generate(loaded.model, loaded.tokenizer, [text], max_new_tokens, add_special_tokens=not chat)[0]


PROBE_TEXTS = ["the order arrived late and the box was damaged", "how do I reset my password",
               "What is the capital of Peru?", "thanks, that fixed it"]
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-3}  # largest |merged - unmerged| logit


@dataclass(frozen=True)
class MergeReport:
    folder: str
    max_abs_diff: float
    tolerance: float
    dtype: str


def merge_adapter(loaded: LoadedAdapter, out: str, max_shard_size: str = "2GB") -> MergeReport:
    """W <- W + scale * B @ A into the base, checked on a probe batch, saved as a standalone model.

    The merged model's logits on :data:`PROBE_TEXTS` must match the unmerged adapter's within the dtype's
    tolerance (fp32: 1e-4) or nothing is written. The folder is written beside ``out`` and renamed into place,
    so ``out`` is either complete (safetensors, sharded above ``max_shard_size``, config, tokenizer, labels) or
    absent.

    Raises:
        SpecError: ``out`` exists and is not empty, or the base is quantized (merging would need to
            dequantize it; the result would not be the quantized model the adapter was trained on).
    """

    import torch

    check_new_folder(out)
    base = loaded.model.get_base_model()
    if getattr(base.config, "quantization_config", None) or getattr(base, "is_quantized", False):
        raise SpecError(f"merge: the base model {loaded.base.path} is quantized; merging LoRA into quantized weights "
                        "is refused (it would silently dequantize). Load an unquantized base with --base, or serve "
                        "the adapter unmerged (orchestrator export --format peft)")
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(loaded.model.parameters()).device
    probe = {k: v.to(device) for k, v in tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt").items()}
    with torch.inference_mode():
        unmerged = loaded.model(**probe).logits.float()
        merged_model = loaded.model.merge_and_unload()
        merged = merged_model(**probe).logits.float()
    dtype = str(next(merged_model.parameters()).dtype).removeprefix("torch.")
    mask = probe["attention_mask"].bool()
    difference = (merged - unmerged).abs()
    difference = difference[mask] if difference.dim() == 3 else difference  # padding positions are not outputs
    max_abs_diff = float(difference.max())
    tolerance = MERGE_TOLERANCE.get(dtype, 1e-4)
    if not max_abs_diff <= tolerance:
        raise RuntimeError(f"merged and unmerged outputs differ by {max_abs_diff:.3g} (> {tolerance:g} for {dtype}); "
                           "nothing written")
    with new_folder(out) as partial:
        merged_model.save_pretrained(partial, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(partial)
        if loaded.labels is not None:
            from orchestrator.train.modeling import LABELS_FILE

            (partial / LABELS_FILE).write_text(json.dumps(loaded.labels, indent=1))
        (partial / "MERGED_FROM").write_text(f"adapter {loaded.folder}\nbase {loaded.base.path}\n"
                                             f"max |merged - unmerged| logit on the probe batch: {max_abs_diff:.3g}\n")
    return MergeReport(out, max_abs_diff, tolerance, dtype)


def add_adapters(loaded: LoadedAdapter, named: dict[str, str], tracking_uri: str | None = None) -> list[str]:
    """Loads more adapters onto the same base model (PEFT named adapters), for switching per request; returns
    the names, the first loaded one as ``default``.

    Raises:
        SpecError: an adapter of another task or for another base model.
    """
    for name, reference in named.items():
        folder = adapter_folder(reference, tracking_uri)
        config = json.loads(Path(folder, "adapter_config.json").read_text())
        task = TASK_TYPES.get(config.get("task_type") or "")
        base = base_model_spec(folder, None, task or loaded.task, saved_job(folder))
        if task != loaded.task or base.path != loaded.base.path or base.gguf_file != loaded.base.gguf_file:
            raise SpecError(f"--adapter {name}={reference}: a {task} adapter for {base.path}; the first adapter is a "
                            f"{loaded.task} adapter for {loaded.base.path}: adapters switched per request must "
                            "share one base model and task")
        loaded.model.load_adapter(folder, adapter_name=name)
    return ["default", *named]


def predict_rows(loaded: LoadedAdapter, rows: list[dict], batch_size: int = 32, max_new_tokens: int = 64,
                 top_k: int = 3) -> list[dict]:
    """Predictions for plain rows, each with the adapter its ``adapter`` field names (default: the first one);
    rows are grouped by adapter, every group runs with only its adapter active, and the output keeps the input
    order. See :func:`_predict_with`."""
    names = getattr(loaded.model, "peft_config", {"default": None})
    wanted = [row.get("adapter", "default") for row in rows]
    unknown = sorted({name for name in wanted if name not in names})
    if unknown:
        raise SpecError(f"--data: rows name adapters {unknown}; loaded: {', '.join(names)}")
    out: list[dict | None] = [None] * len(rows)
    for name in dict.fromkeys(wanted):
        loaded.model.set_adapter(name)
        picked = [i for i, w in enumerate(wanted) if w == name]
        for i, row in zip(picked, _predict_with(loaded, [rows[i] for i in picked], batch_size, max_new_tokens,
                                                top_k)):
            out[i] = row
    loaded.model.set_adapter("default")
    return out


def _predict_with(loaded: LoadedAdapter, rows: list[dict], batch_size: int, max_new_tokens: int,
                  top_k: int) -> list[dict]:
    """Predictions for plain rows: a classifier adds ``label``, ``score`` and the ``top`` labels with their
    probabilities; a causal LM adds ``completion`` (greedy, batched with left padding). The input text comes
    from the column the adapter was trained on (its saved job), else ``text`` / ``prompt`` / ``messages``."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # inference in this process: every core
    trained = loaded.trained_data
    device = next(loaded.model.parameters()).device
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out: list[dict] = []
    if loaded.task == "sequence_classification":
        texts = [_field(row, trained.text_column, i) for i, row in enumerate(rows)]
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], truncation=True, padding=True,
                              max_length=trained.max_length, return_tensors="pt").to(device)
            with torch.inference_mode():
                probabilities = loaded.model(**batch).logits.float().softmax(-1)
            for row, p in zip(rows[start:start + batch_size], probabilities):
                best = p.topk(min(top_k, len(loaded.labels)))
                top = [{"label": loaded.labels[i], "score": round(float(s), 6)}
                       for s, i in zip(best.values, best.indices)]
                out.append({**row, "label": top[0]["label"], "score": top[0]["score"], "top": top})
        return out
    prompts = [_prompt(loaded, row, trained, i) for i, row in enumerate(rows)]
    tokenizer.padding_side = "left"  # generation continues from the last real token of every row
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], padding=True, return_tensors="pt",
                          add_special_tokens=not loaded.chat).to(device)
        with torch.inference_mode():
            generated = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=tokenizer.pad_token_id)
        for row, ids in zip(rows[start:start + batch_size], generated[:, batch["input_ids"].shape[1]:]):
            out.append({**row, "completion": tokenizer.decode(ids, skip_special_tokens=True).strip()})
    return out


def _field(row: dict, column: str, index: int) -> str:
    value = row.get(column, row.get("text"))  # --text rows carry "text"
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"--data: row {index + 1} has no text in column '{column}' (the column the adapter was "
                        f"trained on); columns: {', '.join(row)}")
    return value


def _prompt(loaded: LoadedAdapter, row: dict, trained: DataSpec, index: int) -> str:
    from orchestrator.train.lm_data import render_chat

    if "messages" in row and loaded.chat:
        messages = row["messages"]
        messages = json.loads(messages) if isinstance(messages, str) else list(messages)
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # predict the answer, not after it
        return render_chat(loaded.tokenizer, messages, add_generation_prompt=True)
    column = next((c for c in (trained.prompt_column, "prompt", trained.text_column) if c in row), "prompt")
    text = _field(row, column, index)
    return render_chat(loaded.tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True) \
        if loaded.chat else text


def read_rows(path: str) -> list[dict]:
    """The rows of a JSONL / CSV / Parquet file (or datasets folder) as plain dicts."""
    from orchestrator.train.data import read_table

    frame = read_table(path, "--data")
    if len(frame) == 0:
        raise SpecError(f"--data: {path} has no rows")
    return json.loads(frame.to_json(orient="records", force_ascii=False))


def check_new_folder(out: str) -> Path:
    """``--out`` must be a new or empty folder. Raises SpecError otherwise."""
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SpecError(f"--out: {out} exists and is not empty; give a new folder")
    return target


@contextmanager
def new_folder(out: str) -> Iterator[Path]:
    """Yields a folder beside ``out`` to write into; renames it to ``out`` when the block succeeds, removes it
    when it fails, so ``out`` is either complete or absent (an empty ``out`` is replaced)."""
    import shutil
    import tempfile

    target = check_new_folder(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield partial
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_jsonl(rows: list[dict], path: str) -> None:
    """Writes next to ``path`` and renames into place: a reader never sees half a file."""
    import tempfile

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(partial, target)


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "labels.json", JOB_FILE,
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.txt",
              "README.md")


def export_peft(reference: str, out: str, tracking_uri: str | None = None) -> str:
    """The adapter as serving engines load it for multi-adapter serving (vLLM ``--lora-modules``, TGI
    ``LORA_ADAPTERS``, PEFT ``load_adapter``): the plain PEFT files, safetensors only, written atomically."""
    import shutil

    folder = Path(adapter_folder(reference, tracking_uri))
    check_new_folder(out)
    if not (folder / "adapter_model.safetensors").is_file():
        raise SpecError(f"--adapter: {folder} has no adapter_model.safetensors; only safetensors adapters are exported")
    with new_folder(out) as partial:
        for name in PEFT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, partial / name)
    return out
