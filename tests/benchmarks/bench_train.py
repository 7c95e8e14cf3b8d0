"""Training benchmarks for the core path (results go in tests/benchmarks/BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_train.py [--repeats 3] [--steps 120]

Measures, on MiniLM-L6 and the bundled support-intent data, side by side in one run:
  1. steady-state samples/s of `orchestrator train` with 1 worker against a bare single-process PEFT + torch
     loop (same model, data, micro-batch, sequence length, threads, steps);
  2. `orchestrator train` with 2 workers against 1 worker;
  3. seconds from command start to the end of the first training step;
  4. peak memory of one training process, LoRA against full fine-tuning (bare loop, fresh process each).
Runs alternate (bare, 1 worker, 2 workers, ...) so machine noise hits all of them alike; medians are quoted.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "quickstart.yaml"
MICRO_BATCH, MAX_LENGTH, LOG_EVERY = 16, 32, 5


def bare_loop(steps: int, threads: int, full: bool) -> dict:
    """The baseline: PEFT + torch AdamW in one process, no Ray, no DeepSpeed, no MLflow."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from orchestrator.spec import load_spec
    from orchestrator.train.data import load_task_data
    from orchestrator.train.modeling import resolve_model_path

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = load_spec(JOB)
    data = load_task_data(spec.data)
    folder = resolve_model_path(spec.model.path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(data.label_names))
    if not full:
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                                 lora_dropout=spec.lora.dropout,
                                                 target_modules=spec.lora.target_modules))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.train.learning_rate)
    model.train()
    texts, labels = data.train.texts, data.train.labels
    rates, window_start, window_examples = [], time.perf_counter(), 0
    for step in range(steps):
        start = (step * MICRO_BATCH) % (len(texts) - MICRO_BATCH)
        batch = tokenizer(texts[start:start + MICRO_BATCH], truncation=True, max_length=MAX_LENGTH, padding=True,
                          return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels[start:start + MICRO_BATCH])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        window_examples += MICRO_BATCH
        if (step + 1) % LOG_EVERY == 0:
            now = time.perf_counter()
            rates.append(window_examples / (now - window_start))
            window_start, window_examples = now, 0
    return {"samples_per_s": rates, "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_bare(steps: int, threads: int, full: bool = False) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from tests.benchmarks.bench_train import bare_loop;"
            f" print(json.dumps(bare_loop({steps}, {threads}, {full})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_orchestrator(steps: int, workers: int, cpus_per_worker: int, root: Path, tag: str) -> dict:
    from mlflow import MlflowClient

    output = root / tag
    overrides = [f"output_dir={output}", f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus_per_worker}",
                 "train.epochs=null", f"train.max_steps={steps}", f"train.log_every_steps={LOG_EVERY}",
                 f"train.eval_every_steps={steps}", "data.test=null", f"tracking.run_name={tag}"]
    started = time.time()
    subprocess.run([sys.executable, "-m", "orchestrator", "train", str(JOB), *overrides], check=True,
                   capture_output=True, cwd=REPO)
    wall = time.time() - started
    state = json.loads((output / "mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    rates = [m.value for m in sorted(client.get_metric_history(state["run_id"], "samples_per_s"), key=lambda m: m.step)]
    first = min(m.timestamp for m in client.get_metric_history(state["run_id"], "train_loss")) / 1000
    memory = max(m.value for m in client.get_metric_history(state["run_id"], "peak_memory_mb"))
    # The first logged window ends LOG_EVERY steps in; subtract its share to get to the end of step 1.
    first_step = first - started - (LOG_EVERY - 1) * MICRO_BATCH * workers / rates[0]
    return {"samples_per_s": rates, "wall_s": wall, "first_step_s": first_step, "peak_memory_mb": memory}


def steady(rates: list[float]) -> float:
    """Median samples/s over the second half of the logged windows: a fresh Ray worker warms up for its first
    ~40 steps on this machine (measured: 64 -> 85 samples/s), which is start-up, not steady state."""
    return statistics.median(rates[len(rates) // 2:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    # bare_N / one_N: N torch threads (one worker with N CPUs); two: two workers with one CPU each.
    results: dict[str, list[dict]] = {"bare_1": [], "one_1": [], "bare_2": [], "one_2": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for threads in (1, 2):
                results[f"bare_{threads}"].append(run_bare(args.steps, threads))
                results[f"one_{threads}"].append(
                    run_orchestrator(args.steps, 1, threads, Path(tmp), f"one{threads}-{repeat}"))
            results["two"].append(run_orchestrator(args.steps, 2, 1, Path(tmp), f"two-{repeat}"))
            print(f"repeat {repeat}: " + ", ".join(f"{k} {steady(v[-1]['samples_per_s']):.1f}/s"
                                                  for k, v in results.items()), flush=True)
        memory = {name: run_bare(20, 2, full=name == "full")["peak_memory_mb"] for name in ("lora", "full")}
    med = {k: statistics.median(steady(r["samples_per_s"]) for r in v) for k, v in results.items()}
    print(json.dumps({
        "steady_samples_per_s": {k: round(v, 1) for k, v in med.items()},
        "one_worker_vs_bare_1_thread": round(med["one_1"] / med["bare_1"], 3),
        "one_worker_vs_bare_2_threads": round(med["one_2"] / med["bare_2"], 3),
        "two_workers_vs_one_worker_2_cpus": round(med["two"] / med["one_2"], 3),
        "per_run_ratios_one_vs_bare": {t: [round(steady(o["samples_per_s"]) / steady(b["samples_per_s"]), 3) for o, b in
                                           zip(results[f"one_{t}"], results[f"bare_{t}"])] for t in (1, 2)},
        "first_step_s": {k: round(statistics.median(r["first_step_s"] for r in v), 1) for k, v in results.items()
                         if not k.startswith("bare")},
        "wall_s": {k: round(statistics.median(r["wall_s"] for r in v), 1) for k, v in results.items()
                   if not k.startswith("bare")},
        "peak_memory_mb_worker": {k: round(statistics.median(r["peak_memory_mb"] for r in v)) for k, v in
                                  results.items() if not k.startswith("bare")},
        "peak_memory_mb_bare": {k: round(v) for k, v in memory.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
