"""The attention kernel a job names, and isolated packing under every kernel, by invariant on the tiny Llama: a
packed example gets the logits it has alone, in padded rows (sdpa, eager) and in the padding-free flattened row
that flash attention needs (it keeps packed examples apart only in a batch of one row); the task picks the
flattened row for isolated packing under flash; the base loads with the job's kernel (training and serving);
and the model class's own attention flags are reported."""

from __future__ import annotations

import pytest
import torch
import yaml

from orchestrator.spec import spec_from_dict
from orchestrator.train.lm_data import IGNORE, collate, encode, flatten, pack

KERNELS = ("sdpa", "eager")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module", params=KERNELS)
def model(request, tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32,
                                                attn_implementation=request.param).eval()


def _examples(tokenizer):
    prompts = [("my invoice late", "billing"), ("parcel courier", "shipping"), ("password locked again", "login"),
               ("refund", "billing"), ("courier parcel late again please", "shipping")]
    return [encode({"prompt": f"question : {words} answer :", "completion": f" topic : {topic}"}, tokenizer, 64,
                   "completion") for words, topic in prompts]


def _rows(tokenizer):
    """Two packed rows of 2 and 3 examples, of different lengths (so the padded batch has padding)."""
    examples = _examples(tokenizer)
    rows = pack(examples[:2], 64) + pack(examples[2:], 64)
    assert [len(r.starts) for r in rows] == [2, 3] and len(rows[0]) != len(rows[1])
    return examples, rows


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _alone(model, examples) -> list[torch.Tensor]:
    return [_logits(model, {"input_ids": torch.tensor([e.input_ids])})[0] for e in examples]


def test_the_flattened_row_gives_every_example_the_logits_it_has_alone(model, tokenizer):
    examples, rows = _rows(tokenizer)
    batch = flatten(rows)
    assert batch["input_ids"].shape == (1, sum(len(r) for r in rows)) and "attention_mask" not in batch
    flat, offset = _logits(model, batch)[0], 0
    for example, alone in zip(examples, _alone(model, examples)):
        assert torch.allclose(flat[offset:offset + len(example)], alone, atol=1e-5)
        offset += len(example)
    assert offset == batch["input_ids"].shape[1]


def test_padded_isolated_rows_give_every_example_the_logits_it_has_alone(model, tokenizer):
    examples, rows = _rows(tokenizer)
    batch = collate(rows, tokenizer.pad_token_id, isolated=True)
    assert batch["input_ids"].shape == (2, max(len(r) for r in rows))  # more than one row, one of them padded
    padded, alone = _logits(model, batch), iter(_alone(model, examples))
    for i, row in enumerate(rows):
        for start, example in zip(row.starts, examples[sum(len(r.starts) for r in rows[:i]):]):
            assert torch.allclose(padded[i, start:start + len(example)], next(alone), atol=1e-5)


def _token_mean_loss(model, examples) -> float:
    with torch.no_grad():
        alone = [(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss,
                  sum(label != IGNORE for label in e.labels[1:])) for e in examples]
    return float(sum(loss * n for loss, n in alone) / sum(n for _, n in alone))


def test_both_batches_carry_the_loss_of_the_examples_alone(model, tokenizer):
    examples, rows = _rows(tokenizer)
    with torch.no_grad():
        flat = model(**flatten(rows)).loss
        padded = model(**collate(rows, tokenizer.pad_token_id, isolated=True)).loss
    assert float(flat) == pytest.approx(_token_mean_loss(model, examples), rel=1e-5)
    assert float(padded) == pytest.approx(_token_mean_loss(model, examples), rel=1e-5)


def test_flattening_unpacked_examples_predicts_nothing_across_a_boundary(model, tokenizer):
    """Examples trained on every token (their first one labelled too) flattened as they are: flatten() must
    unlabel each first token, which the example before would otherwise be trained to predict."""
    examples = [encode(e, tokenizer, 64, "all") for e in
                ({"text": "question : my invoice late"}, {"text": "parcel courier shipping"})]
    assert all(e.labels[0] != IGNORE for e in examples)
    with torch.no_grad():
        flat = model(**flatten(examples)).loss
    assert float(flat) == pytest.approx(_token_mean_loss(model, examples), rel=1e-5)


def test_without_restarting_position_ids_the_flattened_row_leaks_across_examples(model, tokenizer):
    """The negative control: the same row with positions counting on through it (what a model computes itself
    when given none) makes the second example attend to the first, so the invariants above are not vacuous."""
    examples, rows = _rows(tokenizer)
    batch = flatten(rows)
    leaky = _logits(model, {"input_ids": batch["input_ids"],
                            "position_ids": torch.arange(batch["input_ids"].shape[1])[None]})[0]
    second = _alone(model, examples)[1]
    assert not torch.allclose(leaky[len(examples[0]):len(examples[0]) + len(examples[1])], second, atol=1e-3)


