"""GPU throughput benchmark: LoRA on a ~1.1B Llama-style model through the project's own training loop.

    python3 tests/benchmarks/bench_gpu_lora.py [--micro-batch 8] [--seq 2048] [--warmup-steps 4] [--steps 16]
        [--packing-attention isolated|shared] [--out bench_gpu_lora.json]
    .venv/bin/python tests/benchmarks/bench_gpu_lora.py --smoke     # the same code path on CPU, tiny

Part of ``make gpu-check`` (tests/gpu_check.sh; results in tests/benchmarks/BENCHMARKS.md, "GPU check (H200)").
Everything is built in-process and written to a temporary folder, nothing is downloaded: a Llama config (hidden
2048, 16 layers, 32 query / 8 key-value heads, SwiGLU 8192, untied 32,000-word vocabulary: 1.10B parameters)
with random weights saved as bf16 safetensors, a word-level tokenizer over the same vocabulary, and synthetic
text (random words, 40 to 400 per example). The job: LoRA r 16 (alpha 32, dropout 0, as torchtune's
llama3_2/1B_lora) on all linear layers, packed 2,048-token rows (data.packing, isolated attention by default),
bf16, ZeRO-2, micro-batch 8, world size 1 over NCCL: ``train_worker(spec, LocalContext(..., backend="nccl"))``.

Reported: tokens/s over the timed steps (the loop's own per-step ``tokens_per_s`` windows with
``log_every_steps: 1``; the first ``--warmup-steps`` are left out), MFU, and the loop's peak memory against the
planner's estimate (:func:`orchestrator.plan.memory.estimate_job` on :func:`orchestrator.train.shape.model_shape`,
as ``orchestrator plan`` computes it).

MFU = tokens/s x FLOPs per token / 790e12 (the bf16 matrix rate measured on this workplace's H200s,
/work/.library/device/KINDS.md; the datasheet's dense figure is ~990e12). FLOPs per token are counted as
BENCHMARKS.md's "Causal LM: LoRA vs full fine-tuning" section found them to be for LoRA (its counted FLOPs matched
it): the frozen base's matmuls cost the forward and the gradient of their inputs, 2 x 2 x N_mm (N_mm: the
blocks' linear weights plus lm_head; no weight gradients), the adapters the full 6 x N_lora, plus the attention
score and value products, 12 x s x h x L (forward and backward, the whole s x s square, as counted by hand there
and as PaLM's MFU counts them; s the packed row length).

``--smoke``: a 2-layer hidden-64 Llama, 128-token rows, fp32, gloo on CPU, 1 + 2 steps: a dry run of the logic,
not a measurement (its "MFU" is against the H200's rate).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

H200_BF16_FLOPS = 790e12  # measured bf16 matmul rate (KINDS.md, 8192^3 products on random data)
MFU_TARGET = 0.40
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
FULL = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 8192, "vocab_size": 32000}
SMOKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "vocab_size": 512}


def write_model(folder: Path, sizes: dict, seq: int, on_gpu: bool) -> int:
    """A random Llama-style model (bf16 on GPU, fp32 on CPU) and a word-level tokenizer, saved as an HF folder
    (safetensors); returns the parameter count. Built on the GPU when there is one (seconds, not a minute of
    CPU init), then freed so the run's memory is its own."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS + words(sizes["vocab_size"]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(**sizes, max_position_embeddings=max(seq, 2048), tie_word_embeddings=False,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"])
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.manual_seed(0)
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the loop's peak_memory_mb is the allocator's peak since here
    return count


def words(vocab_size: int) -> list[str]:
    return [f"w{i}" for i in range(vocab_size - len(SPECIALS))]


