"""Saving and sampling under ZeRO-3 stay bounded (issue 20, point 6): a fully fine-tuned model is saved one module
at a time, and sampling gathers the model once per generate call, not once per generated token.

Real DeepSpeed, in-process (a world-size-1 gloo group); ZeRO-3 partitions and gathers the same way at one rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.spec import spec_from_dict
from orchestrator.train import loop
from orchestrator.train.session import LocalContext


class _GatherLog:
    """Records, while ``on``, the parameter elements each ``deepspeed.zero.GatheredParameters`` makes resident."""

    def __init__(self, monkeypatch):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        self.on, self.sizes = False, []
        enter = GatheredParameters.__enter__

        def logged(context):  # on the class: DeepSpeed's modules import the name itself
            if self.on and context.enabled:
                self.sizes.append(sum(p.ds_numel for p in context.params))
            return enter(context)

        monkeypatch.setattr(GatheredParameters, "__enter__", logged)


@pytest.mark.parametrize("consolidate", ["deepspeed", "public-fallback"])
def test_full_fine_tuning_at_zero3_saves_the_trained_model_one_module_at_a_time(lm_job, tmp_path, monkeypatch,
                                                                                 consolidate):
    """The saved model equals the engine's gathered weights, tensor for tensor, and loads with from_pretrained;
    no gather during the save held more than one module's own parameters (before: the whole model, on every
    rank). Both the DeepSpeed method and the public fallback for a DeepSpeed without it."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if consolidate == "public-fallback":
        monkeypatch.delattr(DeepSpeedEngine, "_zero3_consolidated_16bit_state_dict")
    gathers = _GatherLog(monkeypatch)
    seen = {}
    original = loop.save_adapter

    def save_and_gather_reference(engine, *args):
        import deepspeed

        gathers.on = True
        folder = original(engine, *args)
        gathers.on = False
        model = engine.module
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            seen["reference"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        seen["largest_module"] = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in model.modules())
        seen["total"] = sum(p.ds_numel for p in model.parameters())
        return folder

    monkeypatch.setattr(loop, "save_adapter", save_and_gather_reference)
    spec = spec_from_dict(lm_job(method={"name": "full"}, deepspeed={"zero_stage": 3}, scaling={"num_workers": 1},
                                 train={"epochs": None, "max_steps": 2, "learning_rate": 1e-3},
                                 generation={"num_prompts": 0}))
    loop.train_worker(spec, LocalContext(str(tmp_path / "ckpt")), None, None)

    folder = Path(spec.output_dir, "adapter")
    saved = {}
    for file in folder.glob("*.safetensors"):
        saved.update(load_file(file))
    reference = seen["reference"]
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[name], reference[name]) for name in reference)
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)
    base = AutoModelForCausalLM.from_pretrained(spec.model.path).state_dict()
    assert any(not torch.equal(base[name], reference[name]) for name in reference)  # it was trained
    assert gathers.sizes and max(gathers.sizes) <= seen["largest_module"] < seen["total"] / 2


