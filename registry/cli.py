"""`python -m registry`: audit and manage what the pipeline produced.

One function per subcommand (`cmd_<name>(args) -> int`), registered in `build_parser()` with its
own arguments; `main()` only parses and dispatches: `lineage` (a data file, or a model URI
`models:/<name>@production` / `models:/<name>/<version>`: registry.model_lineage, which reuses
`registry.lineage.lineage_for_file` for the datasets), `list`, `promote [VERSION]`, `rollback`
and `summary` (registry.promote runs promotion and rollback: registry/policy.py has the rules,
registry/store.py the registry writes), `replay` (registry.replay: the served model re-asked the
evaluated questions, alone and shuffled) and `export`
(registry.export: adapter merged into its base -> GGUF).

Heavy imports (mlflow) happen inside the functions that use the store, so `--help` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.tracking import open_client
from registry.card import decision_lines
from registry.evidence import read_heldout
from registry.policy import tone_of
from registry.promote import add_promote_arguments, report, rollback, run_promote
from registry.store import PRODUCTION, all_versions, version_by_alias


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

    config = load_config()
    name = config.promote.registered_model_name
    client = open_client(config.tracking)
    versions = all_versions(client, name)
    if not versions:
        print(f"{name}: no versions registered yet (run `dvc repro promote` or `python -m registry promote`)")
        return 0
    aliases: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(number), []).append(alias)
    print(f"{name} ({len(versions)} version(s)); base model: "
          f"{_tag_number(versions[-1].tags, Tags.base('pct_' + tone_of(versions[-1].tags)), 1)}% "
          f"{tone_of(versions[-1].tags).replace('_', ' ')}, "
          f"similarity {_tag_number(versions[-1].tags, Tags.base('similarity_mean'), 3)}")
    header = (f"{'version':>7}  {'aliases':<20} {'stage':<10} {'%style':>6} {'simil.':>6} {'ended%':>6} {'repet.':>6} "
              f"{'n_train':>7} {'r':>4} {'prec.':<5} training run")
    print(header)
    for version in reversed(versions):
        tags = version.tags
        marks = ",".join(sorted(aliases.get(str(version.version), []))) or "-"
        flags = " [forced]" if tags.get(Tags.PROMOTE_FORCED) == "true" else ""
        flags += " [rolled back]" if tags.get(Tags.ROLLED_BACK) == "true" else ""
        print(f"{version.version:>7}  {marks:<20} {version.current_stage or '-':<10} "
              f"{_tag_number(tags, Tags.metric('pct_' + tone_of(tags)), 1):>6} {_tag_number(tags, Tags.metric('similarity_mean'), 3):>6} "
              f"{_tag_number(tags, Tags.metric('stopped_pct'), 1):>6} {_tag_number(tags, Tags.metric('repetition_rate'), 3):>6} "
              f"{tags.get(Tags.param('n_train'), '-'):>7} {tags.get(Tags.param('lora_r'), '-'):>4} {tags.get(Tags.param('precision'), '-'):<5} "
              f"{tags.get(Tags.TRAINING_RUN_NAME, '-')} ({version.run_id or '-'}){flags}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote by policy (no VERSION) or an existing version, under the gate unless --force."""

    return run_promote(args)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Move `production` back to `previous` (and `previous` one further back)."""

    return report(rollback(load_config()))


def _difference(tags: dict, key: str, digits: int, unit: str = "") -> str:
    """`0.553 vs base 0.590 (-0.037)`: a version's metric, the base's, and the difference."""
    try:
        mine, base = float(tags[Tags.metric(key)]), float(tags[Tags.base(key)])
    except (KeyError, ValueError):
        return f"{_tag_number(tags, Tags.metric(key), digits)}{unit} vs base {_tag_number(tags, Tags.base(key), digits)}{unit}"
    points = " points" if unit == "%" else ""
    return f"{mine:.{digits}f}{unit} vs base {base:.{digits}f}{unit} ({mine - base:+.{digits}f}{points})"


def why_no_production(config, client, name: str) -> list[str]:
    """Plain reasons there is no production version: what the registry holds, and the rule's
    checks of this round's finalist against the base (read-only: nothing is written)."""
    from pipeline.core.decision import Rule, checks_against_base, verdict

    versions = all_versions(client, name)
    if versions:
        lines = [f"  {len(versions)} version(s) are registered but none holds alias production (rolled back, or the "
                 "alias was removed): `python -m registry list`, then `python -m registry promote VERSION`"]
    else:
        lines = ["  no version was ever registered: the rule has not said promote for any finalist"]
    try:
        heldout = read_heldout()
    except TonetuneError as error:
        return [*lines, f"  ({error})"]
    checks = checks_against_base(heldout.finalist, heldout.base, Rule.from_config(config.promote))
    lines.append(f"  finalist {heldout.record['finalist']} against the base on {heldout.base.n} test questions: "
                 f"{verdict(checks)} (rule declared in {str(heldout.record.get('declared_in'))[:12]})")
    lines += [f"    {check.describe()}" for check in checks]
    lines.append("  to override the rule: python -m registry promote --force --reason TEXT")
    lines.append(f"  to try the finalist without promoting it: make serve TARGET={heldout.record['finalist']}")
    return lines


