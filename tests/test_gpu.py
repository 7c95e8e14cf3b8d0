"""The one training loop on a CUDA GPU: NCCL, bf16, the real DeepSpeed engine (skipped without a GPU)."""

from __future__ import annotations

import pytest

from orchestrator.spec import spec_from_dict
from orchestrator.train.loop import train_worker
from orchestrator.train.session import LocalContext

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_on_gpu_beats_chance(job, tmp_path, stage):
    spec = spec_from_dict(job(scaling={"num_workers": 1, "use_gpu": True}, deepspeed={"zero_stage": stage},
                              train={"precision": "bf16"}))
    final = train_worker(spec, LocalContext(str(tmp_path / "ckpt"), backend="nccl"), None, None)
    assert final["test_accuracy"] > 0.5 and final["peak_memory_mb"] > 0
