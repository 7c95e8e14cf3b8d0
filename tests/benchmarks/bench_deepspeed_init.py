"""What each CPU worker paid at start-up for the DeepSpeed ops it never needed (results in BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_deepspeed_init.py [--rounds 5]

Times ``deepspeed.initialize`` on the tiny test model in fresh processes, alternating two configurations:
"before" (``torch_adam`` beside the optimizer's params, where DeepSpeed ignores it, and the shared-memory
all-reduce op built at init: what every CPU worker did until issue 8's fix) and "now". Both use the ops already
built in ~/.cache/torch_extensions ("before" builds them on its first round; that round is not counted), so this
is the steady per-start cost, not the first-use compile (about a minute on a fresh machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ONE_START = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed, torch
from orchestrator.train.modeling import build_peft_model, skip_shared_memory_allreduce
from orchestrator.plan.batches import deepspeed_config, plan_batches
from orchestrator.train.session import LocalContext
from orchestrator.spec import spec_from_dict
from tests.tiny import tiny_job
from pathlib import Path
spec = spec_from_dict(tiny_job(Path({root!r}), Path({model!r}), Path({data!r}), scaling={{"num_workers": 1}}))
LocalContext({root!r} + "/ckpt")
model = build_peft_model(spec, ["a", "b", "c", "d"])
config = deepspeed_config(spec, plan_batches(spec, 192))
if {before}:
    config["optimizer"]["torch_adam"] = config["optimizer"]["params"].pop("torch_adam")
else:
    skip_shared_memory_allreduce()
started = time.perf_counter()
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config=config, dist_init_required=False)
print(json.dumps({{"seconds": time.perf_counter() - started, "optimizer": type(engine.basic_optimizer).__name__}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.tiny import write_tiny_data, write_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-ds-init-"))
    model, data = write_tiny_model(root / "model"), write_tiny_data(root / "data")
    times: dict[str, list[float]] = {"before": [], "now": []}
    optimizers: dict[str, str] = {}
    for round_ in range(args.rounds + 1):
        for name in ("before", "now"):
            code = ONE_START.format(repo=str(REPO), root=str(root), model=str(model), data=str(data),
                                    before=name == "before")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            optimizers[name] = result["optimizer"]
            if round_:  # round 0 warms the extension cache and the page cache
                times[name].append(result["seconds"])
    for name, values in times.items():
        print(f"{name:6s} {optimizers[name]:14s} deepspeed.initialize median {statistics.median(values):.2f} s "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"ratio now/before: {statistics.median(times['now']) / statistics.median(times['before']):.2f}")


if __name__ == "__main__":
    main()
