"""Checks that need the user's files but no cluster: data, labels, batch plan, model config, LoRA targets.

``orchestrator validate`` runs exactly this; ``orchestrator train`` runs it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.plan.batches import BatchPlan, deepspeed_config, plan_batches
from orchestrator.spec import JobSpec, SpecError
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


def preflight(spec: JobSpec) -> Preflight:
    """Raises :class:`orchestrator.spec.SpecError` naming the field to fix; returns what it learned."""
    if spec.model.trust_remote_code:
        import sys

        print(f"warning: model.trust_remote_code is on: Python code shipped in {spec.model.path} will run on the "
              "driver and on every worker; turn it off unless the model needs it and you trust its source",
              file=sys.stderr)
    data = load_data(spec)
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
    deepspeed_config(spec, plan, read_deepspeed_json(spec.deepspeed.config))  # checks a user JSON's batch keys
    if spec.model.adapter and not spec.model.adapter.startswith("models:/") and data.label_names:
        check_adapter_labels(spec.model.adapter, data.label_names)
    return Preflight(data, plan, total, len(names), rows, example, dropped, shape)


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
