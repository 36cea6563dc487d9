"""`python -m registry`: audit and manage what the pipeline produced.

One function per subcommand (`cmd_<name>(args) -> int`), registered in `build_parser()` with its
own arguments; `main()` only parses and dispatches: `lineage` (a data file, or a model URI
`models:/<name>@production` / `models:/<name>/<version>`: registry.model_lineage, which reuses
`registry.lineage.lineage_for_file` for the datasets), `list`, `promote [VERSION]`, `rollback`
and `summary` (registry.promote holds the policy and the registry operations), and `export`
(registry.export: adapter merged into its base -> GGUF).

Heavy imports (mlflow) happen inside the subcommand, so `--help` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.errors import exit_on_user_error


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print the lineage chain of a DVC-tracked file; exit 1 unless it matches dvc.lock."""
    from registry.lineage import MATCH, lineage_for_file, render_text

    target = args.target
    if target.startswith("models:/"):
        return cmd_model_lineage(args)
    report = lineage_for_file(target, check_run=not args.no_run_check)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(render_text(report))
    return 0 if report.status == MATCH or not args.strict else 1


def cmd_model_lineage(args: argparse.Namespace) -> int:
    """Print the lineage chain of a registered model version; --strict: exit 1 unless MATCH."""
    from registry.lineage import MATCH
    from registry.model_lineage import lineage_for_model, render_text

    report = lineage_for_model(args.target, check_run=not args.no_run_check)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(render_text(report))
    return 0 if report.status == MATCH or not args.strict else 1


def _tag_number(tags: dict, key: str, digits: int) -> str:
    """A numeric version tag rounded for a table ('-' when absent)."""
    try:
        return f"{float(tags[key]):.{digits}f}"
    except (KeyError, ValueError):
        return "-"


