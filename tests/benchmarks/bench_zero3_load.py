"""Host memory per worker while loading the base, ZeRO-2 against ZeRO-3, before and after partitioned loading
(issue 20, points 1 and 8; results in BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_zero3_load.py [--layers 22] [--hidden 1024] [--shard 200MB]

Builds a Llama-style model in-process (random weights, fp32, untied 8k vocabulary so that no one tensor is a
large part of the whole; 22 layers x hidden 1024 is 1.09 GB) and saves it as safetensors in several shards. Then,
for each way of loading, starts 2 fresh worker processes (a gloo group, DeepSpeed's CPU accelerator) that load
it as the training loop does (``build_peft_model``, LoRA r16 on q/v) and build the DeepSpeed engine. Each worker
reports its peak RSS growth (VmHWM after, minus VmRSS before; the high-water mark reset just before) over the
load alone and over load + ``deepspeed.initialize``:

- ``zero2``: ZeRO-2, the whole base on every worker (stages 0-2 keep it whole by design);
- ``zero3-before``: ZeRO-3 without an ``HfDeepSpeedConfig`` alive (the loop before this change): every worker
  loads the whole base, and DeepSpeed partitions it only in ``initialize``;
- ``zero3-transformers``: ZeRO-3 with the object alive, transformers' own loading (rank 0 merges every shard);
- ``zero3``: the loop now: partitioned loading with rank 0 reading one shard at a time.

The target (issue 20): under ZeRO-3 each worker's growth at most 0.6x the model's size, rank 0 plus one shard.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODES = ("zero2", "zero3-before", "zero3-transformers", "zero3")
MB = 1024 * 1024


def write_model(folder: Path, layers: int, hidden: int, shard: str) -> int:
    """Saves the model (once per shape); returns its size in bytes (the safetensors files)."""
    if not (folder / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=hidden // 128, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=shard)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def status() -> dict[str, int]:
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) * 1024
    return found


def worker(folder: str, mode: str) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment); prints one JSON line."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO))
    import contextlib

    import deepspeed
    import torch.distributed as dist

    from orchestrator.plan.batches import deepspeed_config, plan_batches
    from orchestrator.spec import spec_from_dict
    from orchestrator.train import partitioned
    from orchestrator.train.modeling import build_peft_model, parameter_counts, skip_shared_memory_allreduce

    dist.init_process_group("gloo")
    root = Path(tempfile.mkdtemp(prefix="bench-z3-"))
    (root / "train.jsonl").write_text('{"text": "w1 w2"}\n' * 8)
    spec = spec_from_dict({"version": 1, "name": "z3", "output_dir": str(root / "out"),
                           "model": {"path": folder, "task": "causal_lm"},
                           "data": {"train": str(root / "train.jsonl"), "validation": str(root / "train.jsonl"),
                                    "format": "text", "max_length": 16},
                           "lora": {"r": 16, "target_modules": ["q_proj", "v_proj"]},
                           "train": {"micro_batch_size": 1, "epochs": 1},
                           "deepspeed": {"zero_stage": 2 if mode == "zero2" else 3},
                           "scaling": {"num_workers": dist.get_world_size()}})
    config = deepspeed_config(spec, plan_batches(spec, 8))
    if mode == "zero3-transformers":
        partitioned.one_shard_at_a_time = lambda quantized=False: contextlib.nullcontext()
    keep = partitioned.zero3_loading(config) if mode in ("zero3", "zero3-transformers") else None
    # code, not data: the modules loading imports (a training worker has them imported by then as well)
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from deepspeed.runtime.zero import partition_parameters  # noqa: F401
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status()["VmRSS"]
    started = time.perf_counter()
    model = build_peft_model(spec, None)
    loaded = status()
    seconds = time.perf_counter() - started
    is_partitioned = partitioned.is_partitioned(model)
    skip_shared_memory_allreduce()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config, dist_init_required=False)
    ready = status()
    local = sum(getattr(p, "ds_tensor", p).numel() for p in engine.module.parameters())
    print(json.dumps({"rank": dist.get_rank(), "mode": mode, "load_peak": loaded["VmHWM"] - before,
                      "ready_peak": ready["VmHWM"] - before, "ready_rss": ready["VmRSS"] - before,
                      "partitioned_after_load": is_partitioned, "local_params": local,
                      "total_params": parameter_counts(engine.module)[1], "alive": keep is not None,
                      "load_seconds": seconds}), flush=True)


def run(folder: Path, mode: str, world: int = 2) -> list[dict]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # large frees go back to the OS, as a long-lived worker's would
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(folder), mode],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(world)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"{mode}: worker failed:\n{err[-4000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--shard", default="200MB")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir(), "bench-zero3-load")))
    args = parser.parse_args()
    folder = Path(args.cache, f"llama-{args.layers}x{args.hidden}-{args.shard}")
    size = write_model(folder, args.layers, args.hidden, args.shard)
    shards = sorted(folder.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    print(f"model: {size / MB:.0f} MB fp32 in {len(shards)} shards (largest {largest / MB:.0f} MB), 2 workers")
    print(f"{'mode':20s} {'rank':>4s} {'load peak MB':>12s} {'x model':>7s} {'+init peak MB':>13s} {'x model':>7s} "
          f"{'partitioned':>11s} {'load s':>6s}")
    for mode in args.modes.split(","):
        for r in run(folder, mode):
            print(f"{mode:20s} {r['rank']:4d} {r['load_peak'] / MB:12.0f} {r['load_peak'] / size:7.2f} "
                  f"{r['ready_peak'] / MB:13.0f} {r['ready_peak'] / size:7.2f} {str(r['partitioned_after_load']):>11s} "
                  f"{r['load_seconds']:6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
