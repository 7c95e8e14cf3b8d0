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
