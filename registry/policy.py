"""The promotion policy as pure functions: candidates and guard limits in, a decision out.

Owns: what a candidate is (`Candidate`, from a metrics/eval record or a version's tags), the
guards (`Limits`, `check_guards`), the ranking (`policy_key`, `rank`, `is_better`), the gate that
lists every refusal (`gate`) and the one-line texts that explain them. Does not own: reading
files or the store (registry/evidence.py), writing the registry (registry/store.py), the model
card (registry/card.py) or the order of operations (registry/promote.py). No MLflow import, no
I/O: every rule here can be tested with plain values.

The policy:

1. guards, each reported for every candidate (an adapter must pass all of them):
   - similarity_guard: mean similarity to the reference answers at most
     `promote.similarity_tolerance` below the base model's (a tone that loses the content is not
     an improvement);
   - degeneration_guard: mean share of repeated 4-grams per answer (`repetition_rate`) at most
     `promote.max_repetition_rate`, and % of answers that ended their turn (`stopped_pct`) at
     least `promote.min_stopped_pct` (a model that loops or rambles to the token cap is refused
     however conversational its Flesch score); a metric that was not measured fails the guard;
2. primary: the highest % conversational answers (Flesch >= evaluate.conversational_threshold);
3. tie-breaks: fewer training samples (cheaper data), then a smaller LoRA r (smaller adapter),
   then the model name, so the choice is deterministic.

A candidate replaces the Production version only if strictly better under 2-3 (equal keeps the
incumbent: no churn) and only if the data-quality gate passed for its data (`gate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError

SIMILARITY_GUARD = "similarity_guard"
DEGENERATION_GUARD = "degeneration_guard"
DATA_QUALITY = "data_quality"
BETTER_THAN_PRODUCTION = "better_than_production"
POLICY_TEXT = (
    "max % conversational; guards: similarity >= base similarity - {tolerance}, repetition rate <= "
    "{max_repetition_rate}, ended their turn >= {min_stopped_pct}%; ties: fewer training samples, then smaller LoRA r"
)


def as_float(value: Any, default: float = float("nan")) -> float:
    """A metric as float; None / text that is not a number -> `default`."""
    try:
        return default if value is None else float(value)
    except (TypeError, ValueError):
        return default


def _nan(value: float) -> bool:
    return value != value


@dataclass(frozen=True)
class Candidate:
    """One adapter's evaluation, as the policy sees it."""

    model: str
    run_id: str | None
    pct_conversational: float
    similarity_mean: float
    n_train: int
    lora_r: int
    repetition_rate: float = float("nan")
    stopped_pct: float = float("nan")
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Candidate:
        """From a metrics/eval/<model>.json record (pipeline.core.evalmetrics.metrics_record)."""
        return cls(
            model=str(record["model"]),
            run_id=record.get("mlflow_run_id"),
            pct_conversational=as_float(record.get("pct_conversational")),
            similarity_mean=as_float(record.get("similarity_mean")),
            n_train=int(as_float(record.get("n_train"), default=0)),
            lora_r=int(as_float(record.get("lora_r"), default=0)),
            repetition_rate=as_float(record.get("repetition_rate")),
            stopped_pct=as_float(record.get("stopped_pct")),
            record=record,
        )

    @classmethod
    def from_version_tags(cls, tags: dict[str, str], version: str) -> Candidate:
        """From the tags promotion wrote on a model version (`metric.*`, `param.*`)."""
        if f"{Tags.METRIC_PREFIX}pct_conversational" not in tags:
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
        return cls.from_record(record)


@dataclass(frozen=True)
class Limits:
    """The guards' limits for one evaluation round."""

    similarity_floor: float
    max_repetition_rate: float
    min_stopped_pct: float

    @classmethod
    def for_base(cls, base_similarity: float, promote_config) -> Limits:
        """Limits from the base model's similarity and params' promote section."""
        return cls(similarity_floor(base_similarity, promote_config.similarity_tolerance),
                   promote_config.max_repetition_rate, promote_config.min_stopped_pct)

    def describe(self) -> str:
        """`similarity >= 0.570; repetition rate <= 0.10; ended turn >= 50%` for messages."""
        return (f"similarity >= {self.similarity_floor:.3f}; repetition rate <= {self.max_repetition_rate:.2f}; "
                f"ended their turn >= {self.min_stopped_pct:g}%")


@dataclass(frozen=True)
class GuardResult:
    """One guard applied to one candidate: `detail` says the numbers and the limit."""

    guard: str
    passed: bool
    detail: str

    def refusal(self) -> str:
        """`<guard>: <detail>`, the one-line reason a refusal names."""
        return f"{self.guard}: {self.detail}"


def similarity_floor(base_similarity: float, tolerance: float) -> float:
    """The lowest similarity an adapter may have and still be eligible."""
    return base_similarity - tolerance


