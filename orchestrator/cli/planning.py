"""``compare`` and ``plan``: how the fine-tuning methods compare on a job, measured (``compare``) or estimated
from the model's config alone (``plan``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli.arguments import job_arguments, output_arguments


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``compare`` and ``plan`` to the ``orchestrator`` command."""
    versus = commands.add_parser("compare", help="train several fine-tuning methods on the job and compare them, "
                                 "measured", description="One Ray Tune grid trial per method (same data, same steps, "
                                 "no early stopping): share of parameters trained, peak memory per worker, wall "
                                 "time and the task metric, also relative to full fine-tuning.")
    job_arguments(versus, "job YAML file", memory_check=True)
    output_arguments(versus)
    versus.add_argument("--methods", default="full,lora:r=8,lora:r=16,prefix,prompt,ia3",
                        help="comma-separated: full, lora, qlora, ia3, prompt, prefix, each with options after "
                             "colons: r, alpha, lr, tokens (e.g. lora:r=16:lr=1e-3)")
    versus.set_defaults(handler=_compare)
    sizing = commands.add_parser("plan", help="estimate memory per device and host memory per node for full, LoRA "
                                 "and QLoRA at each ZeRO stage, and recommend settings that fit",
                                 description="From the model's config alone (built on the meta device, no weights "
                                             "read): weights, gradients, optimizer states, ZeRO buckets, activations "
                                             "and runtime per device; host RAM per node while loading and training.")
    job_arguments(sizing, "job YAML file")
    sizing.add_argument("--device-memory", help="memory of one device, e.g. 80GiB (default on CPU jobs: this "
                        "machine's RAM / workers)")
    sizing.add_argument("--host-memory", help="RAM of one node, e.g. 1TB (default: scaling.host_memory_gb; on CPU "
                        "jobs, this machine's RAM)")
    sizing.set_defaults(handler=_plan)


def _compare(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.tracking.runs import run_url
    from orchestrator.workflows.comparison import compare

    spec = load_spec(args.job, args.overrides)
    result = compare(spec, args.methods, verbose=args.verbose, check_memory=not args.skip_memory_check)
    print(Path(result.files["markdown"]).read_text())
    print(f"files:   {result.files['markdown']} (CSV and PNG beside it)")
    print(f"mlflow:  {run_url(result.tracking_uri, result.parent_run_id)} (one child run per method)")
    return 0


def _plan(args) -> int:
    from orchestrator.plan.fitting import Budget, plan_table
    from orchestrator.plan.host_memory import workers_per_node
    from orchestrator.plan.memory import GiB, parse_memory
    from orchestrator.spec import SpecError, load_spec
    from orchestrator.train.shape import model_shape
    from orchestrator.train.tasks import load_data

    spec = load_spec(args.job, args.overrides)
    memory = parse_memory(args.device_memory) if args.device_memory else None
    host = parse_memory(args.host_memory, "--host-memory") if args.host_memory else None
    host = host or (spec.scaling.host_memory_gb * GiB if spec.scaling.host_memory_gb else None)
    source = "given"
    if not spec.scaling.use_gpu and (memory is None or host is None):
        import os

        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if memory is None:
            memory = ram / spec.scaling.num_workers
            source = f"this machine's RAM / {spec.scaling.num_workers} workers"
        host = host or ram
    labels = None
    if spec.model.task == "sequence_classification":
        try:
            labels = len(load_data(spec).label_names)
        except SpecError as error:  # data not on this machine: the head's size hardly matters
            print(f"note: data not read ({str(error)[:120]}); assuming 2 labels")
            labels = 2
    shape = model_shape(spec, labels)
    print(f"{args.job}: device memory {f'{memory / GiB:.1f} GiB ({source})' if memory else 'not given'}, host "
          f"memory {f'{host / GiB:.1f} GiB per node' if host else 'not given'}")
    print("\n".join(plan_table(spec, shape, Budget(memory, host, workers_per_node(spec, [])))))
    return 0
