"""``train``, ``validate``, ``tune``, ``retrain``: the commands that run (or check) one job file."""

from __future__ import annotations

import argparse

from orchestrator.cli.arguments import job_arguments, output_arguments


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``train``, ``validate``, ``tune`` and ``retrain`` to the ``orchestrator`` command."""
    for name, handler, text in (("train", _train, "train a LoRA adapter on Ray Train + DeepSpeed"),
                                ("validate", _validate, "check a job file, its data and model; starts no Ray")):
        command = commands.add_parser(name, help=text, description=text)
        job_arguments(command, "job YAML file", memory_check=name == "train")
        if name == "train":
            output_arguments(command)
        command.set_defaults(handler=handler)
    search = commands.add_parser("tune", help="search LoRA hyperparameters with Ray Tune (ASHA early stopping)",
                                 description="Run the job's tune section: one Ray Train job per trial.")
    job_arguments(search, "job YAML file with a tune section", memory_check=True)
    output_arguments(search)
    search.add_argument("--resume", action="store_true", help="continue a study whose driver stopped")
    search.set_defaults(handler=_tune)
    again = commands.add_parser("retrain", help="train a challenger on the newest data snapshot; promote it to "
                                "champion only if it beats the champion (exit 0 promoted, 3 kept)",
                                description="What a schedule runs. Idempotent per data snapshot.")
    job_arguments(again, "job YAML file with a retrain section")
    output_arguments(again)
    again.set_defaults(handler=_retrain)


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
    print(f"  computes: {checked.computes}")
    print(f"  plan: {spec.scaling.num_workers} workers x {plan.micro_batch_size} x {plan.gradient_accumulation_steps}"
          f" accumulation = global batch {plan.global_batch_size}; {plan.total_steps} steps "
          f"({plan.steps_per_epoch:g} per epoch), eval every {plan.eval_every_steps}")
    from orchestrator.plan.fitting import fit_job
    from orchestrator.plan.host_memory import workers_per_node
    from orchestrator.plan.memory import GiB, job_setting

    need = fit_job(spec, checked.shape, job_setting(spec), workers_per_node(spec, []))
    print(f"  memory: about {need.device.total / GiB:.2f} GiB per worker, {need.host.per_node / GiB:.1f} GiB of host "
          f"memory per node of {need.host.workers} workers ({spec.method.name}; orchestrator plan shows every method "
          "and ZeRO stage)")
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
    from orchestrator.cli.exit_codes import EXIT_KEPT
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
