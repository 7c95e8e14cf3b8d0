"""Causal LM data and training by invariant, on a tiny Llama-style model built in-process: masking token by
token, the chat template applied, EOS and truncation, packing that leaks neither attention nor loss across
examples, and a world-size-1 DeepSpeed run whose adapter plain PEFT loads and `orchestrator generate` uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator.cli import EXIT_BAD_INPUT, main
from orchestrator.spec import DataSpec, SpecError, spec_from_dict
from orchestrator.train.lm_data import (
    IGNORE,
    Encoded,
    collate,
    encode,
    encode_split,
    load_lm_data,
    pack,
    trained_tokens,
)
from orchestrator.train.loop import train_worker
from orchestrator.train.session import LocalContext
from tests.tiny import write_job, write_tiny_lm_data

CHAT = {"messages": [{"role": "system", "content": "answer briefly"},
                     {"role": "user", "content": "question : my invoice"},
                     {"role": "assistant", "content": "topic : billing"},
                     {"role": "user", "content": "question : my parcel"},
                     {"role": "assistant", "content": "topic : shipping"}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


def test_prompt_completion_trains_exactly_the_completion_and_eos(tokenizer):
    example = encode({"prompt": "question : my invoice answer :", "completion": " topic : billing"}, tokenizer,
                     64, "completion")
    tokens = _tokens(tokenizer, example.input_ids)
    assert tokens == ["question", ":", "my", "invoice", "answer", ":", "topic", ":", "billing", "<|im_end|>"]
    trained = [t for t, label in zip(tokens, example.labels) if label != IGNORE]
    assert trained == ["topic", ":", "billing", "<|im_end|>"]  # the EOS is learned: the model learns to stop
    assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))
    everything = encode({"prompt": "question : my invoice answer :", "completion": " topic : billing"}, tokenizer,
                        64, "all")
    assert everything.labels == everything.input_ids


def test_chat_is_rendered_with_the_template_and_only_assistant_turns_train(tokenizer):
    example = encode(CHAT, tokenizer, 128, "completion")
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the template, as is
    tokens = _tokens(tokenizer, example.input_ids)
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE]
    # Both assistant turns (with their end-of-turn token) train; system, user turns and role headers do not.
    assert [tokens[i] for i in trained] == ["topic", ":", "billing", "<|im_end|>", "topic", ":", "shipping",
                                            "<|im_end|>"]
    runs = [i for i in trained if i - 1 not in trained]
    assert len(runs) == 2 and all(tokens[i - 2:i] == ["<|im_start|>", "assistant"] for i in runs)


def test_truncation_caps_length_and_drops_examples_left_without_a_trained_token(tokenizer):
    long_prompt = {"prompt": " ".join(["my"] * 40) + " answer :", "completion": " topic : billing"}
    short = {"prompt": "question : my invoice answer :", "completion": " topic : billing"}
    assert len(encode(long_prompt, tokenizer, 16, "completion")) == 16
    assert trained_tokens(encode(long_prompt, tokenizer, 16, "completion")) == 0
    from orchestrator.train.lm_data import LMSplit

    split = LMSplit("train", "mem", [long_prompt, short], "x")
    kept, dropped = encode_split(split, tokenizer, DataSpec(train="x", max_length=16))
    assert (len(kept), dropped) == (1, 1)
    with pytest.raises(SpecError, match="data.max_length"):
        encode_split(LMSplit("train", "mem", [long_prompt], "x"), tokenizer, DataSpec(train="x", max_length=16))


def _examples(tokenizer) -> list[Encoded]:
    rows = [{"prompt": f"question : {words} answer :", "completion": f" topic : {topic}"}
            for words, topic in (("my invoice late", "billing"), ("parcel courier", "shipping"),
                                 ("password locked again please", "login"))]
    return [encode(r, tokenizer, 64, "completion") for r in rows]


def test_packing_keeps_every_trained_token_and_none_across_a_boundary(tokenizer):
    examples = _examples(tokenizer)
    rows = pack(examples, max_length=64)
    assert len(rows) == 1 and rows[0].starts == (0, len(examples[0]), len(examples[0]) + len(examples[1]))
    assert rows[0].input_ids == [t for e in examples for t in e.input_ids]
    assert all(rows[0].labels[start] == IGNORE for start in rows[0].starts)  # nothing predicted across a boundary
    assert trained_tokens(rows[0]) == sum(trained_tokens(e) for e in examples)
    assert [len(r) for r in pack(examples, max_length=len(examples[0]) + len(examples[1]))] == [
        len(examples[0]) + len(examples[1]), len(examples[2])]  # whole examples only, never split


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_isolated_packing_gives_each_example_the_logits_and_loss_it_has_alone(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    examples = _examples(tokenizer)
    packed = pack(examples, max_length=64)
    isolated = _logits(model, collate(packed, tokenizer.pad_token_id, isolated=True))[0]
    shared = _logits(model, collate(packed, tokenizer.pad_token_id, isolated=False))[0]
    for example, start in zip(examples, packed[0].starts):
        alone = _logits(model, collate([example], tokenizer.pad_token_id, isolated=False))[0]
        assert torch.allclose(isolated[start:start + len(example)], alone, atol=1e-5)
        if start:  # shared attention sees the earlier examples: the invariant above is not vacuous
            assert not torch.allclose(shared[start:start + len(example)], alone, atol=1e-3)
    batch = collate(packed, tokenizer.pad_token_id, isolated=True)
    with torch.no_grad():
        packed_loss = model(**batch).loss
        alone = [(model(**collate([e], tokenizer.pad_token_id, False)).loss, trained_tokens(e)) for e in examples]
    token_mean = sum(loss * n for loss, n in alone) / sum(n for _, n in alone)
    assert packed_loss == pytest.approx(float(token_mean), rel=1e-5)


@pytest.mark.parametrize("kind, fmt", [("chat", "chat"), ("prompt_completion", "prompt_completion"),
                                       ("text", "text")])
def test_the_format_is_detected_from_the_columns(tmp_path, kind, fmt):
    folder = write_tiny_lm_data(tmp_path / kind, kind=kind, train=8, validation=4)
    data = load_lm_data(DataSpec(train=str(folder / "train.jsonl"), validation=str(folder / "validation.jsonl")))
    assert data.format == fmt and len(data.train) == 8 and len(data.validation) == 4


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "each message needs a role"),
    ({"messages": "not json"}, "not JSON"),
    ({"prompt": "hi", "completion": ""}, "non-empty text"),
    ({"words": "hi"}, "cannot tell the format"),
])
def test_bad_rows_name_the_file_and_field(tmp_path, row, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SpecError, match=message) as caught:
        load_lm_data(DataSpec(train=str(path), validation=str(path)))
    assert str(path) in str(caught.value) and str(caught.value).startswith("data.")  # the file and the field


def test_validate_shows_the_rendered_example_with_trained_spans(lm_job, tmp_path, capsys):
    assert main(["validate", str(write_job(tmp_path / "job.yaml", lm_job()))]) == 0
    out = capsys.readouterr().out
    assert "format chat, loss on completion tokens" in out
    assert "user question" in out and "assistant[[topic : billing <|im_end|>]]" in out  # prompt plain, answer marked


@pytest.fixture(scope="module")
def trained(tiny_llama, tiny_chats, tmp_path_factory):
    """A world-size-1 DeepSpeed run on packed chats; its spec, progress events and final metrics."""
    from tests.tiny import tiny_lm_job

    root = tmp_path_factory.mktemp("lm-in-process")
    events = []
    spec = spec_from_dict(tiny_lm_job(root, tiny_llama, tiny_chats, scaling={"num_workers": 1}, data={"packing": True},
                                      train={"epochs": 4, "learning_rate": 0.02, "log_every_steps": 4},
                                      generation={"prompts": ["question : my invoice late"], "max_new_tokens": 4}))
    final = train_worker(spec, LocalContext(str(root / "ckpt"), on_progress=events.append), None, None)
    return spec, events, final


def test_in_process_training_learns_and_its_adapter_loads_with_plain_peft_and_generate(trained, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, events, final = trained
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"]
    assert final["eval_perplexity"] == pytest.approx(torch.tensor(final["eval_loss"]).exp().item(), rel=1e-6)
    samples = [e for e in events if e["event"] == "samples"]
    assert samples[0]["step"] == 0 and samples[-1]["samples"][0][1].startswith("topic :")
    assert not samples[0]["samples"][0][1].startswith("topic :")  # the base answered in its own style

    adapter = Path(spec.output_dir, "adapter")
    assert not (adapter / "labels.json").exists()
    base = AutoModelForCausalLM.from_pretrained(spec.model.path)
    model = PeftModel.from_pretrained(base, adapter).eval()  # plain PEFT, none of our code
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "question : my invoice late"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    last = samples[-1]["samples"][0][1]
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == last  # as measured

    capsys.readouterr()
    assert main(["generate", "--adapter", str(adapter), "--max-new-tokens", "4", "question : my invoice late"]) == 0
    assert capsys.readouterr().out.strip() == last.strip()


def test_generate_takes_a_registry_uri(trained, tmp_path, capsys):
    from mlflow import MlflowClient

    from orchestrator.tracking.registry import register_adapter

    spec, events, _ = trained
    uri = f"sqlite:///{tmp_path}/registry.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("lm", artifact_location=str(tmp_path / "artifacts")))
    client.log_artifacts(run.info.run_id, str(Path(spec.output_dir, "adapter")), "adapter")
    version = register_adapter(client, "tiny-lm", run.info.run_id, {})
    client.set_registered_model_alias("tiny-lm", "champion", version)
    capsys.readouterr()
    assert main(["generate", "--adapter", "models:/tiny-lm@champion", "--tracking-uri", uri, "--max-new-tokens", "4",
                 "question : my invoice late"]) == 0
    assert capsys.readouterr().out.strip() == [e for e in events if e["event"] == "samples"][-1]["samples"][0][1]
    assert main(["generate", "--adapter", "models:/tiny-lm@nope", "--tracking-uri", uri, "hi"]) == EXIT_BAD_INPUT
    assert "nope" in capsys.readouterr().err


def test_generate_refuses_what_is_not_a_causal_lm_adapter(tmp_path, capsys):
    assert main(["generate", "--adapter", str(tmp_path), "hello"]) == EXIT_BAD_INPUT
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "peft_type": "LORA"}))
    assert main(["generate", "--adapter", str(tmp_path), "hello"]) == EXIT_BAD_INPUT
    assert "SEQ_CLS adapter" in capsys.readouterr().err


def test_chat_data_on_a_model_without_a_chat_template_is_refused_before_training(job, tiny_chats, tmp_path,
                                                                                   capsys):
    raw = job(model={"task": "causal_lm"}, data={"train": str(tiny_chats / "train.jsonl"),
                                                  "validation": str(tiny_chats / "validation.jsonl"), "test": None})
    assert main(["validate", str(write_job(tmp_path / "job.yaml", raw))]) == EXIT_BAD_INPUT
    assert "data.format: chat data needs a tokenizer with a chat template" in capsys.readouterr().err


def test_all_linear_adapts_attention_and_mlp_but_not_the_output_layer(lm_job):
    from orchestrator.train.modeling import build_peft_model

    model = build_peft_model(spec_from_dict(lm_job(lora={"r": 4, "target_modules": "all-linear"})), None)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layers = [m for _, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        4 * (m.in_features + m.out_features) for m in layers)  # r·(in+out) per adapted layer, nothing else


def test_gradient_checkpointing_changes_memory_not_the_gradients(lm_job, tokenizer):
    from orchestrator.train.modeling import build_peft_model

    examples = _examples(tokenizer)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = spec_from_dict(lm_job(lora={"dropout": 0.0}, train={"gradient_checkpointing": checkpointing}))
        model = build_peft_model(spec, None)
        generator = torch.Generator().manual_seed(1)  # the same values for both models, in parameter order
        with torch.no_grad():  # LoRA B starts at zero; make it non-zero so A's gradient is not trivially zero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02, generator=generator)
        model.train()
        model(**collate(examples, tokenizer.pad_token_id, isolated=False)).loss.backward()
        assert model.base_model.model.is_gradient_checkpointing == checkpointing
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
