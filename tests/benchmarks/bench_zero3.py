"""Sampling and saving under ZeRO-3 (issue 20, point 6): time and memory of the loop's sample generation and of
its final save, for a causal LM job at ZeRO-3 (results go in tests/benchmarks/BENCHMARKS.md).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_zero3.py --root /tmp/bench_zero3 [--method lora|full]
        [--release] [--max-new-tokens 32] [--prompts 4] [--out RESULT.json]

One run of the real loop in this process (``train_worker`` in a world-size-1 gloo group, DeepSpeed ZeRO-3, CPU)
on ``tests.memory_probe``'s Llama (4 layers, hidden 256, 8k vocabulary, random weights: greedy completions run
all ``--max-new-tokens``), 2 training steps, an evaluation with samples at steps 0 and 2. ``--release`` passes a
DeepSpeed JSON that frees every layer after its forward pass (``stage3_max_reuse_distance`` and
``stage3_param_persistence_threshold`` 0): what ZeRO-3 does with a real model's layers, which are far above the
defaults' 1e9-element reuse distance and 1e5-element persistence threshold (this model, 7M parameters, stays
resident at the defaults). Measured: wall and CPU seconds in the samples' generation per evaluation (the loop's
``generate_zero3`` call where it has one, else its ``generate`` call), the loop's ``evaluation_seconds``, and the
save's seconds and peak resident memory above what was resident when it began.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--release", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # glibc would keep freed memory: RSS would not follow
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from orchestrator.spec import spec_from_dict
    from orchestrator.train import loop
    from orchestrator.train.device import PeakMemory
    from orchestrator.train.session import LocalContext
    from tests.memory_probe import job

    root = Path(args.root)
    settings = job(root, "llama", micro_batch=4, seq=64, checkpointing=False)
    settings.update(method={"name": args.method}, generation={"num_prompts": args.prompts,
                                                              "max_new_tokens": args.max_new_tokens})
    settings["train"].update(max_steps=2, eval_every_steps=2, learning_rate=1e-3)
    settings["deepspeed"] = {"zero_stage": 3}
    if args.release:
        ds = root / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0,
                                                        "stage3_param_persistence_threshold": 0},
                                  "gradient_clipping": 1.0,
                                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}))
        settings["deepspeed"]["config"] = str(ds)
    spec = spec_from_dict(settings)

    sampling, sampling_cpu, saving = [], [], {}
    timed = "generate_zero3" if hasattr(loop, "generate_zero3") else "generate"  # after, before the change
    inner = getattr(loop, timed)

    def timed_sampling(*a, **k):
        started, started_cpu = time.perf_counter(), time.process_time()
        out = inner(*a, **k)
        sampling.append(time.perf_counter() - started)
        sampling_cpu.append(time.process_time() - started_cpu)
        return out

    save = loop.save_adapter

    def timed_save(*a, **k):
        memory = PeakMemory(False)
        memory.reset()
        before, started = memory.now_mb(), time.perf_counter()
        out = save(*a, **k)
        saving.update(seconds=time.perf_counter() - started, peak_above_mb=memory.peak_mb() - before)
        return out

    setattr(loop, timed, timed_sampling)
    loop.save_adapter = timed_save
    events = []  # the samples (completions) and any warning (a notice that sampling took the per-token path)
    context = LocalContext(str(root / "ckpt"), on_progress=lambda update: events.append(update)
                           if update["event"] in ("samples", "warning") else None)
    final = loop.train_worker(spec, context, None, None)
    result = {"method": args.method, "release": args.release, "max_new_tokens": args.max_new_tokens,
              "prompts": args.prompts, "timed": timed, "sampling_s": sampling,
              "sampling_cpu_s": sampling_cpu,
              "evaluation_seconds": final["evaluation_seconds"], "save": saving,
              "completion_words": [[len(c.split()) for _, c in e["samples"]] for e in events if "samples" in e],
              "warnings": [e["text"] for e in events if e["event"] == "warning"], "events": events}
    print(json.dumps({k: v for k, v in result.items() if k != "events"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
