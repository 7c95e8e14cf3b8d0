"""The ``orchestrator`` command. Thin: parse arguments, call one function, print, pick the exit code.

Exit codes: 0 success, 1 training failed, 2 bad input (spec, data, model or cluster resources).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore")
    for name in ("ray", "mlflow", "alembic", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _validate(args) -> int:
    from orchestrator.preflight import preflight
    from orchestrator.spec import load_spec

    spec = load_spec(args.job, args.overrides)
    checked = preflight(spec)
    data, plan = checked.data, checked.plan
    print(f"{args.job}: valid (spec version {spec.version})")
    print(f"  data: {len(data.train.texts)} train / {len(data.validation.texts)} validation"
          f"{f' / {len(data.test.texts)} test' if data.test else ''} examples, {len(data.label_names)} labels")
    print(f"  model: {spec.model.path} ({checked.total_params:,} parameters, {checked.linear_modules} linear layers)")
    print(f"  plan: {spec.scaling.num_workers} workers x {plan.micro_batch_size} x {plan.gradient_accumulation_steps}"
          f" accumulation = global batch {plan.global_batch_size}; {plan.total_steps} steps "
          f"({plan.steps_per_epoch:g} per epoch), eval every {plan.eval_every_steps}")
    if spec.tune:
        from orchestrator.search import num_trials

        study = spec.tune
        count = f"{study.num_samples} samples" if study.search == "optuna" else f"{num_trials(spec)} trials"
        print(f"  tune: {count}, {study.search} search, {study.scheduler.name} scheduler on {study.metric} "
              f"({study.direction()}); space: " + ", ".join(f"{k} {d.kind} {list(d.args)}"
                                                          for k, d in study.space.items()))
    return 0


def _train(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.training import train

    spec = load_spec(args.job, args.overrides)
    result = train(spec, verbose=args.verbose)
    from orchestrator.tracking import run_url

    shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("eval_", "test_"))}
    print(f"adapter: {result.adapter_dir}")
    print(f"mlflow:  {run_url(result.tracking_uri, result.run_id)}")
    print("metrics: " + "  ".join(f"{k} {v}" for k, v in sorted(shown.items())))
    return 0


def _tune(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.tracking import run_url
    from orchestrator.tuning import tune

    spec = load_spec(args.job, args.overrides)
    result = tune(spec, resume=args.resume, verbose=args.verbose)
    best, metric = result.best, spec.tune.metric
    counts = {}
    for outcome in result.outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    print(f"trials:  {len(result.outcomes)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
          f"), {sum(o.steps for o in result.outcomes)} optimizer steps in all")
    print(f"best:    trial {best.trial_id} {metric} {best.history[-1][metric]:.4f} with " +
          ", ".join(f"{k}={v}" for k, v in sorted(best.config.items())))
    if result.advice:
        print(f"rank:    {result.advice.sentence(metric)}")
    if result.registered:
        name, version = result.registered
        print(f"registry: {name} version {version} -> alias '{spec.registry.challenger_alias}' "
              f"(models:/{name}@{spec.registry.challenger_alias})")
    print(f"adapter: {spec.output_dir}/trials/{best.trial_id}/adapter")
    print(f"summary: {result.files['markdown']}  (CSV, plots and summary.json beside it)")
    print(f"mlflow:  {run_url(result.tracking_uri, result.parent_run_id)}")
    return 0


def _schema(_args) -> int:
    from orchestrator.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Distributed LoRA fine-tuning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text in (("train", _train, "train a LoRA adapter on Ray Train + DeepSpeed"),
                                ("validate", _validate, "check a job file, its data and model; starts no Ray")):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("job", help="job YAML file")
        command.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
        command.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the libraries' logs")
        command.set_defaults(handler=handler)
    search = commands.add_parser("tune", help="search LoRA hyperparameters with Ray Tune (ASHA early stopping)",
                                 description="Run the job's tune section: one Ray Train job per trial.")
    search.add_argument("job", help="job YAML file with a tune section")
    search.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
    search.add_argument("--resume", action="store_true", help="continue a study whose driver stopped")
    search.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the libraries' logs")
    search.set_defaults(handler=_tune)
    schema = commands.add_parser("schema", help="print the JSON Schema of job files")
    schema.set_defaults(handler=_schema, verbose=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet(args.verbose)
    from orchestrator.launcher import TrainingFailed
    from orchestrator.spec import SpecError
    from orchestrator.tuning import StudyFailed

    try:
        return args.handler(args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingFailed as error:
        print(f"error: training failed: {error}\n  (rerun with -v for the workers' logs; rerunning the same job "
              "resumes from its last checkpoint)", file=sys.stderr)
        return EXIT_FAILED
    except StudyFailed as error:
        print(f"error: search failed: {error}\n  (rerun with -v for the workers' logs)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; rerun the same job to resume from its last checkpoint (a search: orchestrator tune JOB "
              "--resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
