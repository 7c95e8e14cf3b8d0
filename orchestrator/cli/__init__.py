"""The ``orchestrator`` command. Thin: parse arguments, call one function, print, pick the exit code.

Exit codes: 0 success, 1 training failed, 2 bad input (spec, data, model, cluster resources, registry
references, unreachable services), 3 retrain kept the champion (the challenger did not pass the gate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_KEPT, EXIT_UNRECORDED = 1, 2, 3, 4


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore")
    for name in ("ray", "mlflow", "alembic", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _validate(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.workflows.preflight import preflight

    spec = load_spec(args.job, args.overrides)
    notes = []
    if spec.retrain:
        from orchestrator.plan.promotion import snapshot_job
        from orchestrator.tracking.runs import tracking_uri
        from orchestrator.train.data import resolve_snapshot

        snapshot = resolve_snapshot(spec.retrain.data)
        rule = spec.retrain
        notes.append(f"  retrain: snapshot {snapshot.name} (sha256 {snapshot.digest[:12]}), gate on {rule.metric} "
                     f"(margin {rule.margin:g}), challenger by {rule.challenger}, model "
                     f"{spec.registered_model_name()}@{spec.registry.champion_alias}")
        spec = snapshot_job(spec, snapshot, tracking_uri(spec))
    checked = preflight(spec)
    data, plan = checked.data, checked.plan
    print(f"{args.job}: valid (spec version {spec.version})")
    kind = f"{len(data.label_names)} labels" if data.label_names else f"format {data.format}, loss on " \
        f"{spec.data.train_on} tokens" + (f", packed into {checked.train_rows} rows" if spec.data.packing else "")
    print(f"  data: {len(data.train)} train / {len(data.validation)} validation"
          f"{f' / {len(data.test)} test' if data.test else ''} examples, {kind}")
    for split, count in checked.dropped.items():
        print(f"  warning: {count} {split} examples keep no trained token at data.max_length "
              f"{spec.data.max_length} and are skipped")
    print(f"  model: {spec.model.path} ({checked.total_params:,} parameters, {checked.linear_modules} linear layers)")
    print(f"  plan: {spec.scaling.num_workers} workers x {plan.micro_batch_size} x {plan.gradient_accumulation_steps}"
          f" accumulation = global batch {plan.global_batch_size}; {plan.total_steps} steps "
          f"({plan.steps_per_epoch:g} per epoch), eval every {plan.eval_every_steps}")
    from orchestrator.plan.memory import GiB, estimate_job, job_setting

    need = estimate_job(spec, checked.shape, job_setting(spec))
    print(f"  memory: about {need.total / GiB:.2f} GiB per worker ({spec.method.name}; "
          f"orchestrator plan shows every method and ZeRO stage)")
    if checked.example:
        print("  first training example, trained tokens in [[ ]]:")
        print("    " + checked.example.replace("\n", "\n    "))
    for note in notes:
        print(note)
    if spec.tune:
        from orchestrator.spec.space import num_trials

        study = spec.tune
        count = f"{study.num_samples} samples" if study.search == "optuna" else f"{num_trials(spec)} trials"
        print(f"  tune: {count}, {study.search} search, {study.scheduler.name} scheduler on {study.metric} "
              f"({study.direction()}); space: " + ", ".join(f"{k} {d.kind} {list(d.args)}"
                                                          for k, d in study.space.items()))
    return 0


def _train(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.workflows.training import train

    spec = load_spec(args.job, args.overrides)
    result = train(spec, verbose=args.verbose, check_memory=not args.skip_memory_check)
    from orchestrator.tracking.runs import run_url

    shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("eval_", "test_"))}
    print(f"adapter: {result.adapter_dir}")
    print(f"mlflow:  {run_url(result.tracking_uri, result.run_id)}")
    print("metrics: " + "  ".join(f"{k} {v}" for k, v in sorted(shown.items())))
    return 0


def _tune(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.tracking.runs import run_url
    from orchestrator.workflows.tuning import tune

    spec = load_spec(args.job, args.overrides)
    result = tune(spec, resume=args.resume, verbose=args.verbose, check_memory=not args.skip_memory_check)
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


def _retrain(args) -> int:
    from orchestrator.spec import load_spec
    from orchestrator.workflows.retraining import retrain

    spec = load_spec(args.job, args.overrides)
    result = retrain(spec, verbose=args.verbose)
    values = f"challenger {result.challenger_value:.4f}" if result.challenger_value is not None else ""
    if result.champion_value is not None:
        values += f", champion {result.champion_value:.4f}"
    earlier = " (decided by an earlier retrain of this snapshot; nothing new registered)" if result.reused else ""
    if result.run_id:
        from orchestrator.tracking.runs import run_url, tracking_uri

        print(f"mlflow:  {run_url(tracking_uri(spec), result.run_id)}")
    verdict = (f"promoted {result.model} version {result.version} to @{spec.registry.champion_alias}"
               if result.decision.promote else
               f"kept @{spec.registry.champion_alias} at " + (f"version {result.champion}" if result.champion else
                                                              "no version (no champion yet)") +
               f"; challenger is version {result.version}")
    print(f"decision: {verdict} on snapshot {result.snapshot.name} (sha256 {result.snapshot.digest[:12]}): "
          f"{result.decision.reason}{earlier}" + (f" [{values}]" if values and not result.reused else ""))
    return 0 if result.decision.promote else EXIT_KEPT


def _submit(args) -> int:
    from orchestrator.runtime.submit import submit

    return submit(args.job, args.overrides, args.address, args.command_name, wait=not args.no_wait)


def _registry(args) -> int:
    from orchestrator.tracking import registry

    client = registry.connect(registry.registry_uri(args.tracking_uri))
    action = args.action
    if action == "ls":
        rows = registry.list_versions(client, args.name)
        if not rows:
            print("no registered models" if not args.name else f"{args.name} has no versions")
            return 0
        header = ("model", "version", "aliases", "base_model", "metric", "created", "source")
        table = [header] + [(r["model"], r["version"], ",".join("@" + a for a in r["aliases"]), r["base_model"],
                             r["metric"], r["created"], r["source"]) for r in rows]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    elif action == "show":
        info = registry.show(client, registry.parse_ref(args.ref))
        if args.json:
            print(json.dumps(info, indent=2, default=str))
            return 0
        print(f"{info['name']} version {info['version']}  aliases: "
              f"{', '.join('@' + a for a in info['aliases']) or 'none'}  created {info['created']}")
        for section in ("lineage", "metrics", "params", "tags"):
            items = {k: v for k, v in info[section].items() if v not in (None, "", {})}
            print(f"{section}:" + ("" if items else " none"))
            for key, value in items.items():
                print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    elif action == "pull":
        folder, version = registry.pull(client, registry.parse_ref(args.ref), args.to)
        print(f"pulled {args.ref} (version {version}) to {folder}")
    elif action == "promote":
        previous = registry.promote(client, args.name, str(args.version), args.alias, args.reason,
                                    allow_unevaluated=args.allow_unevaluated)
        print(f"{args.name}@{args.alias}: version {previous or 'none'} -> {args.version} ({args.reason})")
    elif action == "rollback":
        before, after = registry.rollback(client, args.name, args.alias, args.reason)
        print(f"{args.name}@{args.alias}: version {before} -> {after} (rolled back: {args.reason})")
    return 0


def _generate(args) -> int:
    from orchestrator.serve.inference import complete, load_causal_adapter

    loaded = load_causal_adapter(args.adapter, args.base, args.tracking_uri)
    for prompt in args.prompts:
        print(complete(loaded, prompt, args.max_new_tokens, raw=args.raw).strip())
    return 0


def _eval(args) -> int:
    from orchestrator.serve.evaluation import evaluate_file
    from orchestrator.serve.inference import load_adapter

    result = evaluate_file(load_adapter(args.adapter, args.base, args.tracking_uri), args.data, args.out,
                           args.batch_size)
    shown = ("accuracy", "macro_f1", "loss") if "accuracy" in result else ("loss", "perplexity")
    print(f"{args.data}: {result['examples']} examples  " + "  ".join(f"{k} {result[k]:.4f}" for k in shown))
    for row in result.get("per_class", []):
        print(f"  {row['label'][:40]:<40} precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"f1 {row['f1']:.3f}  support {row['support']}")
    if args.out:
        print(f"wrote {args.out}/metrics.json" + (" and confusion_matrix.png" if "accuracy" in result else ""))
    if args.log_to_mlflow:
        from orchestrator.tracking import registry
        from orchestrator.tracking.runs import log_evaluation_run, run_url

        uri = registry.registry_uri(args.tracking_uri)
        version = None
        if registry.is_registry_ref(args.adapter):
            ref = registry.parse_ref(args.adapter)
            version = (ref.name, str(registry.get_version(registry.connect(uri), ref).version))
        scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        run_id = log_evaluation_run(uri, args.experiment, args.adapter, args.data, scalars, args.out, version)
        linked = f" (linked to {version[0]} version {version[1]})" if version else ""
        print(f"mlflow:  {run_url(uri, run_id)}{linked}")
    return 0


def _predict(args) -> int:
    from orchestrator.serve.inference import add_adapters, load_adapter, predict_rows, read_rows, write_jsonl
    from orchestrator.spec import SpecError

    if bool(args.data) == bool(args.text):
        raise SpecError("predict: give --data FILE --out FILE, or --text 'one line'")
    if args.data and not args.out:
        raise SpecError("--out: required with --data (a .jsonl file to write)")
    named = dict(item.partition("=")[::2] for item in args.also or [])
    if any(not name or not ref for name, ref in named.items()):
        raise SpecError("--also: write NAME=ADAPTER (a folder or models:/...), e.g. --also support=./out/adapter")
    loaded = load_adapter(args.adapter, args.base, args.tracking_uri)
    add_adapters(loaded, named, args.tracking_uri)
    if args.text:
        row = {"text": args.text, "prompt": args.text}
        result = predict_rows(loaded, [row], max_new_tokens=args.max_new_tokens)[0]
        print(result.get("completion") or f"{result['label']}  {result['score']:.4f}")
        return 0
    rows = read_rows(args.data)
    write_jsonl(predict_rows(loaded, rows, args.batch_size, args.max_new_tokens), args.out)
    print(f"wrote {len(rows)} predictions to {args.out}")
    return 0


def _export(args) -> int:
    from orchestrator.serve.inference import export_peft, load_adapter, merge_adapter

    if args.format == "peft":
        folder = export_peft(args.adapter, args.out, args.tracking_uri)
        print(f"exported: {folder} (PEFT adapter: serve it beside its base, e.g. vllm serve BASE --enable-lora "
              f"--lora-modules NAME={folder})")
        return 0
    report = merge_adapter(load_adapter(args.adapter, args.base, args.tracking_uri), args.out, args.max_shard_size)
    print(f"exported: {report.folder} (merged {report.dtype} model: serve it as any model, e.g. vllm serve "
          f"{report.folder}; max |merged - unmerged| logit {report.max_abs_diff:.3g})")
    return 0


def _merge(args) -> int:
    from orchestrator.serve.inference import load_adapter, merge_adapter

    report = merge_adapter(load_adapter(args.adapter, args.base, args.tracking_uri), args.out, args.max_shard_size)
    print(f"merged: {report.folder} (standalone {report.dtype} model; loads with from_pretrained, no PEFT)")
    print(f"check:  max |merged - unmerged| logit on the probe batch {report.max_abs_diff:.3g} "
          f"(tolerance {report.tolerance:g})")
    return 0


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
    from orchestrator.plan.memory import GiB, parse_memory, plan_table
    from orchestrator.spec import SpecError, load_spec
    from orchestrator.train.shape import model_shape
    from orchestrator.train.tasks import load_data

    spec = load_spec(args.job, args.overrides)
    memory = parse_memory(args.device_memory) if args.device_memory else None
    source = "given"
    if memory is None and not spec.scaling.use_gpu:
        import os

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / spec.scaling.num_workers
        source = f"this machine's RAM / {spec.scaling.num_workers} workers"
    labels = None
    if spec.model.task == "sequence_classification":
        try:
            labels = len(load_data(spec).label_names)
        except SpecError as error:  # data not on this machine: the head's size hardly matters
            print(f"note: data not read ({str(error)[:120]}); assuming 2 labels")
            labels = 2
    shape = model_shape(spec, labels)
    print(f"{args.job}: device memory {f'{memory / GiB:.1f} GiB ({source})' if memory else 'not given'}")
    print("\n".join(plan_table(spec, shape, memory)))
    return 0


def _compose(args) -> int:
    from orchestrator.serve.composition import check_model_name, compose, parse_weights, register

    if args.register:
        check_model_name(args.register)
    weights = parse_weights(args.weights, len(args.adapter))
    made = compose(args.adapter, weights, args.method, args.out, density=args.density, svd_rank=args.svd_rank,
                   seed=args.seed, base=args.base, tracking_uri=args.tracking_uri)
    shown = ", ".join(f"{w:g}×{a}" for w, a in zip(weights, args.adapter))
    print(f"composed: {made.folder} ({made.method} of {shown}; rank {made.rank}, {made.trainable:,} parameters, "
          "PEFT format)")
    if args.register:
        run_id, version = register(made.folder, args.register, args.tracking_uri)
        print(f"registered: {args.register} version {version} (run {run_id}); use it as "
              f"models:/{args.register}/{version}")
    print(f"measure it on each task: orchestrator eval --adapter {made.folder} --data TASK_DATA")
    return 0


def _schema(_args) -> int:
    from orchestrator.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _adapter_arguments(command: argparse.ArgumentParser) -> None:
    """What every command that uses a trained adapter takes."""
    command.add_argument("--adapter", required=True,
                         help="adapter folder, or models:/NAME@alias | models:/NAME/VERSION")
    command.add_argument("--base", help="base model folder (default: the one the adapter was trained on)")
    command.add_argument("--tracking-uri", help="MLflow registry URI for models:/ (default: $MLFLOW_TRACKING_URI)")
    command.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs")


def _job_arguments(command: argparse.ArgumentParser, job_help: str, memory_check: bool = False) -> None:
    """What every command that reads a job file takes."""
    command.add_argument("job", help=job_help)
    command.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
    command.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the libraries' logs")
    if memory_check:
        command.add_argument("--skip-memory-check", action="store_true",
                             help="launch even when the memory estimate exceeds a worker's device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Distributed LoRA fine-tuning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler, text in (("train", _train, "train a LoRA adapter on Ray Train + DeepSpeed"),
                                ("validate", _validate, "check a job file, its data and model; starts no Ray")):
        command = commands.add_parser(name, help=text, description=text)
        _job_arguments(command, "job YAML file", memory_check=name == "train")
        command.set_defaults(handler=handler)
    search = commands.add_parser("tune", help="search LoRA hyperparameters with Ray Tune (ASHA early stopping)",
                                 description="Run the job's tune section: one Ray Train job per trial.")
    _job_arguments(search, "job YAML file with a tune section", memory_check=True)
    search.add_argument("--resume", action="store_true", help="continue a study whose driver stopped")
    search.set_defaults(handler=_tune)
    again = commands.add_parser("retrain", help="train a challenger on the newest data snapshot; promote it to "
                                "champion only if it beats the champion (exit 0 promoted, 3 kept)",
                                description="What a schedule runs. Idempotent per data snapshot.")
    _job_arguments(again, "job YAML file with a retrain section")
    again.set_defaults(handler=_retrain)
    remote = commands.add_parser("submit", help="run an orchestrator command on a Ray cluster via the Ray Jobs API",
                                 description="Uploads the current folder and this orchestrator package, runs "
                                             "'orchestrator COMMAND JOB' on the cluster, streams its logs and exits "
                                             "with its exit code.")
    remote.add_argument("job", help="job YAML file under the current folder")
    remote.add_argument("overrides", nargs="*", metavar="key.path=value", help="override spec fields")
    remote.add_argument("--address", required=True, help="the head's job API, e.g. http://HEAD:8265")
    remote.add_argument("--command", dest="command_name", default="train", choices=("train", "tune", "retrain",
                                                                                    "validate"))
    remote.add_argument("--no-wait", action="store_true", help="print the job id and return")
    remote.set_defaults(handler=_submit, verbose=False)
    models = commands.add_parser("registry", help="list, inspect, pull, promote and roll back registered adapters")
    models.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("ls", help="models, versions, aliases, base model and key metric")
    listing.add_argument("name", nargs="?", help="one model (default: all)")
    shown = actions.add_parser("show", help="params, metrics and lineage of a version")
    shown.add_argument("ref", help="NAME@alias, NAME/VERSION or models:/...")
    shown.add_argument("--json", action="store_true", help="machine-readable output")
    pulled = actions.add_parser("pull", help="download a version's PEFT adapter folder")
    pulled.add_argument("ref", help="NAME@alias, NAME/VERSION or models:/...")
    pulled.add_argument("--to", required=True, help="a new folder")
    promoted = actions.add_parser("promote", help="point an alias at a version (records who and why)")
    promoted.add_argument("name")
    promoted.add_argument("version", type=int)
    promoted.add_argument("--alias", default="champion")
    promoted.add_argument("--reason", required=True, help="why; kept as a tag on the version")
    promoted.add_argument("--allow-unevaluated", action="store_true",
                          help="promote a version that has no evaluation results (not recommended)")
    back = actions.add_parser("rollback", help="move an alias back to the version that held it before")
    back.add_argument("name")
    back.add_argument("--alias", default="champion")
    back.add_argument("--reason", default="rollback", help="why; kept as a tag on the version")
    for sub in (listing, shown, pulled, promoted, back):
        sub.add_argument("--tracking-uri", default=argparse.SUPPRESS,
                         help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI)")
    models.set_defaults(handler=_registry, verbose=False)
    speak = commands.add_parser("generate", help="complete prompts with a causal LM adapter (greedy)",
                                description="Loads the adapter's base model (from the job saved with it) and the "
                                            "adapter, and prints one completion per prompt.")
    speak.add_argument("prompts", nargs="+", metavar="PROMPT")
    speak.add_argument("--max-new-tokens", type=int, default=64)
    speak.add_argument("--raw", action="store_true", help="send the prompt as is, not through the chat template")
    _adapter_arguments(speak)
    speak.set_defaults(handler=_generate)
    score = commands.add_parser("eval", help="metrics of an adapter on a data file (classification or causal LM)",
                                description="Classification: accuracy, macro-F1, loss, per-class report, confusion "
                                            "matrix PNG; causal LM: loss and perplexity on the trained tokens. "
                                            "Columns and format default to the adapter's training job.")
    score.add_argument("--data", required=True, help=".jsonl, .csv, .parquet or a datasets folder")
    score.add_argument("--out", help="folder for metrics.json (and confusion_matrix.png)")
    score.add_argument("--batch-size", type=int, default=32)
    score.add_argument("--log-to-mlflow", action="store_true",
                       help="record a run with the metrics (and --out files) at --tracking-uri / $MLFLOW_TRACKING_URI; "
                            "a models:/ adapter's version is tagged with them")
    score.add_argument("--experiment", default="evaluations", help="MLflow experiment for --log-to-mlflow")
    _adapter_arguments(score)
    score.set_defaults(handler=_eval)
    guess = commands.add_parser("predict", help="batch inference with an adapter: labels and scores, or completions",
                                description="Reads JSONL/CSV/Parquet, writes JSONL: each input row plus label, score "
                                            "and top labels (classifier) or completion (causal LM). --text for one "
                                            "line.")
    guess.add_argument("--data", help="input .jsonl, .csv, .parquet or a datasets folder")
    guess.add_argument("--out", help="output .jsonl (written atomically)")
    guess.add_argument("--text", help="predict one line and print it")
    guess.add_argument("--also", action="append", metavar="NAME=ADAPTER",
                       help="more adapters on the same base; a row's 'adapter' field picks one (default: --adapter)")
    guess.add_argument("--batch-size", type=int, default=32)
    guess.add_argument("--max-new-tokens", type=int, default=64, help="causal LM: tokens to generate")
    _adapter_arguments(guess)
    guess.set_defaults(handler=_predict)
    fold = commands.add_parser("merge", help="merge a LoRA adapter into its base: a standalone model for serving",
                               description="W <- W + (alpha/r) B A, checked against the unmerged adapter on a probe "
                                           "batch, saved as safetensors (sharded when large) with the tokenizer.")
    fold.add_argument("--out", required=True, help="a new folder")
    fold.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    _adapter_arguments(fold)
    fold.set_defaults(handler=_merge)
    ship = commands.add_parser("export", help="write an adapter the way serving engines load it",
                               description="--format peft: the PEFT adapter files (multi-adapter serving on one "
                                           "base); --format merged: a standalone merged model (single-task serving, "
                                           "no added latency).")
    ship.add_argument("--format", choices=("peft", "merged"), required=True)
    ship.add_argument("--out", required=True, help="a new folder")
    ship.add_argument("--max-shard-size", default="2GB", help="merged: safetensors shard size")
    _adapter_arguments(ship)
    ship.set_defaults(handler=_export)
    versus = commands.add_parser("compare", help="train several fine-tuning methods on the job and compare them, "
                                 "measured", description="One Ray Tune grid trial per method (same data, same steps, "
                                 "no early stopping): share of parameters trained, peak memory per worker, wall "
                                 "time and the task metric, also relative to full fine-tuning.")
    _job_arguments(versus, "job YAML file", memory_check=True)
    versus.add_argument("--methods", default="full,lora:r=8,lora:r=16,prefix,prompt,ia3",
                        help="comma-separated: full, lora, qlora, ia3, prompt, prefix, each with options after "
                             "colons: r, alpha, lr, tokens (e.g. lora:r=16:lr=1e-3)")
    versus.set_defaults(handler=_compare)
    sizing = commands.add_parser("plan", help="estimate memory per device for full, LoRA and QLoRA at each ZeRO "
                                 "stage, and recommend settings that fit",
                                 description="From the model's config alone (built on the meta device, no weights "
                                             "read): weights, gradients, optimizer states, ZeRO buckets, activations "
                                             "and runtime per device.")
    _job_arguments(sizing, "job YAML file")
    sizing.add_argument("--device-memory", help="memory of one device, e.g. 80GiB (default on CPU jobs: this "
                        "machine's RAM / workers)")
    sizing.set_defaults(handler=_plan)
    mix = commands.add_parser("compose", help="combine causal LM adapters on one base into a new adapter",
                              description="PEFT weighted combination: cat (exact weighted sum, rank adds up), svd "
                                          "(weighted sum truncated to --svd-rank), linear, ties, dare (pruned to "
                                          "--density, sign conflicts resolved). Saved in PEFT format.")
    mix.add_argument("--adapter", action="append", required=True,
                     help="adapter folder or models:/ URI; repeat for each adapter (all on the same base)")
    mix.add_argument("--weights", help="one per adapter, e.g. 0.5,0.5 (default: 1/n each)")
    mix.add_argument("--method", default="cat", help="cat (default), svd, linear, ties, dare, or PEFT's ties_svd, "
                     "dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")
    mix.add_argument("--density", type=float, help="ties/dare/magnitude_prune: share of entries kept (default 0.5)")
    mix.add_argument("--svd-rank", type=int, help="svd methods: rank of the result (default: the largest r)")
    mix.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    mix.add_argument("--out", required=True, help="a new folder")
    mix.add_argument("--register", metavar="NAME", help="log it as an MLflow run and register it as a new version "
                     "of NAME at --tracking-uri / $MLFLOW_TRACKING_URI")
    mix.add_argument("--base", help="base model folder (default: the one the adapters were trained on)")
    mix.add_argument("--tracking-uri", help="MLflow registry URI for models:/ and --register")
    mix.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs")
    mix.set_defaults(handler=_compose)
    schema = commands.add_parser("schema", help="print the JSON Schema of job files")
    schema.set_defaults(handler=_schema, verbose=False)
    return parser


_signalled: list[int] = []  # SIGTERM, once received (Ray Train re-raises interrupts as a plain KeyboardInterrupt)


def _raise_terminated(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, ``kill``), handled as Ctrl-C: runs end KILLED, checkpoints stay, reruns resume."""
    _signalled.append(signum)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet(args.verbose)
    if argv is None:  # the command itself, not a caller's main([...]) (a caller keeps its own SIGTERM handling)
        signal.signal(signal.SIGTERM, _raise_terminated)
    from orchestrator.runtime.launcher import TrainingFailed
    from orchestrator.spec import SpecError
    from orchestrator.tracking.runs import TrackingUnavailable
    from orchestrator.workflows.tuning import StudyFailed

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
    except TrackingUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNRECORDED
    except KeyboardInterrupt:
        print("interrupted; rerun the same job to resume from its last checkpoint (a search: orchestrator tune JOB "
              "--resume)", file=sys.stderr)
        return 128 + (signal.SIGTERM if signal.SIGTERM in _signalled else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