def cmd_summary(args: argparse.Namespace) -> int:
    """The Production model: name, version, the test-set decision with its bounds, validation
    metrics vs base, how to load and audit it; or, plainly, why there is none."""

    config = load_config()
    name = config.promote.registered_model_name
    client = open_client(config.tracking)
    version = version_by_alias(client, name, PRODUCTION)
    if version is None:
        print(f"No Production model: {name} has no {PRODUCTION} version.")
        print("\n".join(why_no_production(config, client, name)))
        return 0
    tags = version.tags
    uri = f"models:/{name}@{PRODUCTION}"
    forced = " [FORCED: see the model card]" if tags.get(Tags.PROMOTE_FORCED) == "true" else ""
    print(f"Production model: {name} v{version.version} (alias {PRODUCTION}, stage {version.current_stage}){forced}")
    print(f"  adapter       {tags.get(Tags.TRAINING_RUN_NAME, '-')}: precision {tags.get(Tags.param('precision'), '-')}, "
          f"LoRA r {tags.get(Tags.param('lora_r'), '-')}, learning rate {tags.get(Tags.param('learning_rate'), '-')}, "
          f"{tags.get(Tags.param('n_train'), '-')} training samples, base {tags.get(Tags.param('base_model_id'), '-')}")
    print("\n".join(decision_lines(tags)))
    print(f"  validation    {tone_of(tags).replace('_', ' ')} {_difference(tags, 'pct_' + tone_of(tags), 1, '%')}; similarity "
          f"{_difference(tags, 'similarity_mean', 3)}; to the factual answer {_difference(tags, 'content_similarity_mean', 3)} "
          f"(n = {_tag_number(tags, Tags.metric('n_eval'), 0)})")
    print(f"  degeneration  ended their turn {_difference(tags, 'stopped_pct', 1, '%')}; repeated 4-grams "
          f"{_difference(tags, 'repetition_rate', 3)} (validation)")
    print(f"  load          mlflow.pyfunc.load_model(\"{uri}\").predict([\"Why is the sky blue?\"])")
    print(f"  lineage       python -m registry lineage {uri}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the adapter into its base (float32) and write a llama.cpp GGUF (registry.export)."""
    from registry.export import run_export

    result = run_export(args.target, args.gguf, args.type, args.base)
    print(f"wrote {result.path} ({result.file_type}, {result.n_tensors} tensors, {result.n_bytes / 1e6:.1f} MB) "
          f"sha256 {result.sha256}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Re-ask the evaluated questions through the served model; exit 1 unless every answer is identical."""
    from registry.replay import run_replay

    counts = run_replay(args.target, args.limit, not args.no_alone, not args.no_shuffled, load_config())
    return 0 if all(not count.differing_ids for count in counts) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Resolve the target, then become MLflow's scoring server (registry.serve)."""
    from registry.serve import run_serve

    run_serve(args.target, args.host, args.port, load_config())
    return 0  # not reached: run_serve replaces this process


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

    promote = commands.add_parser(
        "promote", help="promote the finalist (or VERSION) to production, if the rule says so",
        description="Without VERSION: the DVC stage (the heldout stage's finalist, decided by the declared rule in "
        "params.yaml promote: paired one-sided bounds on the test set against the base, exact McNemar against the "
        "current production version; see docs/evaluation.md). With VERSION: that existing version, if its "
        "recorded decision is promote and the data-quality gate passed for its data. Refused otherwise, unless "
        "--force --reason TEXT (recorded on the version and in its model card).",
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
        "summary", help="the production model's name, version, decision evidence, and the lineage command",
        description="Print the production model (end of `make demo`): name, version, the test-set decision (each "
        "check's estimate, one-sided bound and limit, n, the declaring commit, the seed, the machine), validation "
        "metrics vs the base model; when there is none, the rule's checks of this round's finalist (exit 0 either way).",
    )
    summary.set_defaults(func=cmd_summary)

    replay = commands.add_parser(
        "replay", help="re-ask the evaluated questions through the served model and count identical answers",
        description="Load a model the way it is served (mlflow.pyfunc.load_model) and re-ask every question it was "
        "evaluated on (validation; test too when it was the heldout finalist): each question alone, then all of them "
        "in one shuffled request. Print how many answers are byte-identical to the evaluated ones; exit 1 if any "
        "differs. Identity is promised for the same machine facts (library versions, threads, CPU ISA): differing "
        "facts are printed first. Sending questions alone pays a full decoding slab each (docs/decoding.md).",
    )
    replay.add_argument("target", help="models:/<name>@<alias>, models:/<name>/<version>, or an evaluated adapter's "
                        "name (e.g. lora-fp32-r32-lr0.0003-n150: the model its training run logged)")
    replay.add_argument("--limit", type=int, help="only the first N questions of each split")
    replay.add_argument("--no-alone", action="store_true", help="skip sending each question alone")
    replay.add_argument("--no-shuffled", action="store_true", help="skip the one shuffled request")
    replay.set_defaults(func=cmd_replay)

    serve = commands.add_parser(
        "serve", help="serve the production model (or TARGET) over REST with MLflow's scoring server",
        description="Check that TARGET exists (default: models:/<promote.registered_model_name>@production), saying "
        "in one line what is missing and what could be served instead, then run `mlflow models serve --env-manager "
        "local` on it: POST /invocations {\"inputs\": [questions]}. MLflow's request timeout is raised to 600 s "
        "unless MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT is set. This is what `make serve` runs.",
    )
    serve.add_argument("target", nargs="?", help="models:/<name>@<alias>, models:/<name>/<version>, or an evaluated "
                       "adapter's name (the model its training run logged); default: the production alias")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=5001, help="port to listen on (default 5001)")
    serve.set_defaults(func=cmd_serve)

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
