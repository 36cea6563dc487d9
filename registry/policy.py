"""The promotion decision as pure functions: test-set evidence in, an outcome and its record out.

The rule itself (the finalist on validation, the paired one-sided bounds against the base on the
test set, the exact McNemar test against the current Production version) is
pipeline.core.decision, shared with the `heldout` stage that computes the evidence. This module
owns what promotion adds on top: what a candidate is (`Candidate`, from a metrics/eval record or a
version's tags), the `Decision` that combines the checks against the base, the challenge against
Production and the data-quality gate into one outcome, and the flat tags that record it on a model
version and on the finalist's training run. No MLflow import, no I/O.

Outcomes: `promote` (every check passed, and it beats Production if there is one), `refuse` (a
check failed with its estimate on the wrong side), `inconclusive` (every failed check has its
estimate on the passing side: more test questions could show it), `kept` (it passes against the
base but does not beat the current Production version significantly: no churn), and
`data_quality` refusals (the gate did not pass for its data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.contracts import Tags
from pipeline.core.decision import INCONCLUSIVE, PROMOTE, REFUSE, Check, verdict
from pipeline.core.errors import TonetuneError

KEPT = "kept"
DATA_QUALITY = "data_quality"

DEFAULT_TONE = "conversational"  # the tone of every version registered before tones existed
TONE_TAG = "tone"  # the version tag naming its tone (pipeline.core.tone.tone_tags)


def tone_of(tags: dict[str, str]) -> str:
    """The tone a version (or run) was evaluated for: its `tone` tag, else the default tone's."""
    return tags.get(TONE_TAG) or DEFAULT_TONE


def as_float(value: Any, default: float = float("nan")) -> float:
    """A metric as float; None / text that is not a number -> `default`."""
    try:
        return default if value is None else float(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class Candidate:
    """One adapter's validation evaluation, as recorded (metrics/eval or a version's tags)."""

    model: str
    run_id: str | None
    pct_on_style: float  # the tone's pct_<name> (pct_conversational for the default tone)
    similarity_mean: float
    n_train: int
    lora_r: int
    repetition_rate: float = float("nan")
    stopped_pct: float = float("nan")
    tone: str = "conversational"
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any], tone_name: str = DEFAULT_TONE) -> Candidate:
        """From a metrics/eval/<model>.json record (pipeline.core.evalmetrics.metrics_record)."""
        return cls(
            model=str(record["model"]),
            run_id=record.get("mlflow_run_id"),
            pct_on_style=as_float(record.get(f"pct_{tone_name}")),
            tone=tone_name,
            similarity_mean=as_float(record.get("similarity_mean")),
            n_train=int(as_float(record.get("n_train"), default=0)),
            lora_r=int(as_float(record.get("lora_r"), default=0)),
            repetition_rate=as_float(record.get("repetition_rate")),
            stopped_pct=as_float(record.get("stopped_pct")),
            record=record,
        )

    @classmethod
    def from_version_tags(cls, tags: dict[str, str], version: str) -> Candidate:
        """From the tags promotion wrote on a model version (`metric.*`, `param.*`). A version
        without a `tone` tag (registered before tones existed) is the default tone's."""
        tone_name = tags.get(TONE_TAG) or DEFAULT_TONE
        if f"{Tags.METRIC_PREFIX}pct_{tone_name}" not in tags:
            raise TonetuneError(
                f"version {version} has no tonetune metric tags (registered outside `registry promote`?): "
                "promote it with --force --reason TEXT"
            )
        record: dict[str, Any] = {
            key.removeprefix(Tags.METRIC_PREFIX): as_float(value) for key, value in tags.items() if key.startswith(Tags.METRIC_PREFIX)
        }
        record.update({key.removeprefix(Tags.PARAM_PREFIX): value for key, value in tags.items() if key.startswith(Tags.PARAM_PREFIX)})
        record["model"] = tags.get(Tags.EVAL_MODEL, f"version {version}")
        record["mlflow_run_id"] = tags.get(Tags.TRAINING_RUN_ID)
        return cls.from_record(record, tone_name)


def describe(candidate: Candidate) -> str:
    """`name (62.0% conversational on validation, n=150, r=32)` for messages."""
    return (f"{candidate.model} ({candidate.pct_on_style:.1f}% {candidate.tone.replace('_', ' ')} on validation, "
            f"n={candidate.n_train}, r={candidate.lora_r})")