def similarity_guard(candidate: Candidate, limits: Limits) -> GuardResult:
    """Similarity to the reference answers against the floor (NaN never passes)."""
    similarity, floor = candidate.similarity_mean, limits.similarity_floor
    if _nan(similarity):
        return GuardResult(SIMILARITY_GUARD, False, "no similarity_mean recorded")
    if _nan(candidate.pct_conversational):
        return GuardResult(SIMILARITY_GUARD, False, "no pct_conversational recorded")
    if similarity >= floor:
        return GuardResult(SIMILARITY_GUARD, True, f"similarity {similarity:.3f} >= floor {floor:.3f}")
    return GuardResult(SIMILARITY_GUARD, False, f"similarity {similarity:.3f} is below the similarity floor {floor:.3f}")


def degeneration_guard(candidate: Candidate, limits: Limits) -> GuardResult:
    """Repetition rate <= max and % ended turn >= min; an unmeasured metric fails."""
    problems, fine = [], []
    repetition, stopped = candidate.repetition_rate, candidate.stopped_pct
    if _nan(repetition):
        problems.append("repetition_rate not measured")
    elif repetition > limits.max_repetition_rate:
        problems.append(f"repetition rate {repetition:.3f} is above promote.max_repetition_rate {limits.max_repetition_rate:.2f} (it loops)")
    else:
        fine.append(f"repetition rate {repetition:.3f} <= {limits.max_repetition_rate:.2f}")
    if _nan(stopped):
        problems.append("stopped_pct (answers that ended their turn) not measured")
    elif stopped < limits.min_stopped_pct:
        problems.append(f"{stopped:.1f}% of answers ended their turn, below promote.min_stopped_pct {limits.min_stopped_pct:g}%")
    else:
        fine.append(f"{stopped:.1f}% ended their turn >= {limits.min_stopped_pct:g}%")
    if problems:
        return GuardResult(DEGENERATION_GUARD, False, "; ".join(problems))
    return GuardResult(DEGENERATION_GUARD, True, ", ".join(fine))


GUARDS = (similarity_guard, degeneration_guard)


def check_guards(candidate: Candidate, limits: Limits) -> list[GuardResult]:
    """Every guard's result for one candidate, in a fixed order."""
    return [guard(candidate, limits) for guard in GUARDS]


def is_eligible(candidate: Candidate, limits: Limits) -> bool:
    """Passes every guard."""
    return all(result.passed for result in check_guards(candidate, limits))


def policy_key(candidate: Candidate) -> tuple:
    """Smaller is better: more % conversational, then fewer samples, then smaller r."""
    return (-candidate.pct_conversational, candidate.n_train, candidate.lora_r)


def is_better(candidate: Candidate, incumbent: Candidate) -> bool:
    """Strictly better under the policy (equal keys keep the incumbent: no churn)."""
    return policy_key(candidate) < policy_key(incumbent)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Best first (policy key, then name for a deterministic order)."""
    return sorted(candidates, key=lambda c: (*policy_key(c), c.model))


def describe(candidate: Candidate) -> str:
    """`name (62.0% conversational, similarity 0.712, n=150, r=32)` for messages."""
    return (
        f"{candidate.model} ({candidate.pct_conversational:.1f}% conversational, similarity "
        f"{candidate.similarity_mean:.3f}, n={candidate.n_train}, r={candidate.lora_r})"
    )


def guard_report(candidates: list[Candidate], limits: Limits, forced: str | None = None) -> list[str]:
    """One line per candidate, best first: its numbers and every guard's verdict (`forced`: the
    model a forced promotion took in spite of its guards, marked as such)."""
    lines = [f"guards ({limits.describe()}):"]
    for candidate in rank(candidates):
        results = check_guards(candidate, limits)
        failed = [r.guard for r in results if not r.passed]
        verdict = "eligible" if not failed else "NOT eligible"
        if failed and candidate.model == forced:
            verdict += f", promoted by --force (overrode {', '.join(failed)})"
        shown = "; ".join(f"{r.guard} {'ok' if r.passed else 'FAIL'}: {r.detail}" for r in results)
        lines.append(f"  {candidate.model}: {candidate.pct_conversational:.1f}% conversational -> {verdict} ({shown})")
    return lines


def gate(candidate: Candidate, data_quality_success: bool | None, data_quality_source: str,
         incumbent: Candidate | None, limits: Limits) -> list[str]:
    """Every refusal that applies to promoting `candidate`, one line each, each starting with the
    name of what refuses (empty: it may be promoted)."""
    refusals = []
    if data_quality_success is not True:
        verdict = "FAILED" if data_quality_success is False else "has no evidence"
        refusals.append(f"{DATA_QUALITY}: the data-quality gate {verdict} for its data ({data_quality_source})")
    refusals += [result.refusal() for result in check_guards(candidate, limits) if not result.passed]
    if incumbent is not None and not is_better(candidate, incumbent):
        refusals.append(f"{BETTER_THAN_PRODUCTION}: not better than Production {describe(incumbent)}")
    return refusals


def refusal_name(refusal: str) -> str:
    """The guard or gate a refusal line names (`similarity_guard: ...` -> `similarity_guard`)."""
    return refusal.split(":", 1)[0]


def check_force(force: bool, reason: str | None) -> None:
    """--force needs --reason (it is recorded on the version)."""
    if force and not (reason and reason.strip()):
        raise TonetuneError("--force needs --reason TEXT (the reason is recorded as a tag on the version)")
    if reason and not force:
        raise TonetuneError("--reason is only used with --force")
