"""ZeRO-3 partitioned loading (issue 20, point 1), on two real ranks (a gloo group, DeepSpeed's CPU accelerator).

While the training loop's ``HfDeepSpeedConfig`` is alive, transformers builds the base inside zero.Init and
rank 0 copies the files in; :func:`orchestrator.train.partitioned.one_shard_at_a_time` makes rank 0 hold one
shard at a time. The memory this saves is measured in ``tests/benchmarks/bench_zero3_load.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny import start_two_ranks, tiny_lm_job, write_job

LOAD_ON_TWO_RANKS = """
import json, os, sys, yaml
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed, torch, torch.distributed as dist
from safetensors.torch import load_file
from transformers import modeling_utils
from orchestrator.plan.batches import deepspeed_config, plan_batches
from orchestrator.spec import spec_from_dict
from orchestrator.train.modeling import build_peft_model, model_folder
from orchestrator.train.partitioned import is_partitioned, zero3_loading

dist.init_process_group("gloo")
rank = dist.get_rank()
spec = spec_from_dict(yaml.safe_load(open(sys.argv[1])))
copies = []  # per call of transformers' copy-in: the bytes of real (not meta) tensors it was handed
original = modeling_utils._load_state_dict_into_zero3_model
def recorded(model, state_dict, load_config=None):
    copies.append(sum(t.numel() * t.element_size() for t in state_dict.values() if t.device.type != "meta"))
    return original(model, state_dict, load_config)
modeling_utils._load_state_dict_into_zero3_model = recorded
keep = zero3_loading(deepspeed_config(spec, plan_batches(spec, 8)))
model = build_peft_model(spec, None)
partitioned = is_partitioned(model)
base = {n: p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
local = sum(p.ds_tensor.numel() for p in base.values() if hasattr(p, "ds_tensor"))
full = sum(p.ds_numel for p in base.values() if hasattr(p, "ds_numel"))
differ = []
with deepspeed.zero.GatheredParameters(list(base.values())):
    if rank == 0:
        saved = {}
        for f in sorted(os.listdir(model_folder(spec.model))):
            if f.endswith(".safetensors"):
                saved.update(load_file(os.path.join(model_folder(spec.model), f)))
        for name, p in base.items():
            key = name.replace(".base_layer.", ".")
            if key in saved and not torch.equal(p.detach(), saved[key].to(p.dtype)):
                differ.append(name)
        compared = sum(1 for name in base if name.replace(".base_layer.", ".") in saved)
print(json.dumps({"rank": rank, "partitioned": partitioned, "local": local, "full": full, "copies": copies,
                  "differ": differ if rank == 0 else [], "compared": compared if rank == 0 else 0}), flush=True)
"""


def _two_ranks(script: str, job: Path, timeout: int = 400) -> list[dict]:
    ranks = start_two_ranks(script, str(job))
    try:
        outputs = [rank.communicate(timeout=timeout) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][1][-2500:] + outputs[1][1][-2500:]
    return [json.loads([line for line in out.splitlines() if line.startswith("{")][-1]) for out, _ in outputs]


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama re-saved in several safetensors shards (an index file names them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded") / "llama"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def test_zero3_loads_each_rank_a_partition_and_rank_0_one_shard_at_a_time(sharded_llama, tiny_chats, tmp_path):
    shards = sorted(sharded_llama.glob("*.safetensors"))
    assert len(shards) >= 3
    job = write_job(tmp_path / "job.yaml", tiny_lm_job(tmp_path, sharded_llama, tiny_chats,
                                                       deepspeed={"zero_stage": 3}, scaling={"num_workers": 2}))
    ranks = _two_ranks(LOAD_ON_TWO_RANKS, job)
    assert [r["partitioned"] for r in ranks] == [True, True]  # ds_status NOT_AVAILABLE right after loading
    full = ranks[0]["full"]
    assert all(r["local"] <= full // 2 + 64 for r in ranks)  # each rank holds its half (padding aside)
    assert sum(r["local"] for r in ranks) >= full
    # rank 0 was handed the real tensors shard by shard, never the whole checkpoint; rank 1 only meta tensors
    largest = max(f.stat().st_size for f in shards)
    assert len(ranks[0]["copies"]) == len(shards) and max(ranks[0]["copies"]) <= largest
    assert ranks[1]["copies"] == [0] * len(shards)
    assert ranks[0]["compared"] > 0 and ranks[0]["differ"] == []  # every weight equals the files'


def test_below_zero3_nothing_is_partitioned(sharded_llama, tiny_chats, tmp_path):
    job = write_job(tmp_path / "job.yaml", tiny_lm_job(tmp_path, sharded_llama, tiny_chats,
                                                       deepspeed={"zero_stage": 2}, scaling={"num_workers": 2}))
    ranks = _two_ranks(LOAD_ON_TWO_RANKS, job)
    assert [r["partitioned"] for r in ranks] == [False, False] and ranks[0]["copies"] == []