def write_data(folder: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """Synthetic text: examples of 40 to 400 random words (one token each), about ``tokens`` in all, and a small
    validation file. Packed greedily into rows of --seq tokens, rows come out ~95% full."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, vocab = random.Random(seed), words(vocab_size)
    for name, budget in (("train", tokens), ("validation", 4 * 200)):
        written = 0
        with open(folder / f"{name}.jsonl", "w") as handle:
            while written < budget:
                length = rng.randint(40, 400) if name == "train" else 200
                handle.write(json.dumps({"text": " ".join(rng.choices(vocab, k=length))}) + "\n")
                written += length
    return folder


def job(root: Path, model_dir: Path, data_dir: Path, args, on_gpu: bool) -> dict:
    total = args.warmup_steps + args.steps
    return {
        "version": 1, "name": "bench-gpu-lora", "output_dir": str(root / "out"),
        "model": {"path": str(model_dir), "task": "causal_lm", "dtype": "bfloat16" if on_gpu else "float32"},
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "format": "text", "packing": True, "packing_attention": args.packing_attention,
                 "max_length": args.seq},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": total, "micro_batch_size": args.micro_batch, "learning_rate": 2e-4, "seed": 0,
                  "precision": "bf16" if on_gpu else "fp32", "log_every_steps": 1, "eval_every_steps": total,
                  "checkpoint_every_steps": total},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1, "use_gpu": on_gpu,
                    "cpus_per_worker": 1 if on_gpu else max(1, os.cpu_count() or 1)},  # torch threads on CPU
        "generation": {"num_prompts": 0},  # no sample completions: they are not training throughput
    }


def flops_per_token(shape, seq: int) -> dict[str, float]:
    """LoRA's FLOPs per trained token (the module docstring's count, after BENCHMARKS.md)."""
    matmul_weights = shape.block_linear_params + shape.vocab * shape.hidden  # + lm_head (untied)
    parts = {"frozen_matmuls": 4 * matmul_weights, "adapters": 6 * shape.lora_trainable,
             "attention": 12 * seq * shape.hidden * shape.layers}
    return {**parts, "total": sum(parts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (gloo, fp32): a dry run of the logic")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--steps", type=int, help="timed steps, after the warm-up")
    parser.add_argument("--packing-attention", choices=["isolated", "shared"], default="isolated")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    defaults = (2, 128, 1, 2) if args.smoke else (8, 2048, 4, 16)
    for name, value in zip(("micro_batch", "seq", "warmup_steps", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)

    import torch

    on_gpu = not args.smoke
    if on_gpu and not torch.cuda.is_available():
        print("skipped: no CUDA GPU (run with --smoke for the CPU dry run)")
        return
    os.environ["DS_ACCELERATOR"] = "cuda" if on_gpu else "cpu"  # before deepspeed is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from orchestrator.plan.memory import GiB, breakdown, estimate_job, job_setting
    from orchestrator.spec import spec_from_dict
    from orchestrator.train.loop import train_worker
    from orchestrator.train.session import LocalContext
    from orchestrator.train.shape import model_shape

    sizes = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="bench-gpu-lora-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        params = write_model(root / "model", sizes, args.seq, on_gpu)
        rows_needed = (args.warmup_steps + args.steps) * args.micro_batch
        data_dir = write_data(root / "data", sizes["vocab_size"], int(rows_needed * args.seq * 1.15))
        spec = spec_from_dict(job(root, root / "model", data_dir, args, on_gpu))
        shape = model_shape(spec, None)
        flops = flops_per_token(shape, args.seq)
        predicted = estimate_job(spec, shape, job_setting(spec), gpu=on_gpu)
        where = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
        print(f"model: Llama-style {params / 1e6:,.1f}M parameters ({params:,}; hidden {sizes['hidden_size']}, "
              f"{sizes['num_hidden_layers']} layers, {sizes['num_attention_heads']}/{sizes['num_key_value_heads']} "
              f"heads, MLP {sizes['intermediate_size']}, vocab {sizes['vocab_size']}); LoRA r16 all-linear trains "
              f"{shape.lora_trainable:,}")
        print(f"job:   micro-batch {args.micro_batch} x {args.seq} packed ({args.packing_attention}), "
              f"{spec.train.precision}, ZeRO-{spec.deepspeed.zero_stage}, {args.warmup_steps} warm-up + {args.steps} "
              f"timed steps, on {where}; built in {time.perf_counter() - started:.1f} s", flush=True)

        steps: list[dict] = []
        ctx = LocalContext(str(root / "ckpt"), on_progress=lambda e: steps.append(e) if e["event"] == "step" else None,
                           backend="nccl" if on_gpu else "gloo")
        started = time.perf_counter()
        final = train_worker(spec, ctx, None, None)
        run_seconds = time.perf_counter() - started

    # log_every_steps 1: each step event is one step's window (tokens_per_s over its own seconds)
    windows = [(e["tokens_per_s"], e["train_seconds"] - (steps[i - 1]["train_seconds"] if i else 0.0))
               for i, e in enumerate(steps)]
    timed = windows[args.warmup_steps:]
    tokens = sum(rate * seconds for rate, seconds in timed)
    seconds = sum(seconds for _, seconds in timed)
    tokens_per_s = tokens / seconds
    mfu = tokens_per_s * flops["total"] / H200_BF16_FLOPS
    measured_mb = final["train_memory_mb"]
    predicted_mb = predicted.training / 2**20
    result = {
        "smoke": args.smoke, "device": where, "params": params, "lora_trainable": shape.lora_trainable,
        "micro_batch": args.micro_batch, "seq": args.seq, "packing_attention": args.packing_attention,
        "precision": spec.train.precision, "zero_stage": spec.deepspeed.zero_stage,
        "warmup_steps": args.warmup_steps, "timed_steps": len(timed),
        "step_seconds": [round(s, 4) for _, s in windows], "median_step_s": statistics.median(s for _, s in timed),
        "tokens_per_s": tokens_per_s, "flops_per_token": flops, "mfu": mfu, "mfu_peak_flops": H200_BF16_FLOPS,
        "peak_memory_mb": final["peak_memory_mb"], "train_memory_mb": measured_mb,
        "max_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if on_gpu else None,
        "predicted_training_mb": predicted_mb, "predicted_total_mb": predicted.total / 2**20,
        "predicted_breakdown_gib": breakdown(predicted), "final_train_loss": final.get("train_loss"),
        "run_seconds": run_seconds,
        "versions": {name: _version(name) for name in ("torch", "transformers", "peft", "deepspeed")},
    }
    label = "CPU DRY RUN (--smoke; not a measurement)" if args.smoke else "measured"
    print(f"\n== bench_gpu_lora: {label}")
    print(f"tokens/s:  {tokens_per_s:,.0f} over {len(timed)} timed steps (median step {result['median_step_s']:.3f} s; "
          f"warm-up steps {args.warmup_steps} left out)")
    print(f"FLOPs/token: {flops['total'] / 1e9:.4g} G (frozen matmuls {flops['frozen_matmuls'] / 1e9:.4g}, adapters "
          f"{flops['adapters'] / 1e9:.4g}, attention {flops['attention'] / 1e9:.4g})")
    verdict = "" if args.smoke else f"  target {MFU_TARGET:.0%}: {'met' if mfu >= MFU_TARGET else 'NOT met'}"
    print(f"MFU:       {100 * mfu:.3g}% of {H200_BF16_FLOPS / 1e12:.0f} TFLOP/s (H200 bf16){verdict}")
    print(f"memory:    train {measured_mb:,.0f} MiB measured vs {predicted_mb:,.0f} MiB planned "
          f"(ratio {predicted_mb / measured_mb:.2f}); peak {final['peak_memory_mb']:,.0f} MiB"
          + (f", reserved {result['max_memory_reserved_mb']:,.0f} MiB" if on_gpu else " (RSS)")
          + f"; plan total {predicted.total / GiB:.2f} GiB ({breakdown(predicted)})")
    print(f"loss:      {final.get('train_loss', float('nan')):.4f} at the last step; whole run {run_seconds:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
