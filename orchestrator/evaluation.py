"""Evaluating a saved adapter in this process (no Ray): what the promotion gate compares champion and
challenger with, on the same held-out rows, with the same code.
"""

from __future__ import annotations

from orchestrator.data import Split
from orchestrator.metrics import classification_metrics
from orchestrator.modeling import LABELS_FILE, adapter_labels, resolve_model_path
from orchestrator.spec import SpecError


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
