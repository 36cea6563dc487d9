"""Stage `promote`: put the best LoRA adapter in the MLflow registry as the Production model.

    python -m registry.promote                          # the DVC stage (after `report`)
    python -m registry promote [VERSION] [--force --reason TEXT]
    python -m registry rollback

Owns the order of operations (`promote_best`, `promote_version`, `rollback`) and the CLI: read the
evidence, ask the policy, write the store, print one outcome. Does not own the rules
(registry/policy.py: the guards, the ranking, the gate), the evidence and version tags
(registry/evidence.py), the model card (registry/card.py) or the registry writes and the lock
(registry/store.py); the store is opened by pipeline.core.tracking.open_client.

A candidate replaces the current Production version only if it passes every guard (similarity,
degeneration), is strictly better under the policy (the Production version is judged by this
round's evaluation of its training run when there is one, else by the metrics recorded on it)
and the data-quality gate passed for the exact pairs.parquet its training split came from.
Every candidate's guards are printed. `--force --reason TEXT` overrides the refusals; the reason
and each overridden refusal are recorded as version tags and in the model card. Versions that
were rolled back are skipped by the stage (else `dvc repro` would undo the rollback); promote
them explicitly by number.

Promotion registers the adapter's pyfunc model (logged by the train stage) as a version of
`promote.registered_model_name`, tagged with its metrics, the base model's, the dataset DVC md5s,
training params, git commit, dvc.lock digest, training run id and data-quality verdict, with a model
card as the description; it sets alias `production`, moves the old one to alias `previous`,
moves the legacy stage and appends to a history tag that `rollback` pops. All of it under a
file lock per store (registry/store.py says what that does and does not protect).

Exit codes: 0 promoted, or nothing to do (already Production, the stage kept a Production
version that is at least as good, or no adapter passes the guards: "NOT PROMOTED");
1 refused by the gate (data quality, or an explicit VERSION not better or failing a guard);
2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core.config import Config, load_config
from pipeline.core.contracts import Tags
from pipeline.core.dvcmeta import DVC_LOCK
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.tracking import find_run, open_client, tracking_uri
from registry.card import model_card
from registry.evidence import (
    DATA_QUALITY_PATH,
    EVAL_DIR,
    DataQuality,
    data_quality_verdict,
    load_eval_records,
    version_tags,
)
from registry.policy import (
    BETTER_THAN_PRODUCTION,
    Candidate,
    Limits,
    as_float,
    check_force,
    describe,
    gate,
    guard_report,
    is_eligible,
    rank,
    refusal_name,
)
from registry.store import (
    PREVIOUS,
    PRODUCTION,
    get_version,
    has_model,
    make_production,
    promotion_lock,
    promotion_tags,
    register_once,
    roll_back,
    rolled_back_runs,
    set_tags,
    version_by_alias,
)


@dataclass(frozen=True)
class Outcome:
    """What an operation did, for the CLI: `action` promoted/noop/kept/none-eligible/refused/rolled-back."""

    action: str
    message: str
    version: str | None = None
    exit_code: int = 0


def pick_candidate(client, name: str, candidates: list[Candidate], limits: Limits | None):
    """(best candidate that passes the guards (`limits` None: any) and has a training run with a
    logged model, its run, notes about the ones skipped for another reason than a guard)."""
    rolled_back = rolled_back_runs(client, name)
    notes = []
    for candidate in rank(candidates):
        if limits is not None and not is_eligible(candidate, limits):
            continue  # the guard report says why
        if not candidate.run_id:
            notes.append(f"skipped {candidate.model}: no MLflow run recorded with its metrics")
            continue
        if candidate.run_id in rolled_back:
            notes.append(f"skipped {candidate.model}: its version was rolled back (promote it by number to restore it)")
            continue
        run = find_run(client, candidate.run_id)
        if run is None:
            notes.append(f"skipped {candidate.model}: run {candidate.run_id} is not in this tracking store")
            continue
        if not has_model(run):
            notes.append(f"skipped {candidate.model}: run {candidate.run_id} has no logged adapter model")
            continue
        return candidate, run, notes
    return None, None, notes


def incumbent_candidate(production, candidates: list[Candidate]) -> Candidate:
    """The Production version as a policy candidate: its current evaluation when this round
    evaluated the same training run (same conditions), else the metrics recorded on it."""
    run_id = production.tags.get(Tags.TRAINING_RUN_ID) or production.run_id
    same = [c for c in candidates if run_id and c.run_id == run_id]
    return same[0] if same else Candidate.from_version_tags(production.tags, str(production.version))


def promote_best(config: Config, eval_dir: Path = EVAL_DIR, summary_path: Path = DATA_QUALITY_PATH,
                 lock_path: Path | None = None, force: bool = False, reason: str | None = None) -> Outcome:
    """The DVC stage: promote the best adapter of metrics/eval if the gate lets it through."""
    check_force(force, reason)
    name = config.promote.registered_model_name
    base, candidates = load_eval_records(eval_dir)
    limits = Limits.for_base(float(base["similarity_mean"]), config.promote)
    client = open_client(config.tracking)
    with promotion_lock(tracking_uri(config.tracking)):
        candidate, run, notes = pick_candidate(client, name, candidates, limits)
        if candidate is None and force:
            candidate, run, notes = pick_candidate(client, name, candidates, None)
        guards = guard_report(candidates, limits, forced=candidate.model if force and candidate else None)
        if candidate is None:
            # A policy decision, not a failure: like "kept", the stage ends 0 so `dvc repro` and
            # `make demo` complete and say so; production (if any) is left as it was.
            return Outcome("none-eligible", "\n".join([
                "NOT PROMOTED: no adapter is eligible for promotion (production is unchanged; to override the "
                "policy: python -m registry promote --force --reason TEXT)", *guards, *notes]))
        production = version_by_alias(client, name, PRODUCTION)
        if production is not None and (production.tags.get(Tags.TRAINING_RUN_ID) or production.run_id) == run.info.run_id:
            message = f"{name} v{production.version} ({candidate.model}) is already production: nothing to do"
            return Outcome("noop", "\n".join([message, *guards, *notes]), str(production.version))
        incumbent = incumbent_candidate(production, candidates) if production is not None else None
        quality = data_quality_verdict(client, run, summary_path, lock_path or DVC_LOCK)
        refusals = gate(candidate, quality.success, quality.source, incumbent, limits)
        if refusals and not force:
            if [r for r in refusals if refusal_name(r) != BETTER_THAN_PRODUCTION]:
                message = f"promotion of {describe(candidate)} refused: " + "; ".join(refusals)
                return Outcome("refused", "\n".join([message, *guards, *notes]), exit_code=1)
            message = (f"kept {name} v{production.version}: best candidate {describe(candidate)} is "
                       f"{refusals[0].split(': ', 1)[1]}")
            return Outcome("kept", "\n".join([message, *guards, *notes]), str(production.version))
        tags = version_tags(candidate, base, run, quality, config)
        version, created = register_once(client, name, run, tags)
        how = promotion_tags("policy" if not force else "forced", force, reason, refusals)
        return finish_promotion(client, name, version, created, tags, how, describe(candidate), [*guards, *notes])


def finish_promotion(client, name: str, version, created: bool, tags: dict[str, str],
                     how: dict[str, str], label: str, notes: list[str]) -> Outcome:
    """Write the version's tags and model card, then move the aliases and the legacy stage."""
    number = str(version.version)
    recorded = dict(version.tags or {})
    set_tags(client, name, number, {**tags, **how}, recorded)
    everything = {**recorded, **tags, **how}
    if Tags.TRAINING_RUN_ID in everything or how.get(Tags.PROMOTE_FORCED) == "true":
        client.update_model_version(name, number, description=model_card(name, number, everything))
    replaced, stage_notes = make_production(client, name, number)
    verb = "registered and promoted" if created else "promoted"
    replaced_text = f"; v{replaced} is now {PREVIOUS}" if replaced else ""
    forced = (f" (FORCED: {how.get(Tags.PROMOTE_FORCE_REASON)}; overrode {how.get(Tags.PROMOTE_OVERRIDDEN)})"
              if how.get(Tags.PROMOTE_FORCED) == "true" else "")
    lines = [f"{verb} {name} v{number}: {label} -> alias {PRODUCTION}{replaced_text}{forced}", *notes, *stage_notes]
    return Outcome("promoted", "\n".join(lines), number)


