"""Load (marker ``load``, not in the default run: about 12 minutes on 2 cores): a search of 50 short trials on
the local Ray cluster. Every trial ends in a terminal state, nothing is leaked once the command returns (no
training worker process, no placement group that is not REMOVED), and the driver's memory stays flat.

    .venv/bin/python -m pytest -m load tests/test_load.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.plan.search import FINISHED, STOPPED_EARLY
from tests.tiny import train_workers, write_job

pytestmark = [pytest.mark.load, pytest.mark.integration, pytest.mark.timeout(1800)]
TRIALS = 50


def test_fifty_trials_end_terminal_leak_nothing_and_keep_the_driver_flat(ray_cluster, job, tmp_path):
    import psutil
    import ray
    from mlflow import MlflowClient
    from ray.util.state import list_placement_groups

    raw = job(train={"epochs": None, "max_steps": 4, "eval_every_steps": 2, "log_every_steps": 2},
              scaling={"num_workers": 1}, registry={"name": "load"},
              tune={"space": {"train.learning_rate": {"loguniform": [1e-4, 3e-2]}, "lora.r": {"choice": [2, 4, 8]}},
                    "metric": "eval_loss", "num_samples": TRIALS, "seed": 1,
                    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}})
    groups_before = {g.placement_group_id for g in list_placement_groups(limit=10_000)}
    command = [sys.executable, "-m", "orchestrator", "tune", str(write_job(tmp_path / "job.yaml", raw))]
    driver = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": ray_cluster}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, float]] = []  # (seconds since start, driver RSS MiB)

    def sample():
        started, process = time.monotonic(), psutil.Process(driver.pid)
        while driver.poll() is None:
            try:
                samples.append((time.monotonic() - started, process.memory_info().rss / 2**20))
            except psutil.NoSuchProcess:
                break
            time.sleep(1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = driver.communicate(timeout=1800)[0]
    sampler.join()
    assert driver.returncode == 0, out[-4000:]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = train_workers()
        groups = [g for g in list_placement_groups(limit=10_000)
                  if g.placement_group_id not in groups_before and g.state != "REMOVED"]
        if not workers and not groups:
            break
        time.sleep(1)
    assert not workers, "training workers outlived the search"
    assert not groups, [(g.placement_group_id, g.state) for g in groups]
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]

    summary = json.loads(next(Path(raw["output_dir"]).rglob("summary.json")).read_text())
    statuses = [trial["status"] for trial in summary["trial_times"]]
    assert len(statuses) == TRIALS and set(statuses) <= {FINISHED, STOPPED_EARLY}, statuses
    client = MlflowClient(f"sqlite:///{raw['output_dir']}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("orchestrator").experiment_id], max_results=1000)
    assert len(runs) == TRIALS + 1 and all(r.info.status in ("FINISHED", "KILLED") for r in runs)

    # Flat: the driver's RSS over the last half of the search grows by less than 10% of its level at the middle.
    middle = [rss for t, rss in samples if samples[-1][0] * 0.45 <= t <= samples[-1][0] * 0.55]
    end = [rss for t, rss in samples if t >= samples[-1][0] * 0.9]
    growth = (max(end) - max(middle)) / max(middle)
    print(f"\n{TRIALS} trials in {samples[-1][0]:.0f} s; statuses "
          f"{ {s: statuses.count(s) for s in set(statuses)} }; driver RSS MiB: first {samples[0][1]:.0f}, "
          f"middle {max(middle):.0f}, end {max(end):.0f} ({100 * growth:+.1f}%)")
    assert growth < 0.10
