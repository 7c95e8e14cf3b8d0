"""Where the seconds before the first training step go (results in tests/benchmarks/BENCHMARKS.md).

    .venv/bin/python tests/benchmarks/bench_startup.py [--workers 2]
    ORCHESTRATOR_STOCK_RAY=1 .venv/bin/python tests/benchmarks/bench_startup.py   # without the shortcuts

Runs the quickstart job through the same phases as `orchestrator train`, timing each one in a fresh process:
imports, preflight, tracking probe, Ray start, placement check, MLflow run, then Ray Train until the first
step's progress event reaches the driver (logging every step for this measurement).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = time.perf_counter() - START - sum(marks.values())

    from orchestrator.runtime import launcher, shortcuts
    from orchestrator.spec import load_spec
    from orchestrator.tracking import runs as tracking
    from orchestrator.workflows.preflight import preflight
    from orchestrator.workflows.training import data_inputs

    mark("imports")
    output = tempfile.mkdtemp()
    spec = load_spec("jobs/quickstart.yaml", [f"output_dir={output}", f"scaling.num_workers={args.workers}",
                                              "train.epochs=null", "train.max_steps=3", "train.log_every_steps=1",
                                              "data.test=null"])
    checked = preflight(spec)
    mark("spec + preflight (data, meta-device model)")
    tracking.check_reachable(spec)
    launcher.connect()
    mark("start local Ray")
    launcher.check_placement(spec)
    mark("placement check")
    data = checked.data
    uri, run_id = tracking.start_run(spec, data_inputs(data))
    mark("create MLflow store + run")
    seen: dict[str, float] = {}

    def on_progress(event: dict) -> None:
        if event["event"] not in seen:
            seen[event["event"]] = time.perf_counter() - START

    fit_start = time.perf_counter() - START
    launcher.run_training(spec, uri, run_id, on_progress)
    fit_end = time.perf_counter() - START
    tracking.end_run(uri, run_id, "FINISHED")
    marks["Ray Train start-up (controller, placement group, workers, process group)"] = (
        seen["worker_started"] - fit_start)
    marks["worker setup (imports, data, model load, DeepSpeed engine)"] = seen["start"] - seen["worker_started"]
    marks["first training step"] = seen["step"] - seen["start"]
    after = {"total to first step": round(seen["step"], 1),
             "run's end: the workers' last event to fit() returning (shutdown)": round(fit_end - seen["done"], 1),
             "path": "shortcuts" if shortcuts.enabled() else "stock Ray (ORCHESTRATOR_STOCK_RAY=1)"}
    print(json.dumps({k: round(v, 1) for k, v in marks.items()} | after, indent=1))


if __name__ == "__main__":
    main()
