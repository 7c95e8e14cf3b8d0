"""Checks that need the user's files but no cluster: data, labels, batch plan, model config, LoRA targets.

``orchestrator validate`` runs exactly this; ``orchestrator train`` runs it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.plan.batches import BatchPlan, as_run, deepspeed_config, plan_batches
from orchestrator.plan.precision import Device, default_device, describe, problems
from orchestrator.spec import GENERATION_METRICS, JobSpec, SpecError
from orchestrator.train.modeling import (
    check_adapter_labels,
    check_target_modules,
    linear_module_names,
    read_deepspeed_json,
)
from orchestrator.train.shape import model_shape
from orchestrator.train.tasks import load_data


@dataclass(frozen=True)
class Preflight:
    data: object  # orchestrator.train.data.TaskData or orchestrator.train.lm_data.LMData
    plan: BatchPlan
    total_params: int
    linear_modules: int
    train_rows: int  # what one epoch steps through: examples, or packed rows for a packed causal LM job
    example: str | None = None  # causal LM: the first training example with its trained spans marked
    dropped: dict[str, int] = field(default_factory=dict)  # causal LM: examples left with no trained token
    shape: object = None  # orchestrator.plan.memory.ModelShape: what the memory estimate needs
    planned: JobSpec | None = None  # as the workers run it: a user DeepSpeed JSON's settings, precision resolved
    computes: str = ""  # the precision and attention it resolves to, on which device (validate prints it)


def preflight(spec: JobSpec, device: Device | None = None) -> Preflight:
    """Raises :class:`orchestrator.spec.SpecError` naming the field to fix; returns what it learned. ``device``:
    a worker's device as probed on the cluster; default, the job's kind of device (a GPU assumed Ampere+)."""
    if spec.model.trust_remote_code:
        import sys

        print(f"warning: model.trust_remote_code is on: Python code shipped in {spec.model.path} will run on the "
              "driver and on every worker; turn it off unless the model needs it and you trust its source",
              file=sys.stderr)
    data = load_data(spec)
    if spec.retrain and spec.retrain.metric in GENERATION_METRICS and data.format == "text":  # causal_lm (the spec)
        raise SpecError(f"retrain.metric: {spec.retrain.metric} compares a generated completion with the reference "
                        f"one, and {spec.data.train} is text data (no prompt/completion or chat columns), which has "
                        "none; use prompt_completion or chat data, or retrain.metric: eval_loss")
    names, total = linear_module_names(spec, len(data.label_names) if data.label_names else None)
    check_target_modules(spec.lora, names)
    shape = model_shape(spec, len(data.label_names) if data.label_names else None)
    example, dropped, rows = None, {}, len(data.train)
    tokenizer = load_tokenizer(spec)  # the workers' first step: a folder without one fails here, not there
    if spec.model.task == "causal_lm":
        from orchestrator.train.lm_data import encode, show
        from orchestrator.train.tasks import CausalLM

        task = CausalLM(data, tokenizer, spec)  # tokenises every split: the checks the workers would hit later
        rows, dropped = task.size("train"), {k: v for k, v in task.dropped.items() if v}
        example = show(encode(data.train.records[0], tokenizer, spec.data.max_length, spec.data.train_on), tokenizer)
    plan = plan_batches(spec, rows)
    user_json = read_deepspeed_json(spec.deepspeed.config)
    deepspeed_config(spec, plan, user_json)  # checks a user JSON's batch keys
    planned, computes = check_device(spec, user_json, device)
    if spec.model.adapter and not spec.model.adapter.startswith("models:/") and data.label_names:
        check_adapter_labels(spec.model.adapter, data.label_names)
    return Preflight(data, plan, total, len(names), rows, example, dropped, shape, planned, computes)


def as_run_on(spec: JobSpec, device: Device | None) -> JobSpec:
    """:func:`check_device` for a device probed on the cluster (``None``: the job's kind of device)."""
    return check_device(spec, read_deepspeed_json(spec.deepspeed.config), device)[0]


def check_device(spec: JobSpec, user_json: dict | None, device: Device | None) -> tuple[JobSpec, str]:
    """The spec as the workers will run it on ``device`` and a line saying so; raises SpecError when the
    precision or attention cannot run there (bf16 on a GPU without it, a flash kernel not installed)."""
    from orchestrator.train.shape import attention_support

    device = device or default_device(spec)
    planned = as_run(spec, user_json, device)
    wrong = problems(planned, device, attention_support(spec))
    if wrong:
        raise SpecError("; ".join(wrong))
    return planned, describe(planned, device)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(spec: JobSpec):
    """The model folder's tokenizer. Raises SpecError naming model.path when it has none that loads."""
    from transformers import AutoTokenizer

    from orchestrator.train.modeling import model_folder

    folder = model_folder(spec.model)
    if Path(folder).is_dir() and not any(Path(folder, name).is_file() for name in TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer (special tokens only) and train on [UNK]s
        raise SpecError(f"model.path: {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                        "save the tokenizer with the model (tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=spec.model.trust_remote_code)
    except Exception as error:  # OSError / ValueError / KeyError, by tokenizer class
        raise SpecError(f"model.path: no usable tokenizer in {folder} ({type(error).__name__}: {str(error)[:160]}); "
                        "save the tokenizer with the model (tokenizer.save_pretrained(folder))") from None
