"""Data at scale: the cost per micro-step of the epoch's permutation, before and after f37f793.

    .venv/bin/python tests/benchmarks/bench_data.py [--rows 10000,1000000,10000000] [--steps 20] [--old-steps-large 3]

Times ``micro_batch_indices`` (world size 8, micro-batch 16, rank 0, 1 accumulation step) for consecutive
micro-steps of epoch 0, side by side: the code before f37f793 (copied below as ``old_epoch_shard`` /
``old_micro_batch_indices``: a Python ``random.Random`` shuffle of a list of every row, redone at every micro-step)
and the current ``orchestrator.plan.batches`` (a numpy permutation computed once per epoch, kept by ``lru_cache``).
Prints the median ms per micro-batch of each, the new one's first (cold, permutation-computing) call and its
1M/10k and 10M/10k ratios; then, at the largest size, the bytes of the new cached shard and the peak RSS growth of
computing one epoch's shard (VmHWM of /proc/self/status in a fresh subprocess, reset with /proc/self/clear_refs
after the imports: ``ru_maxrss`` is not used, Linux carries the parent's peak into it across fork and exec; plus
tracemalloc's peak in a second, separate computation, since tracemalloc's bookkeeping inflates RSS; numpy reports
its buffers to it), old and new. The old code at 10M rows takes seconds
per call: it runs ``--old-steps-large`` calls there (20 below 5M rows). About 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from orchestrator.plan.batches import BatchPlan, epoch_shard, micro_batch_indices  # noqa: E402

WORLD, MICRO, SEED = 8, 16, 42


# ---- The code before f37f793 (orchestrator/plan/batches.py at f37f793^), verbatim but for the names ----------
def old_epoch_shard(num_examples: int, rank: int, world_size: int, epoch: int, seed: int) -> list[int]:
    """This rank's example indices for one epoch: one seeded shuffle shared by all ranks, dealt round robin,
    wrapped so every rank gets ``ceil(n / world)`` (all ranks must run the same number of steps)."""
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_worker = math.ceil(num_examples / world_size)
    padded = (order * 2)[: per_worker * world_size]
    return padded[rank::world_size]


def old_micro_batch_indices(plan: BatchPlan, num_examples: int, rank: int, micro_step: int, seed: int) -> list[int]:
    epoch, position = divmod(micro_step, plan.micro_batches_per_epoch)
    shard = old_epoch_shard(num_examples, rank, plan.world_size, epoch, seed)
    start = position * plan.micro_batch_size
    return shard[start:start + plan.micro_batch_size]
# ---- end of the code before f37f793 ---------------------------------------------------------------------------


def plan_for(rows: int) -> BatchPlan:
    per_worker = math.ceil(rows / WORLD)
    micro = math.ceil(per_worker / MICRO)
    return BatchPlan(world_size=WORLD, micro_batch_size=MICRO, gradient_accumulation_steps=1,
                     examples_per_worker=per_worker, micro_batches_per_epoch=micro, total_steps=micro,
                     warmup_steps=0, eval_every_steps=micro, checkpoint_every_steps=micro)


def time_steps(fn, plan: BatchPlan, rows: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` consecutive micro-steps (0, 1, ...) on rank 0."""
    out = []
    for step in range(steps):
        start = time.perf_counter()
        fn(plan, rows, 0, step, SEED)
        out.append(time.perf_counter() - start)
    return out


MEMORY_PROBE = """
import json, sys, tracemalloc
sys.path.insert(0, {repo!r})
import numpy as np
sys.path.insert(0, {bench!r})
import bench_data
rows, which = {rows}, {which!r}
status = lambda key: int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key)))  # kB
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS now (ru_maxrss would keep the parent's peak)
fn = bench_data.epoch_shard if which == "new" else bench_data.old_epoch_shard
before = status("VmHWM")
shard = fn(rows, 0, 8, 0, 42)
after = status("VmHWM")
# Again under tracemalloc, apart: its own record of every allocation (10M int objects, old) would inflate RSS.
bench_data.epoch_shard.cache_clear()
tracemalloc.start()
fn(rows, 0, 8, 0, 42)
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
held = shard.nbytes if which == "new" else None
print(json.dumps({{"rss_growth_kib": after - before, "traced_peak_bytes": traced_peak, "held_bytes": held,
                  "len": len(shard)}}))
"""


