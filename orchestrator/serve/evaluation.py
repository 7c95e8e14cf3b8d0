"""Evaluating a saved adapter in this process (no Ray): what the promotion gate compares champion and
challenger with, on the same held-out rows, with the same code.
"""

from __future__ import annotations

from orchestrator.spec import SpecError
from orchestrator.train.data import Split
from orchestrator.train.metrics import classification_metrics
from orchestrator.train.modeling import LABELS_FILE, adapter_labels, resolve_model_path

# what the data file of `orchestrator eval` is read with, from the adapter's saved job (its paths, packing and
# validation split are training's own business)
TRAINED_DATA_KEYS = {"text_column", "label_column", "format", "prompt_column", "completion_column", "messages_column",
                     "train_on", "max_length"}


def evaluate_adapter(folder: str, base_model: str, split: Split, label_names: list[str],
                     max_length: int, batch_size: int = 64) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of the adapter in ``folder`` on ``split`` (labels index ``label_names``).

    The adapter's own label list maps its outputs by name, so an adapter trained before a label was added is
    scored on the same rows: it can never predict the new label, and its loss counts only the rows it knows.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    own = adapter_labels(folder)
    if own is None:
        raise SpecError(f"{folder}: no {LABELS_FILE}; it is not an adapter this project trained")
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(base_model), num_labels=len(own), id2label=dict(enumerate(own)),
        label2id={n: i for i, n in enumerate(own)}, use_safetensors=True, ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    to_ours = [label_names.index(n) if n in label_names else -1 for n in own]
    to_theirs = {label_names.index(n): i for i, n in enumerate(own) if n in label_names}
    predictions, losses = [], []
    with torch.inference_mode():
        for start in range(0, len(split.texts), batch_size):
            texts = split.texts[start:start + batch_size]
            labels = split.labels[start:start + batch_size]
            batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**batch).logits.float()
            predictions += [to_ours[i] for i in logits.argmax(-1).tolist()]
            known = [(row, to_theirs[y]) for row, y in enumerate(labels) if y in to_theirs]
            if known:
                rows, targets = zip(*known)
                losses += torch.nn.functional.cross_entropy(logits[list(rows)], torch.tensor(targets),
                                                            reduction="none").tolist()
    result = classification_metrics(predictions, split.labels, len(label_names))
    return {**result, "loss": sum(losses) / max(len(losses), 1)}


def lm_loss(model, tokenizer, split, data, batch_size: int = 8, advance=None) -> tuple[dict[str, float], int, int]:
    """Token-weighted loss and perplexity of a causal LM over ``split``'s trained tokens, masked as training
    masks them (``data``: the DataSpec the rows were trained with), in batches of ``batch_size`` rows: only one
    batch's float32 logits exist at a time. Returns (metrics, rows scored, rows with no trained token left).
    ``advance(rows)`` is called after each batch (a progress bar)."""
    import torch

    from orchestrator.train.lm_data import collate, encode_split
    from orchestrator.train.tasks import lm_eval_rows, lm_metrics

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of attention and loss
    device = next(model.parameters()).device
    rows, dropped = encode_split(split, tokenizer, data)
    sums = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size], tokenizer.pad_token_id, isolated=False)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            sums += lm_eval_rows(model(**batch).logits, batch)
            if advance is not None:
                advance(len(batch["input_ids"]))
    return lm_metrics(sums), len(rows), dropped