def promote_version(config: Config, number: str, summary_path: Path = DATA_QUALITY_PATH,
                    lock_path: Path | None = None, force: bool = False, reason: str | None = None) -> Outcome:
    """`registry promote VERSION`: an existing version, under the same gate unless forced. Its
    guards are judged on the metrics recorded on it (floor: its recorded base similarity)."""
    check_force(force, reason)
    name = config.promote.registered_model_name
    client = open_client(config.tracking)
    with promotion_lock(tracking_uri(config.tracking)):
        version = get_version(client, name, number)
        production = version_by_alias(client, name, PRODUCTION)
        if production is not None and str(production.version) == str(version.version):
            return Outcome("noop", f"{name} v{version.version} is already production: nothing to do", str(version.version))
        refusals: list[str] = []
        try:
            candidate = Candidate.from_version_tags(version.tags, str(version.version))
        except TonetuneError as error:
            if not force:
                raise
            candidate, refusals = None, [f"metrics: {error}"]
        if candidate is not None:
            quality = DataQuality.from_version_tags(version.tags)
            if quality.success is None and version.run_id:
                run = find_run(client, version.run_id)
                if run is not None:
                    quality = data_quality_verdict(client, run, summary_path, lock_path or DVC_LOCK)
            base_similarity = as_float(version.tags.get(f"{Tags.BASE_PREFIX}similarity_mean"))
            limits = Limits.for_base(base_similarity, config.promote)
            if base_similarity != base_similarity:  # no base similarity recorded on it: no floor to apply
                limits = replace(limits, similarity_floor=float("-inf"))
            incumbent = None
            if production is not None:
                try:
                    incumbent = Candidate.from_version_tags(production.tags, str(production.version))
                except TonetuneError:
                    incumbent = None  # a Production version without metrics tags: nothing to compare
            refusals = gate(candidate, quality.success, quality.source, incumbent, limits)
        if refusals and not force:
            return Outcome("refused", f"promotion of {name} v{version.version} refused: " + "; ".join(refusals), exit_code=1)
        how = promotion_tags("version" if not force else "forced", force, reason, refusals)
        label = describe(candidate) if candidate else f"version {version.version}"
        return finish_promotion(client, name, version, False, {}, how, label, [])


