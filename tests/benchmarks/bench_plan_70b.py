"""The planner's table for Llama-3-70B over 2 nodes x 8 x 80 GB GPUs (issue 20, point 4), from a config alone.

    .venv/bin/python tests/benchmarks/bench_plan_70b.py [--host-memory 1TB] [--device-memory 80GB]

Writes Llama-3-70B's config.json (hidden 8192, MLP 28672, 80 layers, 64 query / 8 key-value heads, untied
128,256-word vocabulary, rope_theta 500000; no weights) and a job (LoRA r 16 on q/k/v/o, 16 GPU workers, bf16,
micro-batch 1 x 2,048 tokens, gradient checkpointing, ZeRO-3) into a temporary folder, then prints
``orchestrator plan JOB --device-memory 80GB --host-memory 1TB`` and a compact Markdown table: device GiB per GPU
and host GiB per node (8 workers), with partitioned loading at ZeRO-3 and with every worker loading the whole base
(the loop before partitioned and device-map loading). About 30 s on 2 CPU cores (the meta model is built twice).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
          "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
          "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0}


def job(folder: Path) -> dict:
    return {"version": 1, "name": "llama3-70b-lora", "output_dir": str(folder / "out"),
            "model": {"path": str(folder), "task": "causal_lm"},
            "data": {"train": str(folder / "train.jsonl"), "validation_split": 0.1, "max_length": 2048},
            "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "train": {"epochs": 1, "micro_batch_size": 1, "precision": "bf16", "gradient_checkpointing": True},
            "scaling": {"num_workers": 16, "use_gpu": True}, "deepspeed": {"zero_stage": 3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-memory", default="80GB")
    parser.add_argument("--host-memory", default="1TB")
    args = parser.parse_args()

    from orchestrator.cli import main as orchestrator
    from orchestrator.plan.fitting import Budget, fit_job
    from orchestrator.plan.host_memory import workers_per_node
    from orchestrator.plan.memory import GiB, parse_memory, settings_for
    from orchestrator.spec import spec_from_dict
    from orchestrator.train.shape import model_shape

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        path = folder / "job.yaml"
        path.write_text(yaml.safe_dump(job(folder)))
        orchestrator(["plan", str(path), "--device-memory", args.device_memory, "--host-memory", args.host_memory])
        spec = spec_from_dict(job(folder))
        shape = model_shape(spec, None)
        per_node = workers_per_node(spec, [])
        budget = Budget(parse_memory(args.device_memory), parse_memory(args.host_memory), per_node)
        print("\n| method | ZeRO | device GiB / GPU | host GiB / node | host GiB / node, the whole base on every "
              f"worker | fits {args.device_memory} GPUs, {args.host_memory} nodes |")
        print("|---|---|---|---|---|---|")
        for setting in settings_for(spec):
            found = fit_job(spec, shape, setting, per_node)
            whole = fit_job(spec, shape, setting, per_node, partitioned=False, device_map=False)
            fits = ("yes" if found.fits(budget) else "no (host)" if found.device_fits(budget) else "no") + \
                   ("" if whole.fits(budget) == found.fits(budget) else " (no if loaded whole)")
            print(f"| {setting.method} | {setting.zero_stage} | {found.device.total / GiB:.1f} | "
                  f"{found.host.per_node / GiB:.1f} ({found.host.path}) | {whole.host.per_node / GiB:.0f} | {fits} |")


if __name__ == "__main__":
    main()
