"""The one training loop on a CUDA GPU: NCCL, bf16, the real DeepSpeed engine (skipped without a GPU).

Run by ``make gpu-check`` (``tests/gpu_check.sh``) at world size 1 in-process: what only a GPU can show. The CPU
half of each check is in ``tests/test_devices.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import sum_over_workers, train_worker
from orchestrator.train.session import LocalContext

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl(tmp_path):
    """A world-size-1 NCCL group (made once per process; later tests reuse it)."""
    return lambda name: LocalContext(str(tmp_path / name), backend="nccl")


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_on_gpu_beats_chance(job, nccl, stage):
    events = []
    spec = spec_from_dict(job(scaling={"num_workers": 1, "use_gpu": True}, deepspeed={"zero_stage": stage}))
    context = nccl("ckpt")
    context._on_progress = events.append
    final = train_worker(spec, context, None, None)  # precision auto: bf16 on a GPU that has it
    assert final["test_accuracy"] > 0.5 and final["peak_memory_mb"] > 0
    start = next(e for e in events if e["event"] == "start")
    assert start["computes"].startswith("precision bf16 (weights bfloat16)"), start["computes"]
    assert torch.get_float32_matmul_precision() == "high"  # TF32 for the fp32 work (Ampere and newer)


def test_a_wrong_device_collective_fails_on_nccl_and_the_loops_does_not(nccl):
    nccl("unused")
    import torch.distributed as dist

    with pytest.raises(RuntimeError):  # an NCCL group takes CUDA tensors only: what the loop once sent
        dist.all_reduce(torch.ones(2, dtype=torch.float64))
    assert sum_over_workers([1.0, 2.0], torch.device("cuda", torch.cuda.current_device())) == [1.0, 2.0]


def test_resumed_run_equals_uninterrupted_run_on_gpu(lm_job, nccl, tmp_path):
    """GPU dropout draws from the CUDA generator: a checkpoint without its state resumes with other masks."""
    from safetensors.torch import load_file

    from tests.test_lora import _Crash, _CrashAfterFirstCheckpoint

    sections = {"scaling": {"num_workers": 1, "use_gpu": True}, "lora": {"dropout": 0.3},
                "generation": {"num_prompts": 0},
                "train": {"epochs": None, "max_steps": 8, "checkpoint_every_steps": 4, "eval_every_steps": 4}}
    straight = spec_from_dict(lm_job(output_dir=str(tmp_path / "straight"), **sections))
    train_worker(straight, nccl("straight-ckpt"), None, None)
    resumed = spec_from_dict(lm_job(output_dir=str(tmp_path / "resumed"), **sections))
    with pytest.raises(_Crash):
        train_worker(resumed, _CrashAfterFirstCheckpoint(str(tmp_path / "resumed-ckpt"), backend="nccl"), None, None)
    torch.cuda.manual_seed(12345)  # a fresh process's CUDA generator would not be where the crash left it
    train_worker(resumed, LocalContext(str(tmp_path / "resumed-ckpt"), backend="nccl"), None, None)
    a = load_file(Path(straight.output_dir, "adapter", "adapter_model.safetensors"))
    b = load_file(Path(resumed.output_dir, "adapter", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_flash_attention_trains_packed_rows_padding_free(lm_job, nccl):
    pytest.importorskip("flash_attn")
    spec = spec_from_dict(lm_job(scaling={"num_workers": 1, "use_gpu": True},
                                 model={"attn_implementation": "flash_attention_2"},
                                 data={"packing": True}, train={"micro_batch_size": 4, "epochs": 1}))
    final = train_worker(spec, nccl("ckpt"), None, None)
    assert final["eval_loss"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_the_base_loads_straight_onto_the_workers_gpu(lm_job, nccl, stage, monkeypatch):
    """Issue 20, points 1-2: at ZeRO-2 a device map puts every weight on the worker's GPU as it is read; at
    ZeRO-3 zero.Init puts each rank's partition there. Checked on what the loop's loading returned, before
    DeepSpeed touched it."""
    from orchestrator.train import loop
    from orchestrator.train.partitioned import is_partitioned

    seen = {}
    built = loop.build_peft_model

    def spied(spec, labels):
        model = built(spec, labels)
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        seen["devices"] = {getattr(p, "ds_tensor", p).device.type for p in base}
        seen["partitioned"] = is_partitioned(model)
        return model

    monkeypatch.setattr(loop, "build_peft_model", spied)
    spec = spec_from_dict(lm_job(scaling={"num_workers": 1, "use_gpu": True}, deepspeed={"zero_stage": stage},
                                 generation={"num_prompts": 1, "max_new_tokens": 4},
                                 train={"epochs": None, "max_steps": 4, "eval_every_steps": 4}))
    final = train_worker(spec, nccl("ckpt"), None, None)
    assert seen["devices"] == {"cuda"} and seen["partitioned"] == (stage == 3)
    assert final["eval_loss"] > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_qlora_trains_on_the_workers_gpu_at_zero2_and_zero3(lm_job, nccl, stage):
    """Issue 20, point 3: QLoRA with an explicit device map (ZeRO-2), and at ZeRO-3 with the 4-bit values stored
    in the compute dtype so that ZeRO-3 partitions them (PEFT's DeepSpeed guide). Needs bitsandbytes (the GPU
    check installs the wheel `make gpu-wheels` downloads)."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    spec = spec_from_dict(lm_job(method={"name": "qlora"}, scaling={"num_workers": 1, "use_gpu": True},
                                 deepspeed={"zero_stage": stage}, generation={"num_prompts": 0},
                                 train={"epochs": None, "max_steps": 6, "eval_every_steps": 6,
                                        "learning_rate": 3e-3}))
    final = train_worker(spec, nccl("ckpt"), None, None)
    assert final["eval_loss"] > 0
    adapter = load_file(Path(spec.output_dir, "adapter", "adapter_model.safetensors"))
    assert any("lora_B" in name and float(t.float().abs().max()) > 0 for name, t in adapter.items())
