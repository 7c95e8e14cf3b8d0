"""``generate``, ``eval``, ``predict``, ``merge``, ``export``: the commands that use one trained adapter."""

from __future__ import annotations

import argparse

from orchestrator.cli.arguments import adapter_arguments, output_arguments


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``generate``, ``eval``, ``predict``, ``merge`` and ``export`` to the ``orchestrator`` command."""
    speak = commands.add_parser("generate", help="complete prompts with a causal LM adapter (greedy)",
                                description="Loads the adapter's base model (from the job saved with it) and the "
                                            "adapter, and prints one completion per prompt.")
    speak.add_argument("prompts", nargs="+", metavar="PROMPT")
    speak.add_argument("--max-new-tokens", type=int, default=64)
    speak.add_argument("--raw", action="store_true", help="send the prompt as is, not through the chat template")
    adapter_arguments(speak)
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
    adapter_arguments(score)
    output_arguments(score)
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
    adapter_arguments(guess)
    guess.set_defaults(handler=_predict)
    fold = commands.add_parser("merge", help="merge a LoRA adapter into its base: a standalone model for serving",
                               description="W <- W + (alpha/r) B A, checked against the unmerged adapter on a probe "
                                           "batch, saved as safetensors (sharded when large) with the tokenizer.")
    fold.add_argument("--out", required=True, help="a new folder")
    fold.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    adapter_arguments(fold)
    fold.set_defaults(handler=_merge)
    ship = commands.add_parser("export", help="write an adapter the way serving engines load it",
                               description="--format peft: the PEFT adapter files (multi-adapter serving on one "
                                           "base); --format merged: a standalone merged model (single-task serving, "
                                           "no added latency).")
    ship.add_argument("--format", choices=("peft", "merged"), required=True)
    ship.add_argument("--out", required=True, help="a new folder")
    ship.add_argument("--max-shard-size", default="2GB", help="merged: safetensors shard size")
    adapter_arguments(ship)
    ship.set_defaults(handler=_export)


def _generate(args) -> int:
    from orchestrator.serve.inference import complete, load_causal_adapter

    loaded = load_causal_adapter(args.adapter, args.base, args.tracking_uri)
    for prompt in args.prompts:
        print(complete(loaded, prompt, args.max_new_tokens, raw=args.raw).strip())
    return 0


def _eval(args) -> int:
    from orchestrator.serve.evaluation import evaluate_file
    from orchestrator.serve.inference import load_adapter
    from orchestrator.workflows.console import counter, milestone

    milestone("start", f"eval start: {args.adapter} on {args.data}", adapter=args.adapter, data=args.data)
    with counter("eval") as progress:
        result = evaluate_file(load_adapter(args.adapter, args.base, args.tracking_uri), args.data, args.out,
                               args.batch_size, progress=progress)
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    milestone("end", f"eval done: {result['examples']} examples  " + "  ".join(
        f"{k} {v:.4f}" for k, v in scalars.items() if isinstance(v, float)), status="finished", **scalars)
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


def _merge(args) -> int:
    from orchestrator.serve.inference import load_adapter, merge_adapter

    report = merge_adapter(load_adapter(args.adapter, args.base, args.tracking_uri), args.out, args.max_shard_size)
    print(f"merged: {report.folder} (standalone {report.dtype} model; loads with from_pretrained, no PEFT)")
    print(f"check:  max |merged - unmerged| logit on the probe batch {report.max_abs_diff:.3g} "
          f"(tolerance {report.tolerance:g})")
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