def cmd_list(args: argparse.Namespace) -> int:
    """Versions of the registered model: aliases, legacy stage, key metrics, training run."""
    from pipeline.core.config import load_config
    from registry.promote import all_versions, open_client

    config = load_config()
    name = config.promote.registered_model_name
    client = open_client(config)
    versions = all_versions(client, name)
    if not versions:
        print(f"{name}: no versions registered yet (run `dvc repro promote` or `python -m registry promote`)")
        return 0
    aliases: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    print(f"{name} ({len(versions)} version(s)); base model: "
          f"{_tag_number(versions[-1].tags, 'base.pct_conversational', 1)}% conversational, "
          f"similarity {_tag_number(versions[-1].tags, 'base.similarity_mean', 3)}")
    header = f"{'version':>7}  {'aliases':<20} {'stage':<10} {'%conv':>6} {'simil.':>6} {'n_train':>7} {'r':>4} {'prec.':<5} training run"
    print(header)
    for version in reversed(versions):
        tags = version.tags
        marks = ",".join(sorted(aliases.get(str(version.version), []))) or "-"
        flags = " [forced]" if tags.get("promote.forced") == "true" else ""
        flags += " [rolled back]" if tags.get("tonetune.rolled_back") == "true" else ""
        print(f"{version.version:>7}  {marks:<20} {version.current_stage or '-':<10} "
              f"{_tag_number(tags, 'metric.pct_conversational', 1):>6} {_tag_number(tags, 'metric.similarity_mean', 3):>6} "
              f"{tags.get('param.n_train', '-'):>7} {tags.get('param.lora_r', '-'):>4} {tags.get('param.precision', '-'):<5} "
              f"{tags.get('tonetune.training_run_name', '-')} ({version.run_id or '-'}){flags}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote by policy (no VERSION) or an existing version, under the gate unless --force."""
    from registry.promote import run_promote

    return run_promote(args)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move `production` back to `previous` (and `previous` one further back)."""
    from pipeline.core.config import load_config
    from registry.promote import report, rollback

    return report(rollback(load_config()))


def cmd_summary(args: argparse.Namespace) -> int:
    """The Production model's name, version and metrics, and how to load and audit it."""
    from pipeline.core.config import load_config
    from registry.promote import PRODUCTION, open_client, version_by_alias

    config = load_config()
    name = config.promote.registered_model_name
    version = version_by_alias(open_client(config), name, PRODUCTION)
    if version is None:  # e.g. the policy found no eligible adapter: the promote stage said why
        print(f"{name}: no {PRODUCTION} version (the promote stage's message says why; "
              "`python -m registry list` shows the registered versions)")
        return 0
    tags = version.tags
    uri = f"models:/{name}@{PRODUCTION}"
    print(f"Production model: {name} v{version.version} (alias {PRODUCTION}, stage {version.current_stage})")
    print(f"  adapter   {tags.get('tonetune.training_run_name', '-')}: precision {tags.get('param.precision', '-')}, "
          f"LoRA r {tags.get('param.lora_r', '-')}, learning rate {tags.get('param.learning_rate', '-')}, "
          f"{tags.get('param.n_train', '-')} training samples, base {tags.get('param.base_model_id', '-')}")
    print(f"  metrics   {_tag_number(tags, 'metric.pct_conversational', 1)}% conversational "
          f"[{_tag_number(tags, 'metric.pct_conversational_ci_low', 1)}, {_tag_number(tags, 'metric.pct_conversational_ci_high', 1)}] "
          f"vs base {_tag_number(tags, 'base.pct_conversational', 1)}%; similarity "
          f"{_tag_number(tags, 'metric.similarity_mean', 3)} vs base {_tag_number(tags, 'base.similarity_mean', 3)}; "
          f"mean Flesch {_tag_number(tags, 'metric.flesch_mean', 1)} vs {_tag_number(tags, 'base.flesch_mean', 1)} "
          f"(n = {_tag_number(tags, 'metric.n_eval', 0)})")
    print(f"  load      mlflow.pyfunc.load_model(\"{uri}\").predict([\"Why is the sky blue?\"])")
    print(f"  lineage   python -m registry lineage {uri}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the adapter into its base (float32) and write a llama.cpp GGUF (registry.export)."""
    from registry.export import run_export

    result = run_export(args.target, args.gguf, args.type, args.base)
    print(f"wrote {result.path} ({result.file_type}, {result.n_tensors} tensors, {result.n_bytes / 1e6:.1f} MB) "
          f"sha256 {result.sha256}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one subparser per verb, each bound to its cmd_ function via `func`."""
    parser = argparse.ArgumentParser(
        prog="python -m registry",
        description="Audit and manage tonetune's datasets and models (run from the repository root).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    lineage = commands.add_parser(
        "lineage",
        help="trace a data file back to its stage, params, generation run, corpus and commit",
        description="Trace a DVC-tracked file (e.g. data/splits/train_100.parquet) to its DVC md5 and "
        "stage, the params of every upstream stage, the generation MLflow run, the source corpus "
        "and the git commit of dvc.lock; say whether the file still matches dvc.lock. For a model URI "
        "(models:/<name>@production, models:/<name>/<version>): version -> training run -> params -> base "
        "model -> datasets with the DVC md5s it was trained on -> the same chain for the training file -> "
        "commit, and whether every file on disk still matches dvc.lock (MATCH / MODIFIED / MISSING).",
    )
    lineage.add_argument("target", help="path of a file produced by the pipeline, or models:/<name>@<alias> "
                         "or models:/<name>/<version>")
    lineage.add_argument("--json", action="store_true", help="print the report as JSON")
    lineage.add_argument("--strict", action="store_true", help="exit 1 unless the file MATCHes dvc.lock")
    lineage.add_argument("--no-run-check", action="store_true", help="do not open the MLflow store")
    lineage.set_defaults(func=cmd_lineage)

    listing = commands.add_parser(
        "list", help="versions of the registered model with aliases, stage and key metrics",
        description="List every version of promote.registered_model_name (newest first): aliases "
        "(production, previous), legacy stage, % conversational, similarity, n_train, r, training run.",
    )
    listing.set_defaults(func=cmd_list)

    from registry.promote import add_promote_arguments

    promote = commands.add_parser(
        "promote", help="promote the best adapter (or VERSION) to production, through the gate",
        description="Without VERSION: the DVC stage (best adapter of metrics/eval by the policy: max % "
        "conversational; similarity >= base - promote.similarity_tolerance; ties: fewer samples, smaller r). "
        "With VERSION: that existing version. Refused (exit 1) when the data-quality gate did not pass for its "
        "data or it is not better than the current production version, unless --force --reason TEXT.",
    )
    promote.add_argument("version", nargs="?", help="an existing version number (default: pick by policy)")
    add_promote_arguments(promote)
    promote.set_defaults(func=cmd_promote)

    rollback = commands.add_parser(
        "rollback", help="move production back to previous",
        description="Point alias production at the previous version, previous at the one before it "
        "(from the history tag), move the legacy stage; the rolled-back version is tagged and the "
        "promote stage will not pick it again (promote it by number to restore it).",
    )
    rollback.set_defaults(func=cmd_rollback)

    summary = commands.add_parser(
        "summary", help="the production model's name, version, metrics, and the lineage command",
        description="Print the production model (end of `make demo`); exit 1 when there is none.",
    )
    summary.set_defaults(func=cmd_summary)

    export = commands.add_parser(
        "export", help="merge an adapter into its base and write a GGUF (llama.cpp, Ollama, LM Studio)",
        description="Merge the LoRA adapter of a registered version (models:/<name>@<alias>, "
        "models:/<name>/<version>) or of an adapter folder into its base model in float32 and write a "
        "llama-architecture GGUF; for a registry version, record file, sha256 and type as version tags.",
    )
    export.add_argument("target", help="models:/<name>@<alias>, models:/<name>/<version> or an adapter folder")
    export.add_argument("--gguf", type=Path, required=True, metavar="OUT", help="the .gguf file to write")
    export.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="tensor type of the 2-D weights (norms stay f32); default f16")
    export.add_argument("--base", type=Path, help="base model folder (default: the one the adapter records)")
    export.set_defaults(func=cmd_export)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
