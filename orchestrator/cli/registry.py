"""``registry ls|show|pull|promote|rollback``: the registered adapters in MLflow's model registry."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    """Adds ``registry`` and its five actions to the ``orchestrator`` command."""
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
