"""Tiny models and data built in-process for tests: seeded, a few seconds, nothing downloaded."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

TOPICS = {
    "billing": ["invoice", "charge", "refund", "payment", "bill"],
    "shipping": ["parcel", "courier", "delivery", "tracking", "shipment"],
    "login": ["password", "account", "username", "signin", "locked"],
    "hardware": ["screen", "battery", "keyboard", "charger", "speaker"],
}
FILLER = ["my", "the", "is", "not", "please", "help", "with", "a", "today", "again", "why", "broken", "late"]


def write_tiny_model(folder: Path, seed: int = 0, pretrain_steps: int = 80) -> Path:
    """A 2-layer BERT (hidden 32) and a word-level tokenizer over the tiny vocabulary, saved as an HF folder.

    A random encoder gives LoRA almost nothing to adapt, so the encoder is first "pretrained" in full for a
    few steps on topic rows of another seed; only the encoder is saved (the job adds a fresh head).
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForSequenceClassification(config.__class__(**{**config.to_dict(), "num_labels": len(TOPICS)}))
    rows = tiny_rows(256, seed=1000 + seed)
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([list(TOPICS).index(r["label"]) for r in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(pretrain_steps):
        pick = torch.randint(0, len(rows), (32,), generator=generator)
        model(input_ids=batch["input_ids"][pick], attention_mask=batch["attention_mask"][pick],
              labels=labels[pick]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        topic = list(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[topic]) for _ in range(2)] + rng.sample(FILLER, 4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": topic})
    return rows


def write_tiny_data(folder: Path, train: int = 192, validation: int = 64, test: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, count) in enumerate((("train", train), ("validation", validation), ("test", test))):
        with open(folder / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in tiny_rows(count, seed))
    return folder


def tiny_job(root: Path, model_dir: Path, data_dir: Path, **sections) -> dict:
    """A job dict on the tiny model and data; keyword arguments replace or extend whole sections."""
    job = {
        "version": 1,
        "name": "tiny",
        "output_dir": str(root / "out"),
        "model": {"path": str(model_dir)},
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl"), "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {"epochs": 3, "micro_batch_size": 16, "learning_rate": 0.01, "log_every_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
    }
    for key, value in sections.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
