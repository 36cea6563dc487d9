"""Stage `promote`: put the finalist in the MLflow registry as the Production model, if the rule says so.

    python -m registry.promote                          # the DVC stage (after `heldout` and `report`)
    python -m registry promote [VERSION] [--force --reason TEXT]
    python -m registry rollback

Owns the order of operations (`promote_best`, `promote_version`, `rollback`) and the CLI: read the
evidence, apply the rule, write the store, print one outcome. Does not own the rule
(pipeline.core.decision, with registry/policy.py combining its parts into one outcome), the
evidence and version tags (registry/evidence.py), the model card (registry/card.py) or the
registry writes and the lock (registry/store.py).

The stage reads the heldout stage's evidence (reports/heldout: the one finalist chosen on
validation, and its per-question test scores beside the base's) and decides by the declared rule:
the paired one-sided bounds against the base must clear their margins, and, when a Production
version exists, the finalist must be on-style significantly more often than it on the same test
questions (exact McNemar). The Production version answers those questions through its registered
model, once: the answers are cached in reports/incumbents/, so a re-run with nothing changed
decodes nothing and decides the same. The data-quality gate must have passed for the finalist's
data. Every decision (promoted or not) is written to metrics/promotion.json and as `decision.*`
tags on the finalist's training run; a promoted version carries them too, with its model card.

`--force --reason TEXT` overrides a refusal; the reason and each overridden refusal are recorded as
version tags and in the model card. Versions that were rolled back are skipped by the stage (else
`dvc repro` would undo the rollback); promote them explicitly by number.

Exit codes: 0 promoted, or nothing to do (already Production, kept, refused or inconclusive by the
rule: "NOT PROMOTED" with the numbers); 1 refused by the data-quality gate, or an explicit VERSION
refused; 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import HELDOUT_DIR, METRICS_DIR, Config, load_config
from pipeline.core.contracts import Tags
from pipeline.core.decision import (
    PROMOTE,
    VERDICT_CODES,
    Rule,
    challenge,
    checks_against_base,
    verdict,
)
from pipeline.core.dvcmeta import DVC_LOCK
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import write_json
from pipeline.core.machine import numerics_facts
from pipeline.core.tracking import find_run, open_client, tracking_uri
from registry.card import model_card
from registry.evidence import (
    DATA_QUALITY_PATH,
    EVAL_DIR,
    DataQuality,
    Heldout,
    clean_tags,
    data_quality_verdict,
    incumbent_scores,
    load_eval_records,
    read_heldout,
    version_tags,
)
from registry.policy import (
    DATA_QUALITY,
    KEPT,
    Candidate,
    Decision,
    check_force,
    data_quality_refusal,
    decision_tags,
    describe,
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
    set_run_tags,
    set_tags,
    version_by_alias,
)


@dataclass(frozen=True)
class Outcome:
    """What an operation did, for the CLI: `action` promoted/noop/kept/not-promoted/refused/rolled-back."""

    action: str
    message: str
    version: str | None = None
    exit_code: int = 0


PROMOTION_METRICS_PATH = METRICS_DIR / "promotion.json"
OUTCOME_CODES = {**VERDICT_CODES, KEPT: 0, DATA_QUALITY: -1}


def finalist_candidate(client, name: str, candidates: list[Candidate], finalist: str):
    """(the finalist's candidate, its training run) or a TonetuneError saying why it cannot be
    registered; a rolled-back finalist is None (promote it by number to restore it)."""
    candidate = next((c for c in candidates if c.model == finalist), None)
    if candidate is None:
        raise TonetuneError(f"{EVAL_DIR}: no validation metrics for the finalist {finalist}: re-run `dvc repro score`")
    if not candidate.run_id:
        raise TonetuneError(f"{finalist}: no MLflow run recorded with its metrics (re-run `dvc repro score`)")
    run = find_run(client, candidate.run_id)
    if run is None:
        raise TonetuneError(f"{finalist}: run {candidate.run_id} is not in this tracking store")
    if not has_model(run):
        raise TonetuneError(f"{finalist}: run {candidate.run_id} has no logged adapter model")
    if candidate.run_id in rolled_back_runs(client, name):
        return candidate, None
    return candidate, run


def write_promotion_metrics(decision: Decision, heldout: Heldout, path: Path = PROMOTION_METRICS_PATH) -> None:
    """metrics/promotion.json: the decision as scalars, first in `dvc exp show`."""
    values: dict[str, float | int] = {"decision": OUTCOME_CODES[decision.outcome], "n_test": heldout.base.n}
    for check in (*decision.checks, *([decision.challenge] if decision.challenge else [])):
        values[f"{check.name}_estimate"] = round(check.estimate, 4)
        values[f"{check.name}_bound"] = round(check.bound, 4)
    write_json(path, values)


def decision_summary(decision: Decision, heldout: Heldout) -> list[str]:
    """The lines every stage outcome prints: the finalist, the rule, each check."""
    record = heldout.record
    return [f"  finalist {decision.finalist} ({record.get('finalist_reason')}); {heldout.base.n} test questions, "
            f"rule declared in {str(record.get('declared_in'))[:12]}",
            *(f"  {line}" for line in decision.lines())]


def promote_best(config: Config, eval_dir: Path = EVAL_DIR, summary_path: Path = DATA_QUALITY_PATH,
                 lock_path: Path | None = None, force: bool = False, reason: str | None = None,
                 heldout_dir: Path = HELDOUT_DIR) -> Outcome:
    """The DVC stage: decide on the heldout stage's finalist by the rule, and act on the decision."""
    check_force(force, reason)
    name = config.promote.registered_model_name
    rule = Rule.from_config(config.promote)
    heldout = read_heldout(heldout_dir)
    base, candidates = load_eval_records(eval_dir, config.tone.name)
    checks = tuple(checks_against_base(heldout.finalist, heldout.base, rule))
    client = open_client(config.tracking)
    numerics = numerics_facts()
    with promotion_lock(tracking_uri(config.tracking)):
        candidate, run = finalist_candidate(client, name, candidates, heldout.record["finalist"])
        if run is None:
            return Outcome("not-promoted", f"NOT PROMOTED: the finalist {candidate.model}'s version was rolled back "
                           "(promote it by number to restore it); production is unchanged")
        production = version_by_alias(client, name, PRODUCTION)
        if production is not None and (production.tags.get(Tags.TRAINING_RUN_ID) or production.run_id) == run.info.run_id:
            decision = Decision(candidate.model, checks)
            write_promotion_metrics(decision, heldout)
            message = f"{name} v{production.version} ({candidate.model}) is already production: nothing to do"
            return Outcome("noop", "\n".join([message, *decision_summary(decision, heldout)]), str(production.version))
        challenge_check, incumbent = None, None
        if production is not None and verdict(checks) == PROMOTE:
            incumbent = f"v{production.version} ({production.tags.get(Tags.EVAL_MODEL, '-')})"
            challenge_check = challenge(heldout.finalist,
                                        incumbent_scores(name, str(production.version), heldout, config, numerics), rule)
        quality = data_quality_verdict(client, run, summary_path, lock_path or DVC_LOCK)
        decision = Decision(candidate.model, checks, challenge_check, incumbent,
                            data_quality_refusal(quality.success, quality.source))
        tags = decision_tags(decision, heldout.record, numerics)
        set_run_tags(client, run.info.run_id, clean_tags(tags))
        write_promotion_metrics(decision, heldout)
        lines = decision_summary(decision, heldout)
        outcome = decision.outcome
        if outcome != PROMOTE and not force:
            if outcome == DATA_QUALITY:
                return Outcome("refused", "\n".join([f"promotion of {describe(candidate)} refused: "
                                                     + decision.data_quality, *lines]), exit_code=1)
            if outcome == KEPT:
                return Outcome("kept", "\n".join([f"kept {name} {incumbent}: {candidate.model} does not beat it "
                                                  "significantly on the test set", *lines]), str(production.version))
            return Outcome("not-promoted", "\n".join([
                f"NOT PROMOTED ({outcome}): {candidate.model} against the base on {heldout.base.n} test questions; "
                "production is unchanged (to override the rule: python -m registry promote --force --reason TEXT)",
                *lines]))
        version_record = version_tags(candidate, base, run, quality, config, tags)
        version, created = register_once(client, name, run, version_record)
        how = promotion_tags("forced" if force else "policy", force, reason, decision.refusals())
        return finish_promotion(client, name, version, created, version_record, how, describe(candidate), lines)


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
    """`registry promote VERSION`: an existing version, a person's choice (a rollback target, an
    earlier winner). Checked against what is on record for it: the data-quality gate, and the
    outcome the rule recorded when it was decided (`decision.outcome` promote); otherwise refused
    unless forced."""
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
            refusal = data_quality_refusal(quality.success, quality.source)
            refusals += [refusal] if refusal else []
            recorded = version.tags.get(Tags.decision("outcome"))
            if recorded != PROMOTE:
                refusals.append(f"decision: the rule's recorded outcome for v{version.version} is "
                                f"{recorded or 'missing (decided before the test-set rule)'}, not promote")
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
    parser.add_argument("--heldout-dir", type=Path, default=HELDOUT_DIR,
                        help="the heldout stage's test-set evidence (decision.json, per-question scores)")


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
        outcome = promote_best(config, args.metrics_dir, args.data_quality, force=args.force, reason=args.reason,
                               heldout_dir=args.heldout_dir)
    return report(outcome)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m registry.promote",
        description="Stage promote: decide on the heldout stage's finalist by the declared rule (params: promote.*; "
        "paired one-sided bounds on the test set against the base, exact McNemar against the current production "
        "version) and, if it says promote, register it and set alias production. Exit 0 promoted or nothing to "
        "do (kept, refused or inconclusive by the rule), 1 refused by the data-quality gate, 2 bad input.",
    )
    add_promote_arguments(parser)
    sys.exit(run_promote(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