def rollback(config: Config) -> Outcome:
    """Move `production` back to `previous`, and `previous` to the one before it (history tag)."""
    name = config.promote.registered_model_name
    client = open_client(config.tracking)
    with promotion_lock(tracking_uri(config.tracking)):
        old, new, before, note = roll_back(client, name)
    after = f"; {PREVIOUS} is now v{before}" if before else f"; no {PREVIOUS} version before it"
    message = f"rolled back {name}: {PRODUCTION} v{old} -> v{new}{after}" + (f"\n{note}" if note else "")
    return Outcome("rolled-back", message, new)


# --------------------------------------------------------------------------- CLI


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `python -m registry.promote` and `python -m registry promote` share."""
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses (needs --reason)")
    parser.add_argument("--reason", help="why the gate is overridden (recorded on the version and in its model card)")
    parser.add_argument("--metrics-dir", type=Path, default=EVAL_DIR, help="per-model metrics JSON files")
    parser.add_argument("--data-quality", type=Path, default=DATA_QUALITY_PATH, help="validate's summary JSON")


def report(outcome: Outcome) -> int:
    """Print an outcome (refusals on stderr) and return its exit code."""
    stream = sys.stderr if outcome.exit_code else sys.stdout
    prefix = "promote: " if outcome.action != "rolled-back" else ""
    print(prefix + outcome.message, file=stream)
    return outcome.exit_code


def run_promote(args: argparse.Namespace) -> int:
    """Promote by policy (no VERSION) or a given version; print what happened."""
    config = load_config()
    version = getattr(args, "version", None)
    if version:
        if not str(version).isdigit():
            raise TonetuneError(f"VERSION must be a version number, got {version!r}")
        outcome = promote_version(config, str(version), args.data_quality, force=args.force, reason=args.reason)
    else:
        outcome = promote_best(config, args.metrics_dir, args.data_quality, force=args.force, reason=args.reason)
    return report(outcome)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m registry.promote",
        description="Stage promote: register the best adapter of metrics/eval and set alias production "
        "(policy: max %% conversational; guards: similarity >= base - promote.similarity_tolerance, repetition "
        "rate <= promote.max_repetition_rate, %% ended turn >= promote.min_stopped_pct; ties: fewer samples, "
        "smaller r). Exit 0 promoted or nothing to do, 1 refused by the gate, 2 bad input.",
    )
    add_promote_arguments(parser)
    sys.exit(run_promote(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