def _task(lm_job, tokenizer, attention: str, **data):
    from orchestrator.train.lm_data import load_lm_data
    from orchestrator.train.tasks import CausalLM

    spec = spec_from_dict(lm_job(model={"attn_implementation": attention},
                                 data={"packing": True, "max_length": 64, **data},
                                 train={"micro_batch_size": 4, "precision": "bf16", "epochs": 1},
                                 scaling={"num_workers": 1, "use_gpu": attention != "sdpa"}))
    return CausalLM(load_lm_data(spec.data), tokenizer, spec)


@pytest.mark.parametrize("attention", ["flash_attention_2", "flash_attention_3"])
def test_isolated_packing_under_flash_attention_builds_one_flattened_row(lm_job, tokenizer, attention):
    task = _task(lm_job, tokenizer, attention)
    rows = [task.rows["train"][i] for i in range(4)]
    assert all(len(r.starts) > 1 for r in rows)
    batch, tokens = task.batch("train", [0, 1, 2, 3])
    ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
    assert ids.shape == positions.shape == labels.shape == (1, sum(len(r) for r in rows)) == (1, tokens)
    assert "attention_mask" not in batch and tokenizer.pad_token_id not in ids[0].tolist()
    assert ids[0].tolist() == [t for r in rows for t in r.input_ids]
    starts = (positions[0] == 0).nonzero().view(-1).tolist()  # positions restart at every example
    assert len(starts) == sum(len(r.starts) for r in rows) and positions[0, 1:].ne(0).sum() == tokens - len(starts)
    assert all(labels[0, s] == IGNORE for s in starts)
    assert labels[0].tolist() == [t for r in rows for t in r.labels]  # pack() already unlabels each first token
    evaluation, _ = task.batch("validation", [0, 1, 2, 3])  # evaluation stays padded, with a mask
    assert evaluation["input_ids"].shape[0] == 4 and "attention_mask" in evaluation


@pytest.mark.parametrize("attention, data", [("sdpa", {}), ("flash_attention_2", {"packing_attention": "shared"})])
def test_other_jobs_keep_padded_rows(lm_job, tokenizer, attention, data):
    task = _task(lm_job, tokenizer, attention, **data)
    batch, tokens = task.batch("train", [0, 1, 2, 3])
    assert batch["input_ids"].shape[0] == 4 and tokens == sum(len(task.rows["train"][i]) for i in range(4))
    assert ("attention_mask" in batch) == (data.get("packing_attention") == "shared")


@pytest.mark.parametrize("attention", KERNELS)
def test_the_base_loads_with_the_jobs_attention_kernel(lm_job, attention):
    from orchestrator.train.modeling import build_peft_model

    spec = spec_from_dict(lm_job(model={"attn_implementation": attention}, scaling={"num_workers": 1}))
    model = build_peft_model(spec, None)
    assert model.get_base_model().config._attn_implementation == attention


@pytest.mark.parametrize("trained, served", [("eager", "eager"), ("sdpa", "sdpa"), ("flash_attention_2", "sdpa")])
def test_serving_keeps_the_jobs_kernel_where_it_runs_on_any_device(lm_job, tiny_llama, tmp_path, trained, served):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.serve.inference import load_adapter
    from orchestrator.train.modeling import JOB_FILE

    spec = spec_from_dict(lm_job(model={"attn_implementation": trained}, train={"precision": "bf16"},
                                 scaling={"num_workers": 1, "use_gpu": trained.startswith("flash")}))
    folder = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    (folder / JOB_FILE).write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    loaded = load_adapter(str(folder))
    assert loaded.model.get_base_model().config._attn_implementation == served


def test_attention_support_reads_the_model_classes_own_flags(lm_job, monkeypatch):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from orchestrator.train.shape import attention_support

    spec = spec_from_dict(lm_job(scaling={"num_workers": 1}))
    assert attention_support(spec) == {"sdpa": True, "flash": True, "flex": True, "attention_backend": True}
    monkeypatch.setattr(LlamaForCausalLM, "_supports_flash_attn", False)  # read from the class, not assumed
    monkeypatch.setattr(LlamaForSequenceClassification, "_supports_sdpa", False)
    assert attention_support(spec)["flash"] is False and attention_support(spec)["sdpa"] is True
    classifier = spec.model_copy(update={"model": spec.model.model_copy(update={"task": "sequence_classification"})})
    assert attention_support(classifier)["sdpa"] is False and attention_support(classifier)["flash"] is True
