"""``compose``: combine causal LM adapters on one base into a new adapter."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``compose`` to the ``orchestrator`` command."""
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


def _compose(args) -> int:
    from orchestrator.serve.composition import check_model_name, compose, parse_weights
    from orchestrator.serve.composition import register as register_version

    if args.register:
        check_model_name(args.register)
    weights = parse_weights(args.weights, len(args.adapter))
    made = compose(args.adapter, weights, args.method, args.out, density=args.density, svd_rank=args.svd_rank,
                   seed=args.seed, base=args.base, tracking_uri=args.tracking_uri)
    shown = ", ".join(f"{w:g}×{a}" for w, a in zip(weights, args.adapter))
    print(f"composed: {made.folder} ({made.method} of {shown}; rank {made.rank}, {made.trainable:,} parameters, "
          "PEFT format)")
    if args.register:
        run_id, version = register_version(made.folder, args.register, args.tracking_uri)
        print(f"registered: {args.register} version {version} (run {run_id}); use it as "
              f"models:/{args.register}/{version}")
    print(f"measure it on each task: orchestrator eval --adapter {made.folder} --data TASK_DATA")
    return 0
