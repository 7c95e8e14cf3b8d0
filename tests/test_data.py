"""Reading data in every supported format gives the same texts and labels; carving a validation split."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.train.data import load_task_data
from orchestrator.train.loop import _check_adapter
from orchestrator.train.metrics import classification_metrics


def _frame(tiny_data, split):
    return pd.DataFrame([json.loads(line) for line in (tiny_data / f"{split}.jsonl").read_text().splitlines()])


@pytest.mark.parametrize("fmt", ["csv", "parquet", "disk"])
def test_every_format_reads_the_same(job, tiny_data, tmp_path, fmt):
    from datasets import Dataset

    paths = {}
    for split in ("train", "validation"):
        frame = _frame(tiny_data, split)
        path = tmp_path / (f"{split}.{fmt}" if fmt != "disk" else split)
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "parquet":
            frame.to_parquet(path)
        else:
            Dataset.from_pandas(frame).save_to_disk(str(path))
        paths[split] = str(path)
    reference = load_task_data(spec_from_dict(job()).data)
    other = load_task_data(spec_from_dict(job(data={**paths, "test": None})).data)
    assert other.label_names == reference.label_names
    assert other.train.texts == reference.train.texts and other.train.labels == reference.train.labels
    assert other.validation.labels == reference.validation.labels
    assert len(other.train.digest) == 64 and other.train.digest != reference.train.digest


def test_validation_split_is_deterministic_and_disjoint(job):
    raw = job()
    del raw["data"]["validation"]
    raw["data"]["validation_split"] = 0.25
    first, second = (load_task_data(spec_from_dict(raw).data) for _ in range(2))
    assert len(first.validation.texts) == 48 and len(first.train.texts) == 144
    assert first.validation.texts == second.validation.texts


def test_macro_f1_and_accuracy():
    metrics = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], num_labels=4)
    assert metrics["accuracy"] == 0.75
    # class 0: P=1/2 R=1 F1=2/3; class 1: P=1 R=1/2 F1=2/3; class 2: 1; class 3 absent: not counted
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_an_untrained_or_empty_adapter_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.zeros(4, 2)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="refusing to publish"):
        _check_adapter(tmp_path)
    save_file({"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.full((4, 2), float("nan"))},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="refusing to publish"):
        _check_adapter(tmp_path)
    save_file({"a.lora_A.weight": torch.ones(2, 4), "a.lora_B.weight": torch.ones(4, 2)},
              tmp_path / "adapter_model.safetensors")
    _check_adapter(tmp_path)


def test_a_digest_streams_the_file_and_is_kept_by_size_and_mtime(tmp_path, monkeypatch):
    """The digest is the sha256 of the bytes, read in chunks (never the whole file in memory); an unchanged file
    (same size and mtime) is not read again, and a changed one is."""
    import hashlib
    import os
    from pathlib import Path

    from orchestrator.train import data

    monkeypatch.setenv("ORCHESTRATOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DIGEST_CHUNK", 1000)
    file = tmp_path / "train.jsonl"
    file.write_bytes(b"x" * 4500)
    assert data.file_digest(str(file)) == hashlib.sha256(b"x" * 4500).hexdigest()
    assert not (tmp_path / "cache" / data.DIGEST_CACHE).exists()  # just written: may change within its mtime tick
    old = file.stat().st_mtime_ns - 10 * data.RACY_NS
    os.utime(file, ns=(old, old))
    reads = []
    real_open = open
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: reads.append(str(f)) or real_open(f, *a, **k))
    assert data.file_digest(str(file)) == hashlib.sha256(b"x" * 4500).hexdigest()
    assert reads.count(str(file)) == 1
    stat = file.stat()
    file.write_bytes(b"y" * 4500)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: judged unchanged
    assert data.file_digest(str(file)) == hashlib.sha256(b"x" * 4500).hexdigest()
    assert reads.count(str(file)) == 1  # served from the cache
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert data.file_digest(str(file)) == hashlib.sha256(b"y" * 4500).hexdigest()
    assert reads.count(str(file)) == 2


def test_classification_batches_from_the_tokens_made_once_equal_the_tokenizers_own_batches(job, tiny_model):
    """Each split is tokenized once into flat arrays; a batch padded from them is the batch the tokenizer
    builds from the texts (what every batch of every epoch did before), truncation included."""
    from transformers import AutoTokenizer

    from orchestrator.train.tasks import Classification, load_data, make_task

    spec = spec_from_dict(job(data={"max_length": 8}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    task = make_task(spec, load_data(spec), tokenizer)
    calls = []
    real = type(tokenizer).__call__
    type(tokenizer).__call__ = lambda self, *a, **k: calls.append(a) or real(self, *a, **k)
    try:
        for split, indices in (("train", [5, 0, 17, 3]), ("validation", [1]), ("test", [2, 9])):
            batch, tokens = task.batch(split, indices)
            texts = [getattr(task.data, split).texts[i] for i in indices]
            expected = real(tokenizer, texts, truncation=True, max_length=8, padding=True, return_tensors="pt")
            assert torch.equal(batch["input_ids"], expected["input_ids"])
            assert torch.equal(batch["attention_mask"], expected["attention_mask"])
            assert tokens == int(expected["attention_mask"].sum())
    finally:
        type(tokenizer).__call__ = real
    assert not calls  # batches tokenize nothing
    short = Classification(task.data, tokenizer, 4)  # below the spec's floor: the tiny texts are 8 tokens at most
    expected = tokenizer(task.data.train.texts[:3], truncation=True, max_length=4, padding=True, return_tensors="pt")
    assert torch.equal(short.batch("train", [0, 1, 2])[0]["input_ids"], expected["input_ids"])
    assert expected["input_ids"].shape[1] == 4  # truncated


@pytest.mark.parametrize("given", ["folder", "glob"])
def test_a_folder_of_shards_or_a_glob_reads_as_one_file_and_errors_name_the_shard(job, tiny_data, tmp_path, given):
    """Shards in sorted order give the rows of the one file they were cut from, with the same digest as the
    same bytes change; a bad row is named by its shard and its row in that shard."""
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"train-{i:05d}.jsonl").write_text("\n".join(lines[i * 64:(i + 1) * 64]) + "\n")
    (shards / "README.md").write_text("not data")  # ignored: not a data file
    path = str(shards) if given == "folder" else str(shards / "train-*.jsonl")
    whole = load_task_data(spec_from_dict(job()).data)
    sharded = load_task_data(spec_from_dict(job(data={"train": path})).data)
    assert sharded.train.texts == whole.train.texts and sharded.train.labels == whole.train.labels
    digest = sharded.train.digest
    bad = lines[64:128]
    bad[9] = json.dumps({"text": "  ", "label": "billing"})
    (shards / "train-00001.jsonl").write_text("\n".join(bad) + "\n")
    with pytest.raises(SpecError, match=r"row 10 of .*train-00001\.jsonl"):
        load_task_data(spec_from_dict(job(data={"train": path})).data)
    (shards / "train-00001.jsonl").write_text("\n".join(lines[64:128]) + "\n")
    assert load_task_data(spec_from_dict(job(data={"train": path})).data).train.digest == digest


def test_a_glob_that_matches_nothing_names_the_field_and_the_pattern(job, tmp_path):
    with pytest.raises(SpecError, match=r"data\.train: no file matches .*nothing-\*\.jsonl"):
        load_task_data(spec_from_dict(job(data={"train": str(tmp_path / "nothing-*.jsonl")})).data)


@pytest.mark.parametrize("stopping", ["first_exhausted", "all_exhausted"])
def test_a_mixture_is_the_rows_interleave_datasets_gives(job, tiny_data, tmp_path, stopping):
    """data.train as [{path, weight}]: the rows in the order datasets.interleave_datasets draws them (weights
    normalized, data.mixture_seed, data.mixture_stopping), checked per source; the digest covers the weights."""
    from datasets import Dataset, interleave_datasets

    rows = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    a, b = rows[:150], rows[150:]
    for name, part in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(map(json.dumps, part)) + "\n")
    mixture = [{"path": str(tmp_path / "a.jsonl"), "weight": 1}, {"path": str(tmp_path / "b.jsonl"), "weight": 3}]
    spec = spec_from_dict(job(data={"train": mixture, "mixture_stopping": stopping, "mixture_seed": 5}))
    got = load_task_data(spec.data)
    expected = interleave_datasets([Dataset.from_list(a), Dataset.from_list(b)], probabilities=[0.25, 0.75], seed=5,
                                   stopping_strategy=stopping)
    assert got.train.texts == expected["text"]
    assert got.label_names == sorted({r["label"] for r in expected})
    reweighted = spec_from_dict(job(data={"train": [mixture[0], {**mixture[1], "weight": 2}],
                                          "mixture_stopping": stopping, "mixture_seed": 5}))
    assert load_task_data(reweighted.data).train.digest != got.train.digest


@pytest.mark.parametrize("weight", [0, -1])
def test_a_mixture_weight_not_above_zero_is_refused_naming_the_field(job, tiny_data, weight):
    mixture = [{"path": str(tiny_data / "train.jsonl"), "weight": 1},
               {"path": str(tiny_data / "train.jsonl"), "weight": weight}]
    with pytest.raises(SpecError) as refused:
        spec_from_dict(job(data={"train": mixture}))
    # only the branch the list took: no "data.train.str: Input should be a valid string" beside it
    assert str(refused.value).endswith(f": data.train.1.weight: Input should be greater than 0 (got {weight})")


def test_a_bad_row_in_a_mixture_source_names_its_list_entry(job, tiny_data, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine text", "label": "billing"}) + "\n"
                                        + json.dumps({"text": "", "label": "billing"}) + "\n")
    mixture = [{"path": str(tiny_data / "train.jsonl")}, {"path": str(tmp_path / "bad.jsonl")}]
    with pytest.raises(SpecError, match=r"data\.train\[1\]\.path: row 2 of .*bad\.jsonl"):
        load_task_data(spec_from_dict(job(data={"train": mixture})).data)


def test_a_causal_lm_mixture_interleaves_records_and_refuses_sources_of_different_formats(tmp_path):
    from datasets import Dataset, interleave_datasets

    from orchestrator.spec import DataSpec
    from orchestrator.train.data import validation_cut
    from orchestrator.train.lm_data import load_lm_data

    a = [{"prompt": f"question {i} :", "completion": f" answer {i}"} for i in range(12)]
    b = [{"prompt": f"q {i} :", "completion": f" a {i}"} for i in range(30)]
    for name, rows in (("a", a), ("b", b), ("text", [{"text": "plain words"}] * 3)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    spec = DataSpec(train=[{"path": str(tmp_path / "a.jsonl"), "weight": 2}, {"path": str(tmp_path / "b.jsonl")}],
                    validation_split=0.2)
    data = load_lm_data(spec)
    order = interleave_datasets([Dataset.from_list(a), Dataset.from_list(b)], probabilities=[2 / 3, 1 / 3], seed=42)
    mixed = list(order)
    held = set(validation_cut(len(mixed), 0.2))
    assert data.format == "prompt_completion"
    assert data.train.records == [r for i, r in enumerate(mixed) if i not in held]
    assert data.validation.records == [r for i, r in enumerate(mixed) if i in held]
    with pytest.raises(SpecError, match=r"data\.train: the mixture's sources have different formats"):
        load_lm_data(DataSpec(train=[{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "text.jsonl")}],
                              validation_split=0.2))