@dataclass(frozen=True)
class Decision:
    """Everything the rule said about one finalist."""

    finalist: str
    checks: tuple[Check, ...]  # against the base
    challenge: Check | None = None  # against the current Production version (None: there is none)
    incumbent: str | None = None  # `v<N> (<model>)` of that version
    data_quality: str | None = None  # the gate's refusal line (None: it passed)

    @property
    def against_base(self) -> str:
        return verdict(self.checks)

    @property
    def outcome(self) -> str:
        """promote / refuse / inconclusive / kept / data_quality (in that order of precedence,
        except that a data-quality refusal overrides everything)."""
        if self.data_quality:
            return DATA_QUALITY
        if self.against_base != PROMOTE:
            return self.against_base
        if self.challenge is not None and not self.challenge.passed:
            return KEPT
        return PROMOTE

    def refusals(self) -> list[str]:
        """One line per reason not to promote (empty: promote)."""
        lines = [self.data_quality] if self.data_quality else []
        lines += [check.describe() for check in self.checks if not check.passed]
        if self.challenge is not None and not self.challenge.passed:
            lines.append(self.challenge.describe())
        return lines

    def lines(self) -> list[str]:
        """Every check, passed or not, for the console and the card."""
        shown = [check.describe() for check in self.checks]
        if self.challenge is not None:
            shown.append(self.challenge.describe())
        if self.data_quality:
            shown.append(self.data_quality)
        return shown


def decision_tags(decision: Decision, heldout: dict[str, Any], numerics: dict[str, Any]) -> dict[str, Any]:
    """The flat `decision.*` tags of one decision (version and training run): the verdict, every
    check's estimate, bound and limit, n, the test set's md5, the rule and its declaring commit,
    the seed, the power, and the machine the test answers were decoded on."""
    tags: dict[str, Any] = {
        Tags.decision("outcome"): decision.outcome,
        Tags.decision("against_base"): decision.against_base,
        Tags.decision("finalist"): decision.finalist,
        Tags.decision("finalist_reason"): heldout.get("finalist_reason"),
        Tags.decision("n_test"): heldout.get("n_test"),
        Tags.decision("test_md5"): heldout.get("test_md5"),
        Tags.decision("rule"): heldout.get("rule_text"),
        Tags.decision("declared_in"): heldout.get("declared_in"),
        Tags.decision("declared_at"): heldout.get("declared_at"),
        Tags.decision("seed"): heldout.get("seed"),
        Tags.decision("bootstrap_samples"): heldout.get("bootstrap_samples"),
        **{Tags.decision(f"power.{key}"): round(value, 4) if isinstance(value, float) else value
           for key, value in (heldout.get("power") or {}).items()},
        **{Tags.decision(f"machine.{key}"): value for key, value in numerics.items()},
    }
    for check in (*decision.checks, *([decision.challenge] if decision.challenge else [])):
        for key in ("estimate", "bound", "limit"):
            tags[Tags.decision(f"{check.name}.{key}")] = round(getattr(check, key), 4)
        tags[Tags.decision(f"{check.name}.passed")] = str(check.passed).lower()
    if decision.incumbent:
        tags[Tags.decision("incumbent")] = decision.incumbent
    return tags


def data_quality_refusal(success: bool | None, source: str) -> str | None:
    """The gate's refusal line when the data-quality check did not pass for the finalist's data."""
    if success is True:
        return None
    state = "FAILED" if success is False else "has no evidence"
    return f"{DATA_QUALITY}: the data-quality gate {state} for its data ({source})"


def refusal_name(refusal: str) -> str:
    """The check or gate a refusal line names (`data_quality: ...` -> `data_quality`)."""
    return refusal.split(":", 1)[0].split(" ", 1)[0]


def check_force(force: bool, reason: str | None) -> None:
    """--force needs --reason (it is recorded on the version)."""
    if force and not (reason and reason.strip()):
        raise TonetuneError("--force needs --reason TEXT (the reason is recorded as a tag on the version)")
    if reason and not force:
        raise TonetuneError("--reason is only used with --force")


__all__ = ["INCONCLUSIVE", "KEPT", "PROMOTE", "REFUSE", "Candidate", "Decision", "as_float", "check_force",
           "data_quality_refusal", "decision_tags", "describe", "refusal_name"]
