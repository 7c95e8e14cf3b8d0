"""Faults a long-running cluster meets: what a killed process leaves behind must not wedge the next run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import write_job

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IN_PROCESS = """
import json, sys, yaml
from orchestrator.session import LocalContext
from orchestrator.spec import spec_from_dict
from orchestrator.train_loop import train_worker
spec = spec_from_dict(yaml.safe_load(open(sys.argv[1])))
print(json.dumps(train_worker(spec, LocalContext(sys.argv[2]), None, None)))
"""


@pytest.mark.parametrize("deepspeed", [{"zero_stage": 2}, {"zero_stage": 2, "offload_optimizer": True},
                                       {"zero_stage": 3}], ids=["zero2", "zero2-offload", "zero3"])
def test_a_lock_left_by_a_killed_worker_does_not_block_training_on_cpu(job, tmp_path, deepspeed):
    # torch's JIT extension loader takes <extensions>/<op>/lock on every load and waits forever while it
    # exists; a worker killed inside that window leaves it behind. Training on CPU must load no such op.
    extensions = tmp_path / "torch_extensions"  # with TORCH_EXTENSIONS_DIR set, op folders sit right in it
    ops = ["cpu_adam", "deepspeed_shm_comm", "fused_adam"]
    for op in ops:
        (extensions / op).mkdir(parents=True)
        (extensions / op / "lock").touch()
    spec = write_job(tmp_path / "job.yaml", job(scaling={"num_workers": 1}, deepspeed=deepspeed,
                                                   train={"epochs": 1}))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", TRAIN_IN_PROCESS, str(spec), str(tmp_path / "ckpt")], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["test_accuracy"] > 0.5
    assert sorted(os.listdir(extensions)) == ops  # nothing built, nothing waited on
    assert all(os.listdir(extensions / op) == ["lock"] for op in ops)