def held_out_completions(model, tokenizer, split, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """Greedy completions of every held-out prompt (rendered as training renders it, without the answer:
    :func:`~orchestrator.train.lm_data.prompt_text`), at most ``max_new_tokens`` each, and the references.

    Raises:
        SpecError: naming retrain.metric, when the rows have no reference completion (text data).
    """
    from orchestrator.train.lm_data import prompt_text, reference_text
    from orchestrator.train.tasks import generate

    references = [reference_text(r) for r in split.records]
    if any(r is None for r in references):
        raise SpecError(f"retrain.metric: {split.source} is text data, with no reference completion to compare a "
                        "generated one with; use prompt_completion or chat data, or retrain.metric: eval_loss")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    completions = []
    for record in split.records:  # a chat prompt holds the template's special tokens already
        completions += generate(model, tokenizer, [prompt_text(record, tokenizer)], max_new_tokens,
                                add_special_tokens="messages" not in record)
    return completions, references


def evaluate_lm(loaded, split, data, max_new_tokens: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """What the retrain gate compares for a causal LM adapter (a :class:`~orchestrator.serve.inference.LoadedAdapter`)
    on the held-out ``split``: eval_loss and eval_perplexity over the trained tokens (``data``: the job's DataSpec,
    so champion and challenger are masked and truncated alike), and with ``max_new_tokens``, exact_match and
    contains of the greedy completions (:func:`~orchestrator.train.metrics.generation_metrics`)."""
    from orchestrator.train.metrics import generation_metrics

    metrics, _, _ = lm_loss(loaded.model, loaded.tokenizer, split, data, batch_size)
    result = {"eval_loss": metrics["loss"], "eval_perplexity": metrics["perplexity"]}
    if max_new_tokens is not None:
        result.update(generation_metrics(*held_out_completions(loaded.model, loaded.tokenizer, split, max_new_tokens)))
    return result


def evaluate_file(loaded, data_path: str, out_dir: str | None = None, batch_size: int = 32,
                  max_length: int | None = None, progress=None) -> dict:
    """``orchestrator eval``: the task's metrics for a loaded adapter on a data file. ``progress``: an object with
    ``start(total)`` and ``advance(rows)`` (the CLI's :func:`orchestrator.workflows.console.counter`); none shown
    without it.

    Classification: accuracy, macro-F1, loss, a per-class report and a confusion-matrix PNG (labels matched by
    name; rows with labels the adapter never learned count as errors). Causal LM: token-weighted loss and
    perplexity over the trained tokens, as in training. The data file's columns and format default to the ones
    the adapter was trained with (its saved job). Files go to ``out_dir`` when given.
    """
    import json
    from pathlib import Path

    import torch

    from orchestrator.spec import DataSpec
    from orchestrator.train.metrics import confusion_matrix, per_class_report

    trained = loaded.trained_data.model_dump(include=TRAINED_DATA_KEYS)  # how training read its rows
    data = DataSpec(**{**trained, "train": data_path, **({"max_length": max_length} if max_length else {})})
    device = next(loaded.model.parameters()).device
    result: dict = {"adapter": loaded.folder, "data": data_path}
    progress = progress or _Silent()
    with torch.inference_mode():
        if loaded.task == "causal_lm":
            from orchestrator.train.lm_data import LMSplit, read_records

            split = LMSplit("eval", data_path, read_records(data_path, "--data", data)[1], "")
            progress.start(len(split))
            metrics, examples, dropped = lm_loss(loaded.model, loaded.tokenizer, split, data, batch_size,
                                                 progress.advance)
            result.update(metrics, examples=examples, skipped=dropped)
        else:
            from orchestrator.train.data import read_columns

            texts, names = read_columns(data_path, "--data", data)
            index = {name: i for i, name in enumerate(loaded.labels)}
            unknown = len(loaded.labels)  # an extra class for labels the adapter never learned
            labels = [index.get(name, unknown) for name in names]
            progress.start(len(texts))
            predictions, losses = [], []
            for start in range(0, len(texts), batch_size):
                batch = loaded.tokenizer(texts[start:start + batch_size], truncation=True, padding=True,
                                         max_length=data.max_length, return_tensors="pt").to(device)
                logits = loaded.model(**batch).logits.float()
                predictions += logits.argmax(-1).tolist()
                targets = torch.tensor(labels[start:start + batch_size], device=logits.device)
                known = targets != unknown  # no loss for a label the adapter has no output for
                losses += torch.nn.functional.cross_entropy(logits[known], targets[known], reduction="none").tolist()
                progress.advance(len(batch["input_ids"]))
            classes = list(loaded.labels) + (["(unknown to the adapter)"] if unknown in labels else [])
            report = per_class_report(predictions, labels, classes)
            result.update({**classification_metrics(predictions, labels, len(classes)),  # as training defines them
                           "loss": sum(losses) / max(1, len(losses)), "examples": len(labels),
                           "per_class": report,
                           "confusion_matrix": confusion_matrix(predictions, labels, len(classes)),
                           "classes": classes})
    if out_dir:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(result, indent=1))
        if "confusion_matrix" in result:
            _confusion_png(result["confusion_matrix"], result["classes"], folder / "confusion_matrix.png")
    return result


def _confusion_png(counts: list[list[int]], classes: list[str], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.35 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(counts, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    axes.set_yticks(range(len(classes)), classes, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class _Silent:
    def start(self, total: int) -> None:
        pass

    def advance(self, rows: int) -> None:
        pass