def _zero3_engine(folder: Path):
    """A ZeRO-3 engine on the tiny Llama that frees every layer after its forward pass, as for a real model's
    layers (the defaults keep a tiny model's small tensors resident: under 1e5 elements each)."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from orchestrator.train.modeling import skip_shared_memory_allreduce

    skip_shared_memory_allreduce()
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                      dist_init_required=False)
    return engine


def test_sampling_under_zero3_gathers_once_per_call_and_completes_as_without_it(tiny_llama, tmp_path, monkeypatch):
    """Same greedy completions as the plain model; one gather of the whole model per call whatever the number of
    tokens (before: every layer at each token); ZeRO-3's hooks are back afterwards (training goes on the same).
    A model too large to gather keeps the per-token path, with a notice, and the same completions."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.train import zero3
    from orchestrator.train.tasks import generate

    LocalContext(str(tmp_path / "ckpt"))  # the gloo group
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"question : {words}"}], tokenize=False,
                                             add_generation_prompt=True)
               for words in ("my invoice is late", "battery broken again", "password locked today")]
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    engine = _zero3_engine(tiny_llama)
    gathers = _GatherLog(monkeypatch)
    fetches = []
    fetch = PartitionedParameterCoordinator.fetch_sub_module
    monkeypatch.setattr(PartitionedParameterCoordinator, "fetch_sub_module",
                        lambda self, module, forward: fetches.append(module) or fetch(self, module, forward))
    batch = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False).to(engine.device)
    loss_before = engine(**batch, labels=batch["input_ids"]).loss.item()

    def sample(max_new_tokens: int, notices: list[str]) -> tuple[list[str], int, int]:
        gathers.sizes.clear(), fetches.clear()
        gathers.on = True
        texts = zero3.generate_zero3(engine, prompts, lambda rendered, synced: generate(
            engine.module, tokenizer, rendered, max_new_tokens, add_special_tokens=False, synced=synced,
            device=engine.device), notices.append)
        gathers.on = False
        return texts, len(gathers.sizes), len(fetches)

    for max_new_tokens in (4, 16):
        expected = generate(plain, tokenizer, prompts, max_new_tokens, add_special_tokens=False)
        assert len(set(expected)) > 1 and max(len(tokenizer.tokenize(e)) for e in expected) == max_new_tokens
        notices: list[str] = []
        texts, whole_model_gathers, layer_fetches = sample(max_new_tokens, notices)
        assert texts == expected and notices == []
        assert (whole_model_gathers, layer_fetches) == (1, 0)
        assert gathers.sizes == [sum(p.ds_numel for p in engine.module.parameters())]
    assert engine(**batch, labels=batch["input_ids"]).loss.item() == loss_before and fetches  # hooks back

    monkeypatch.setattr(zero3, "free_bytes", lambda device: 0)  # the gathered model fits nowhere
    per_call = []
    for max_new_tokens in (4, 16):
        notices = []
        texts, whole_model_gathers, layer_fetches = sample(max_new_tokens, notices)
        assert texts == generate(plain, tokenizer, prompts, max_new_tokens, add_special_tokens=False)
        assert whole_model_gathers == 0 and len(notices) == 1 and "does not fit" in notices[0]
        per_call.append(layer_fetches)
    assert per_call[1] > 2 * per_call[0]  # the synced path gathers every layer again at each token


TWO_RANKS = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
from transformers import AutoTokenizer
from orchestrator.train import zero3
from orchestrator.train.tasks import generate
from tests.test_zero3 import _zero3_engine

dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
folder, prompts = Path(sys.argv[1]), json.loads(sys.argv[2])
tokenizer, engine = AutoTokenizer.from_pretrained(folder), _zero3_engine(folder)
shares = []
texts = zero3.generate_zero3(engine, prompts, lambda rendered, synced: shares.append(len(rendered)) or generate(
    engine.module, tokenizer, rendered, 8, add_special_tokens=False, synced=synced, device=engine.device), print)
print(json.dumps({"texts": texts, "shares": shares}))
"""


def test_two_ranks_share_the_prompts_and_each_gets_every_completion_in_order(tiny_llama):
    """Gathered, each rank completes every other prompt; both end with all completions, in the prompts' order,
    equal to the plain model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.train.tasks import generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"question : {words}"}], tokenize=False,
                                             add_generation_prompt=True)
               for words in ("my invoice is late", "battery broken again", "password locked today")]
    expected = generate(AutoModelForCausalLM.from_pretrained(tiny_llama), tokenizer, prompts, 8,
                        add_special_tokens=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "WORLD_SIZE": "2", "DS_ACCELERATOR": "cpu"}
    ranks = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(tiny_llama), json.dumps(prompts)],
                              env={**env, "RANK": r, "LOCAL_RANK": r}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in ("0", "1")]
    try:
        outputs = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["shares"] for r in results] == [[2], [1]]  # prompts 0 and 2 on rank 0, prompt 1 on rank 1
    assert [r["texts"] for r in results] == [expected, expected]


def test_the_gathered_model_must_fit_every_rank():
    from orchestrator.train.zero3 import GATHER_SHARE, fits_gathered

    assert fits_gathered(90, [100, 200])
    assert not fits_gathered(91, [100, 200])  # the smallest rank decides: all ranks take the same path
    assert not fits_gathered(1, [0]) and GATHER_SHARE == 0.9
