"""LoRA wiring by invariant (as PEFT tests it): identity at init, parameter counts, what a step changes,
the saved adapter round-trips through plain PEFT, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.plan.batches import deepspeed_config, plan_batches
from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import train_worker
from orchestrator.train.modeling import build_peft_model
from orchestrator.train.session import LocalContext

LABELS = ["billing", "hardware", "login", "shipping"]


def _batch(tiny_model: Path, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(tiny_model)(texts, padding=True, return_tensors="pt"))


def test_adapted_model_equals_base_at_init(job, tiny_model):
    spec = spec_from_dict(job(lora={"r": 4, "target_modules": "all-linear"}))
    torch.manual_seed(0)
    peft_model = build_peft_model(spec, LABELS).eval()
    batch = _batch(tiny_model, ["my invoice is late", "the screen is broken again"])
    with peft_model.disable_adapter():
        base_logits = peft_model(**batch).logits
    assert torch.allclose(peft_model(**batch).logits, base_logits, atol=1e-6)


# The tiny BERT has 2 layers of query, key, value and three "dense" (attention output, intermediate, output),
# plus the pooler's dense: 13 linear layers; 'all-linear' leaves out only the classifier head.
@pytest.mark.parametrize("targets, r, adapted", [
    (["query", "value"], 4, 4), (["query", "key", "value", "dense"], 2, 13), ("all-linear", 8, 13)])
def test_trainable_count_is_r_times_in_plus_out_plus_head(job, targets, r, adapted):
    spec = spec_from_dict(job(lora={"r": r, "target_modules": targets}))
    model = build_peft_model(spec, LABELS)
    lora_layers = [m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    expected = sum(r * (layer.in_features + layer.out_features) for layer in lora_layers)
    head = model.base_model.model.classifier
    expected += sum(p.numel() for p in head.modules_to_save["default"].parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert len(lora_layers) == adapted


def test_one_deepspeed_step_changes_only_adapter_parameters(job, tiny_model, tmp_path):
    import deepspeed

    LocalContext(str(tmp_path / "ckpt"))  # a world-size-1 gloo group
    spec = spec_from_dict(job(scaling={"num_workers": 1}, train={"learning_rate": 0.05}))
    model = build_peft_model(spec, LABELS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=deepspeed_config(spec, plan_batches(spec, 64)), dist_init_required=False)
    batch = _batch(tiny_model, ["my invoice", "my parcel"])
    engine.backward(engine(**batch, labels=torch.tensor([0, 3])).loss)
    engine.step()
    changed = {n for n, p in engine.module.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed) and any("classifier" in n for n in changed)


def _predict(adapter: Path, tiny_model: Path, rows: list[dict]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = json.loads((adapter / "labels.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(labels))
    model = PeftModel.from_pretrained(base, adapter).eval()  # plain PEFT, none of our code
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], truncation=True, max_length=16, padding=True,
                                   return_tensors="pt")).logits
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("stage", [2, 3])
def test_in_process_training_saves_an_adapter_that_round_trips(job, tiny_model, tiny_data, tmp_path, stage):
    spec = spec_from_dict(job(scaling={"num_workers": 1}, deepspeed={"zero_stage": stage}))
    final = train_worker(spec, LocalContext(str(tmp_path / "ckpt")), None, None)
    adapter = Path(spec.output_dir, "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "labels.json", "orchestrator_job.yaml"} <= {
        p.name for p in adapter.iterdir()}
    rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    labels = json.loads((adapter / "labels.json").read_text())
    predictions = _predict(adapter, tiny_model, rows)
    accuracy = sum(labels[p] == r["label"] for p, r in zip(predictions, rows)) / len(rows)
    assert accuracy == pytest.approx(final["test_accuracy"])  # what we measured is what plain PEFT loads
    assert accuracy > 0.5  # 4 balanced classes: chance is 0.25


class _ArtifactsAtEachReport(LocalContext):
    """Records which adapter files the MLflow run holds at each report."""

    def __init__(self, root: str, client, run_id: str):
        super().__init__(root)
        self.client, self.run_id, self.seen = client, run_id, []

    def report(self, metrics, checkpoint_dir, name):
        self.seen.append({a.path for a in self.client.list_artifacts(self.run_id, "adapter")})
        super().report(metrics, checkpoint_dir, name)


def test_the_adapter_is_in_mlflow_before_the_final_report(job, tmp_path):
    """In a search, Tune may end a trial, its workers included, as soon as the final report reaches it (the
    scheduler's budget is spent): by then the trial's MLflow run must hold the adapter already (a run missing
    adapter_config.json was seen when uploads came after that report)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    spec = spec_from_dict(job(scaling={"num_workers": 1},
                              train={"epochs": None, "max_steps": 4, "eval_every_steps": 2}))
    context = _ArtifactsAtEachReport(str(tmp_path / "ckpt"), client, run_id)
    train_worker(spec, context, uri, run_id)
    assert context.seen[0] == set()  # the first evaluation's report: nothing yet
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= context.seen[-1]


class _Crash(RuntimeError):
    pass


class _CrashAfterFirstCheckpoint(LocalContext):
    def report(self, metrics, checkpoint_dir, name):
        super().report(metrics, checkpoint_dir, name)
        if checkpoint_dir:
            raise _Crash(name)


def test_resumed_run_equals_uninterrupted_run(job, tmp_path):
    from safetensors.torch import load_file

    sections = {"scaling": {"num_workers": 1}, "train": {"epochs": None, "max_steps": 8, "checkpoint_every_steps": 4,
                                                         "eval_every_steps": 4}}
    straight = spec_from_dict(job(output_dir=str(tmp_path / "straight"), **sections))
    train_worker(straight, LocalContext(str(tmp_path / "straight-ckpt")), None, None)

    resumed = spec_from_dict(job(output_dir=str(tmp_path / "resumed"), **sections))
    with pytest.raises(_Crash, match="step_0000004"):
        train_worker(resumed, _CrashAfterFirstCheckpoint(str(tmp_path / "resumed-ckpt")), None, None)
    assert not Path(resumed.output_dir, "adapter").exists()  # nothing that looks finished
    starts = []
    rerun = LocalContext(str(tmp_path / "resumed-ckpt"), on_progress=lambda e: starts.append(e.get("step"))
                         if e["event"] == "start" else None)
    train_worker(resumed, rerun, None, None)
    assert starts == [4]  # it continued from the checkpoint (a fresh start would also end equal)

    a = load_file(Path(straight.output_dir, "adapter", "adapter_model.safetensors"))
    b = load_file(Path(resumed.output_dir, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