def memory(rows: int, which: str) -> dict:
    code = MEMORY_PROBE.format(repo=str(REPO), bench=str(Path(__file__).parent), rows=rows, which=which)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,1000000,10000000")
    parser.add_argument("--steps", type=int, default=20, help="consecutive micro-steps timed per size")
    parser.add_argument("--old-steps-large", type=int, default=3, help="old code's calls at >= 5M rows")
    parser.add_argument("--no-old-memory", action="store_true", help="skip the old code's memory probe")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]

    results = []
    for rows in sizes:
        plan = plan_for(rows)
        # Same indices, old and new (different generators, so different orders; same shape and coverage).
        assert len(old_micro_batch_indices(plan, 100, 0, 0, SEED)) == len(micro_batch_indices(plan, 100, 0, 0, SEED))
        epoch_shard.cache_clear()
        new = time_steps(micro_batch_indices, plan, rows, args.steps + 1)
        old_steps = args.old_steps_large if rows >= 5_000_000 else args.steps
        old = time_steps(old_micro_batch_indices, plan, rows, old_steps)
        results.append({"rows": rows, "micro_batches_per_epoch": plan.micro_batches_per_epoch,
                        "old_ms": statistics.median(old) * 1e3, "old_calls": old_steps,
                        "new_cold_ms": new[0] * 1e3, "new_ms": statistics.median(new[1:]) * 1e3,
                        "new_calls": args.steps})
        print(f"  {rows:>10,} rows done", file=sys.stderr, flush=True)

    base = results[0]["new_ms"]
    print(f"\nmicro_batch_indices, world size {WORLD}, micro-batch {MICRO}, rank 0, epoch 0 (median per micro-batch)\n")
    print("| rows | micro-batches / epoch | before f37f793 (ms) | now, warm (us) | now, first call of the epoch (ms) "
          f"| now / now at {sizes[0]:,} rows | before / now |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['micro_batches_per_epoch']:,} | {r['old_ms']:.1f} (median of {r['old_calls']}) "
              f"| {r['new_ms'] * 1e3:.1f} (median of {r['new_calls']}) | {r['new_cold_ms']:.1f} "
              f"| {r['new_ms'] / base:.2f}x | {r['old_ms'] / r['new_ms']:,.0f}x |")

    rows = sizes[-1]
    new_mem = memory(rows, "new")
    old_mem = None if args.no_old_memory else memory(rows, "old")
    print(f"\nOne epoch's shard at {rows:,} rows, rank 0 of {WORLD} (fresh subprocess; RSS: VmHWM growth)\n")
    print("| code | held per rank | peak RSS growth | tracemalloc peak |")
    print("|---|---|---|---|")
    print(f"| now | {new_mem['held_bytes'] / 2**20:.2f} MiB ({new_mem['len']:,} x int32, numpy, cached) "
          f"| {new_mem['rss_growth_kib'] / 1024:.0f} MiB | {new_mem['traced_peak_bytes'] / 2**20:.0f} MiB |")
    if old_mem:
        print(f"| before f37f793 | a list of {old_mem['len']:,} ints (not kept: rebuilt every step) "
              f"| {old_mem['rss_growth_kib'] / 1024:.0f} MiB | {old_mem['traced_peak_bytes'] / 2**20:.0f} MiB |")
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": results, "memory": {"new": new_mem, "old": old_mem}}, indent=2))


if __name__ == "__main__":
    main()
