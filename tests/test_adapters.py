"""Using adapters, by invariant: `merge` gives a standalone model (no PEFT) with the unmerged adapter's outputs
that differ from the base (the check is not vacuous), shards when asked and refuses what it cannot do cleanly;
`eval` reproduces what training measured on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.serve.inference import PROBE_TEXTS, load_adapter, merge_adapter
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.train.loop import train_worker
from orchestrator.train.session import LocalContext
from tests.tiny import tiny_job, tiny_lm_job

TEXTS = ["my invoice is late again", "the screen is broken", "why is my parcel late", "my password is locked"]


@pytest.fixture(scope="module")
def classifier(tiny_model, tiny_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-cls")
    spec = spec_from_dict(tiny_job(root, tiny_model, tiny_data, scaling={"num_workers": 1}, train={"epochs": 2}))
    final = train_worker(spec, LocalContext(str(root / "ckpt")), None, None)
    (root / "final.json").write_text(json.dumps(final))  # what training measured, for the eval tests
    return Path(spec.output_dir, "adapter")


@pytest.fixture(scope="module")
def causal(tiny_llama, tiny_chats, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-lm")
    spec = spec_from_dict(tiny_lm_job(root, tiny_llama, tiny_chats, scaling={"num_workers": 1},
                                      train={"epochs": 1, "learning_rate": 0.02}, generation={"num_prompts": 0}))
    final = train_worker(spec, LocalContext(str(root / "ckpt")), None, None)
    (root / "final.json").write_text(json.dumps(final))
    return Path(spec.output_dir, "adapter")


def _trained(adapter: Path) -> dict:
    return json.loads((adapter.parent.parent / "final.json").read_text())


def _logits(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits.float(), batch["attention_mask"].bool()


@pytest.mark.parametrize("kind", ["classifier", "causal"])
def test_merged_equals_unmerged_and_loads_without_peft(request, kind, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter = request.getfixturevalue(kind)
    loaded = load_adapter(str(adapter))
    unmerged, mask = _logits(loaded.model, loaded.tokenizer, TEXTS + PROBE_TEXTS)
    with loaded.model.disable_adapter():
        base, _ = _logits(loaded.model, loaded.tokenizer, TEXTS + PROBE_TEXTS)

    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "max |merged - unmerged| logit" in capsys.readouterr().out
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    standalone = auto.from_pretrained(tmp_path / "merged").eval()  # plain transformers: no PEFT, no adapter files
    assert not any("lora" in name for name, _ in standalone.named_parameters())
    merged, _ = _logits(standalone, AutoTokenizer.from_pretrained(tmp_path / "merged"), TEXTS + PROBE_TEXTS)
    rows = mask if merged.dim() == 3 else slice(None)  # causal LM logits: compare real tokens, not padding
    assert (merged[rows] - unmerged[rows]).abs().max() <= 1e-4
    assert (base[rows] - unmerged[rows]).abs().max() > 1e-3  # the adapter changed the outputs: not vacuous
    if kind == "classifier":
        assert json.loads((tmp_path / "merged" / "labels.json").read_text()) == loaded.labels


def test_a_large_model_is_sharded(classifier, tmp_path):
    report = merge_adapter(load_adapter(str(classifier)), str(tmp_path / "sharded"), max_shard_size="30KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert report.max_abs_diff <= 1e-4


def test_refusals_write_nothing(classifier, causal, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert main(["merge", "--adapter", str(classifier), "--out", str(occupied)]) == EXIT_BAD_INPUT
    assert "not empty" in capsys.readouterr().err and [p.name for p in occupied.iterdir()] == ["keep.txt"]

    loaded = load_adapter(str(causal))
    loaded.model.get_base_model().config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with pytest.raises(SpecError, match="quantized"):
        merge_adapter(loaded, str(tmp_path / "from-4bit"))
    assert not (tmp_path / "from-4bit").exists() and not list(tmp_path.glob(".from-4bit-*"))

    with pytest.raises(SpecError, match="causal_lm adapter"):
        load_adapter(str(classifier), task="causal_lm")


def test_eval_reports_the_metrics_training_measured(classifier, tiny_data, tmp_path, capsys):
    assert main(["eval", "--adapter", str(classifier), "--data", str(tiny_data / "test.jsonl"),
                 "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert f"accuracy {metrics['accuracy']:.4f}" in out and metrics["examples"] == 64
    assert [row["label"] for row in metrics["per_class"]] == json.loads((classifier / "labels.json").read_text())
    assert sum(sum(row) for row in metrics["confusion_matrix"]) == 64
    assert sum(metrics["confusion_matrix"][i][i] for i in range(4)) / 64 == pytest.approx(metrics["accuracy"])
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    trained = _trained(classifier)  # same rows, same model: the numbers training logged
    assert metrics["accuracy"] == pytest.approx(trained["test_accuracy"])
    assert metrics["macro_f1"] == pytest.approx(trained["test_macro_f1"])
    assert metrics["loss"] == pytest.approx(trained["test_loss"], abs=1e-5)


def test_eval_of_a_causal_lm_gives_the_training_loop_validation_loss(causal, tiny_chats, capsys):
    assert main(["eval", "--adapter", str(causal), "--data", str(tiny_chats / "validation.jsonl"),
                 "--batch-size", "5", "--log-format", "json", "--progress-every", "0"]) == 0  # batches unlike
    captured = capsys.readouterr()  # training's: padding must not change the loss
    records = [json.loads(line) for line in captured.err.splitlines() if line.startswith("{")]  # (transformers,
    progress = [r for r in records if r["event"] == "progress"]  # imported before main() here, draws its bar)
    assert [r["done"] for r in progress] == [min(n, 32) for n in range(5, 36, 5)] and progress[-1]["total"] == 32
    words = captured.out.split()
    loss, perplexity = float(words[words.index("loss") + 1]), float(words[words.index("perplexity") + 1])
    assert loss == pytest.approx(_trained(causal)["eval_loss"], abs=1e-4)
    assert perplexity == pytest.approx(_trained(causal)["eval_perplexity"], abs=1e-3)


def test_predict_labels_every_row_as_eval_scores_them(classifier, tiny_data, tmp_path, capsys):
    import pandas as pd

    rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "test.parquet")  # the same rows through another reader
    assert main(["predict", "--adapter", str(classifier), "--data", str(tmp_path / "test.parquet"),
                 "--out", str(tmp_path / "preds.jsonl"), "--batch-size", "7"]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["text"] for p in predictions] == [r["text"] for r in rows]  # every row, in order, inputs kept
    assert all(abs(sum(t["score"] for t in p["top"]) - 1) < 0.5 and p["top"][0]["label"] == p["label"]
               for p in predictions)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(predictions, rows)) / len(rows)
    assert accuracy == pytest.approx(_trained(classifier)["test_accuracy"])
    capsys.readouterr()
    assert main(["predict", "--adapter", str(classifier), "--text", "my invoice is wrong"]) == 0
    assert capsys.readouterr().out.split()[0] in json.loads((classifier / "labels.json").read_text())


def test_predict_generates_what_generate_prints(causal, tmp_path, capsys):
    rows = [{"prompt": "question : my invoice late"}, {"prompt": "question : screen battery broken"}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["predict", "--adapter", str(causal), "--data", str(tmp_path / "prompts.jsonl"),
                 "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "4", "--batch-size", "1"]) == 0
    completions = [json.loads(line)["completion"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(["generate", "--adapter", str(causal), "--max-new-tokens", "4", *[r["prompt"] for r in rows]]) == 0
    assert capsys.readouterr().out.strip().splitlines() == completions


def test_predict_refuses_data_without_the_text_column_and_writes_nothing(classifier, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"words": "my invoice"}) + "\n")
    assert main(["predict", "--adapter", str(classifier), "--data", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "preds.jsonl")]) == EXIT_BAD_INPUT
    assert "column 'text'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


class _RecordingTokenizer:
    """The adapter's tokenizer, recording the truncation length each call is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.max_lengths = tokenizer, []

    def __call__(self, *args, **kwargs):
        self.max_lengths.append(kwargs.get("max_length"))
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_field_renamed_since_training_takes_the_specs_default_with_a_warning(classifier, tiny_data, tmp_path):
    """A saved job from another version (data.max_length renamed) loads; serving truncates at training's default
    (the spec's data.max_length), not at a value of its own."""
    import dataclasses
    import shutil
    import warnings

    import yaml

    from orchestrator.serve.evaluation import evaluate_file
    from orchestrator.serve.inference import predict_rows
    from orchestrator.spec import DataSpec

    adapter = Path(shutil.copytree(classifier, tmp_path / "adapter"))
    job = yaml.safe_load((adapter / "orchestrator_job.yaml").read_text())
    assert job["data"].pop("max_length") == 16
    job["data"]["max_len"] = 64
    (adapter / "orchestrator_job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_adapter(str(adapter))
    recording = _RecordingTokenizer(loaded.tokenizer)
    loaded = dataclasses.replace(loaded, tokenizer=recording)
    predict_rows(loaded, [{"text": text} for text in TEXTS], batch_size=2)
    evaluate_file(loaded, str(tiny_data / "test.jsonl"))
    default = DataSpec.model_fields["max_length"].default
    assert default == 128
    assert recording.max_lengths and set(recording.max_lengths) == {default}
    assert [str(w.message) for w in caught if "data.max_len" in str(w.message)] == [
        f"{adapter / 'orchestrator_job.yaml'}: ignoring saved keys this version does not know: data.max_len (saved "
        "by another version; the spec's defaults apply to whatever is missing)"]


def test_an_adapter_without_a_saved_job_loads_on_pefts_recorded_base_and_predicts(causal, tmp_path):
    """A plain PEFT folder from elsewhere: base from adapter_config.json, prompts as given (no chat template)."""
    import shutil

    from orchestrator.serve.inference import predict_rows

    adapter = Path(shutil.copytree(causal, tmp_path / "plain", ignore=shutil.ignore_patterns("orchestrator_job.yaml")))
    loaded = load_adapter(str(adapter))
    assert loaded.base.path == json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert load_adapter(str(causal)).chat and not loaded.chat  # trained on chats, but nothing here says so
    rows = predict_rows(loaded, [{"prompt": "question : my invoice late"}], max_new_tokens=2)
    assert isinstance(rows[0]["completion"], str)


def test_export_writes_what_serving_engines_load(causal, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["export", "--adapter", str(causal), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    files = {p.name for p in (tmp_path / "peft").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # safetensors only
    loaded = load_adapter(str(causal))
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(loaded.base.path),
                                         tmp_path / "peft").eval()
    original, mask = _logits(loaded.model, loaded.tokenizer, TEXTS)
    again, _ = _logits(exported, loaded.tokenizer, TEXTS)
    assert torch.equal(original[mask], again[mask])

    assert main(["export", "--adapter", str(causal), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    assert "merged float32 model" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()


@pytest.fixture(scope="module")
def causal_other(tiny_llama, tiny_chats, tmp_path_factory) -> Path:
    """A second adapter on the same base, taught another answer ("billing billing" instead of "topic : billing")."""
    root = tmp_path_factory.mktemp("merge-lm-other")
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (tiny_chats / f"{split}.jsonl").read_text().splitlines()]
        for row in rows:
            label = row["messages"][1]["content"].split()[-1]
            row["messages"][1]["content"] = f"{label} {label}"
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict(tiny_lm_job(root, tiny_llama, root, scaling={"num_workers": 1},
                                      train={"epochs": 3, "learning_rate": 0.02}, generation={"num_prompts": 0}))
    train_worker(spec, LocalContext(str(root / "ckpt")), None, None)
    return Path(spec.output_dir, "adapter")


def test_predict_switches_adapters_per_row_on_one_base(causal, causal_other, tmp_path, capsys):
    prompts = ["question : my invoice late", "question : screen battery broken", "question : parcel courier"]
    alone = {}
    for name, adapter in (("topic", causal), ("twice", causal_other)):
        (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        assert main(["predict", "--adapter", str(adapter), "--data", str(tmp_path / "in.jsonl"),
                     "--out", str(tmp_path / f"{name}.jsonl"), "--max-new-tokens", "3", "--batch-size", "1"]) == 0
        alone[name] = [json.loads(line)["completion"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert alone["topic"] != alone["twice"]  # two different adapters: the switching check is not vacuous

    mixed = [{"prompt": p, "adapter": a} for p in prompts for a in ("default", "twice")]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    assert main(["predict", "--adapter", str(causal), "--also", f"twice={causal_other}", "--data",
                 str(tmp_path / "mixed.jsonl"), "--out", str(tmp_path / "mixed-out.jsonl"), "--max-new-tokens", "3",
                 "--batch-size", "1"]) == 0
    out = [json.loads(line) for line in (tmp_path / "mixed-out.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in out] == [(r["prompt"], r["adapter"]) for r in mixed]  # order kept
    for row in out:
        expected = alone["topic" if row["adapter"] == "default" else "twice"][prompts.index(row["prompt"])]
        assert row["completion"] == expected

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "hi", "adapter": "nope"}) + "\n")
    assert main(["predict", "--adapter", str(causal), "--data", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "bad-out.jsonl")]) == EXIT_BAD_INPUT
    assert "nope" in capsys.readouterr().err and not (tmp_path / "bad-out.jsonl").exists()


def test_eval_logs_a_run_linked_to_the_registry_version(classifier, tiny_data, tmp_path, capsys):
    from mlflow import MlflowClient

    from orchestrator.tracking.registry import register_adapter

    uri = f"sqlite:///{tmp_path}/registry.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("train", artifact_location=str(tmp_path / "artifacts")))
    client.log_artifacts(run.info.run_id, str(classifier), "adapter")
    version = register_adapter(client, "tiny-topics", run.info.run_id, {})
    client.set_registered_model_alias("tiny-topics", "champion", version)
    assert main(["eval", "--adapter", "models:/tiny-topics@champion", "--tracking-uri", uri, "--data",
                 str(tiny_data / "test.jsonl"), "--out", str(tmp_path / "eval"), "--log-to-mlflow"]) == 0
    assert f"linked to tiny-topics version {version}" in capsys.readouterr().out
    tags = client.get_model_version("tiny-topics", version).tags
    evaluation = client.get_run(tags["orchestrator.eval.run_id"])
    assert evaluation.info.status == "FINISHED" and evaluation.data.tags["orchestrator.model_version"] == version
    accuracy = json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"]
    assert evaluation.data.metrics["accuracy"] == pytest.approx(accuracy)
    assert float(tags["orchestrator.eval.accuracy"]) == pytest.approx(accuracy, rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/metrics.json", "evaluation/confusion_matrix.png"}
