"""The promotion rule as pure functions: per-question scores on the test set in, a decision out.

Shared by the `heldout` stage (which computes the finalist's evidence against the base) and the
registry (which adds the challenge against the current Production version and acts). The rule,
with the values declared in params.yaml `promote` (docs/evaluation.md says why each value):

1. The finalist is chosen on validation, never on test (`choose_finalist`): the adapter with the
   highest % on-style among those whose validation degeneration and content are within the
   declared limits (if none is, the highest % on-style; the test set then decides).
2. On the test set, paired by question, the finalist against the base (`checks_against_base`),
   each a one-sided (1 - alpha) bound, never a point estimate:
   - style: lower bound of the mean gain in on-style answers (candidate minus base, per question,
     in points) >= `min_style_gain`;
   - content: lower bound of the mean difference in the content metric (similarity to the factual
     answer by default) >= -`content_margin` (non-inferiority);
   - degeneration: upper bound of the mean repeated-4-gram rate <= `max_repetition_rate`, and the
     exact lower bound of the share that ended their turn >= `min_stopped_pct`.
3. Against the current Production version, on the same test questions (`challenge`): the exact
   one-sided McNemar test on on-style answers must reject at `alpha`; otherwise the incumbent stays.

A verdict (`verdict`): `promote` when every check passes; `refuse` when a check fails with its
point estimate on the failing side of its limit; `inconclusive` when every failed check has its
point estimate on the passing side (more questions could show it). Ties and equal results keep the
incumbent: no churn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.core.errors import TonetuneError
from pipeline.core.pairedstats import mcnemar_greater, mean_bound, power, proportion_bound, required_n

PROMOTE, REFUSE, INCONCLUSIVE = "promote", "refuse", "inconclusive"
VERDICT_CODES = {PROMOTE: 1, INCONCLUSIVE: 0, REFUSE: -1}  # as scalars in DVC metrics files
STYLE, CONTENT, LOOPS, ENDED_TURN, BEATS_PRODUCTION = (
    "style_gain", "content_non_inferiority", "repetition", "ended_turn", "beats_production",
)
CONTENT_METRICS = {"content_similarity": "similarity to the factual answer",
                   "similarity": "similarity to the conversational reference (the paper's)"}
PER_QUESTION_COLUMNS = ("id", "on_style", "similarity", "content_similarity", "repetition_rate", "stopped")


@dataclass(frozen=True)
class Rule:
    """The declared rule (params.yaml `promote`): margins, level, power target, resampling."""

    min_style_gain: float  # percentage points of on-style answers the finalist must add, at least
    content_margin: float  # the content metric may fall at most this far below the base's
    content_metric: str
    alpha: float  # one-sided level of every bound and test
    power: float  # the power the test set is sized for
    max_repetition_rate: float
    min_stopped_pct: float
    bootstrap_samples: int
    seed: int

    @classmethod
    def from_config(cls, promote) -> Rule:
        return cls(promote.min_style_gain, promote.content_margin, promote.content_metric, promote.alpha,
                   promote.power, promote.max_repetition_rate, promote.min_stopped_pct,
                   promote.bootstrap_samples, promote.seed)

    def declared(self) -> dict[str, Any]:
        """The values that must not change after the first test prediction (seed and resampling
        count excluded: the decision must not depend on them)."""
        values = asdict(self)
        values.pop("seed")
        values.pop("bootstrap_samples")
        return values

    def describe(self) -> str:
        return (f"one-sided {100 * (1 - self.alpha):g}% bounds, paired by question: style gain >= "
                f"{self.min_style_gain:g} points; {self.content_metric} >= base - {self.content_margin:g}; "
                f"repetition <= {self.max_repetition_rate:g}; ended turn >= {self.min_stopped_pct:g}%; "
                f"vs Production: exact McNemar p < {self.alpha:g}")


@dataclass(frozen=True)
class Scores:
    """One model's per-question scores on the test set, in question-id order."""

    model: str
    ids: tuple[str, ...]
    on_style: np.ndarray
    similarity: np.ndarray
    content_similarity: np.ndarray
    repetition_rate: np.ndarray
    stopped: np.ndarray

    @classmethod
    def from_frame(cls, model: str, frame) -> Scores:
        """From a scored test table (columns PER_QUESTION_COLUMNS), sorted by id."""
        missing = [c for c in PER_QUESTION_COLUMNS if c not in frame.columns]
        if missing:
            raise TonetuneError(f"scores of {model}: missing column(s) {missing}")
        frame = frame.sort_values("id", kind="stable")
        return cls(model, tuple(frame["id"].astype(str)), frame["on_style"].to_numpy(dtype=bool),
                   frame["similarity"].to_numpy(dtype=float), frame["content_similarity"].to_numpy(dtype=float),
                   frame["repetition_rate"].to_numpy(dtype=float), frame["stopped"].to_numpy(dtype=bool))

    def metric(self, name: str) -> np.ndarray:
        return getattr(self, name)

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Check:
    """One comparison: its point estimate, its one-sided bound, the limit the bound must clear."""

    name: str
    estimate: float
    bound: float
    limit: float
    higher_is_better: bool
    detail: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.bound):
            return False
        return self.bound >= self.limit if self.higher_is_better else self.bound <= self.limit

    @property
    def estimate_passes(self) -> bool:
        """The point estimate is on the passing side (a failure is then 'not shown', not 'worse')."""
        return self.estimate >= self.limit if self.higher_is_better else self.estimate <= self.limit

    @property
    def distance(self) -> float:
        """How far the bound sits from its limit, positive on the passing side."""
        return (self.bound - self.limit) if self.higher_is_better else (self.limit - self.bound)

    def describe(self) -> str:
        if self.name == BEATS_PRODUCTION:
            return f"{self.name} {'PASS' if self.passed else 'not shown'}: {self.detail.rstrip('; ')}"
        relation = ">=" if self.higher_is_better else "<="
        state = "PASS" if self.passed else ("not shown" if self.estimate_passes else "FAIL")
        return (f"{self.name} {state}: {self.detail}estimate {self.estimate:+.3f}, bound {self.bound:+.3f} "
                f"(needs {relation} {self.limit:+.3f}; {self.distance:+.3f} from it)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "estimate": self.estimate, "bound": self.bound, "limit": self.limit,
                "higher_is_better": self.higher_is_better, "passed": self.passed, "distance": self.distance,
                "detail": self.detail}


def check_paired(candidate: Scores, reference: Scores) -> None:
    """Both models answered exactly the same test questions."""
    if candidate.ids != reference.ids:
        raise TonetuneError(f"{candidate.model} and {reference.model} were not scored on the same test questions "
                            f"({candidate.n} vs {reference.n}): re-run `dvc repro heldout`")


def checks_against_base(candidate: Scores, base: Scores, rule: Rule, seed: int | None = None) -> list[Check]:
    """The four checks of the finalist against the base, paired by question (rule item 2)."""
    check_paired(candidate, base)
    seed = rule.seed if seed is None else seed
    gain = 100.0 * (candidate.on_style.astype(float) - base.on_style.astype(float))
    content = candidate.metric(rule.content_metric) - base.metric(rule.content_metric)
    style = Check(STYLE, float(gain.mean()), mean_bound(gain, rule.alpha, "lower", rule.bootstrap_samples, seed),
                  rule.min_style_gain, True,
                  f"on-style {100 * candidate.on_style.mean():.1f}% vs base {100 * base.on_style.mean():.1f}%; ")
    non_inferior = Check(CONTENT, float(np.nanmean(content)),
                         mean_bound(content, rule.alpha, "lower", rule.bootstrap_samples, seed), -rule.content_margin,
                         True, f"{rule.content_metric} {np.nanmean(candidate.metric(rule.content_metric)):.3f} vs base "
                         f"{np.nanmean(base.metric(rule.content_metric)):.3f}; ")
    loops = Check(LOOPS, float(np.nanmean(candidate.repetition_rate)),
                  mean_bound(candidate.repetition_rate, rule.alpha, "upper", rule.bootstrap_samples, seed),
                  rule.max_repetition_rate, False, "mean repeated-4-gram rate; ")
    ended = int(candidate.stopped.sum())
    turn = Check(ENDED_TURN, 100.0 * ended / candidate.n, 100.0 * proportion_bound(ended, candidate.n, rule.alpha, "lower"),
                 rule.min_stopped_pct, True, f"{ended}/{candidate.n} ended their turn; ")
    return [style, non_inferior, loops, turn]


def challenge(challenger: Scores, incumbent: Scores, rule: Rule) -> Check:
    """Rule item 3: the challenger must be on-style significantly more often than the incumbent
    on the same test questions (exact one-sided McNemar). Expressed as a Check on the p-value."""
    check_paired(challenger, incumbent)
    test = mcnemar_greater(challenger.on_style, incumbent.on_style)
    gain = 100.0 * (challenger.on_style.mean() - incumbent.on_style.mean())
    return Check(BEATS_PRODUCTION, float(gain), test.p_value, rule.alpha, False,
                 f"vs {incumbent.model}: {gain:+.1f} points, discordant {test.challenger_only} won / "
                 f"{test.incumbent_only} lost, exact McNemar p = {test.p_value:.4f} (needs < {rule.alpha:g})")


def verdict(checks: Sequence[Check]) -> str:
    """promote / refuse / inconclusive for the checks against the base (see the module docstring)."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return PROMOTE
    return INCONCLUSIVE if all(c.estimate_passes for c in failed) else REFUSE


def design_power(n: int, rule: Rule, content_sd: float, style_sd: float, style_gain: float = 0.0) -> dict[str, float]:
    """Power of this test set for the declared margins, at the given per-question SDs (from
    validation, where looking is allowed): content non-inferiority if the true difference is 0,
    and style superiority if the true gain is `style_gain` points; plus the n each would need."""
    return {
        "content_power": power(n, rule.content_margin, content_sd, rule.alpha),
        "content_n_needed": required_n(rule.content_margin, content_sd, rule.alpha, rule.power),
        "style_power": power(n, style_gain - rule.min_style_gain, style_sd, rule.alpha),
        "style_n_needed": required_n(style_gain - rule.min_style_gain, style_sd, rule.alpha, rule.power),
    }


# --------------------------------------------------------------------------- the finalist, on validation


@dataclass(frozen=True)
class Finalist:
    """The one adapter the test set sees, and why."""

    model: str | None
    reason: str
    screened: dict[str, str] = field(default_factory=dict)  # model -> why it passed / failed the screens


def _number(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key)
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def screen(record: Mapping[str, Any], base: Mapping[str, Any], rule: Rule) -> list[str]:
    """Why an adapter's validation numbers put it out of the running (empty: it is in)."""
    problems = []
    content_key = f"{rule.content_metric}_mean"
    content, base_content = _number(record, content_key), _number(base, content_key)
    if not content >= base_content - rule.content_margin:
        problems.append(f"validation {rule.content_metric} {content:.3f} < base {base_content:.3f} - {rule.content_margin:g}")
    if not _number(record, "repetition_rate") <= rule.max_repetition_rate:
        problems.append(f"validation repetition {_number(record, 'repetition_rate'):.3f} > {rule.max_repetition_rate:g}")
    if not _number(record, "stopped_pct") >= rule.min_stopped_pct:
        problems.append(f"validation ended turn {_number(record, 'stopped_pct'):.0f}% < {rule.min_stopped_pct:g}%")
    return problems


def selection_key(record: Mapping[str, Any], style_key: str = "pct_conversational") -> tuple:
    """Most on-style first (`style_key`: the tone's pct_<name>), then fewer training samples,
    smaller r, then the name (deterministic)."""
    return (-_number(record, style_key), _number(record, "n_train"), _number(record, "lora_r"),
            str(record.get("model")))


def choose_finalist(base: Mapping[str, Any], adapters: Sequence[Mapping[str, Any]], rule: Rule,
                    style_key: str = "pct_conversational") -> Finalist:
    """Exactly one finalist from the validation metrics (rule item 1); None when there is no adapter.
    `style_key`: the on-style rate's key in the records (the tone's pct_<name>)."""
    if not adapters:
        return Finalist(None, "no adapter was evaluated on validation")
    ranked = sorted(adapters, key=lambda record: selection_key(record, style_key))
    screened = {str(r["model"]): "; ".join(screen(r, base, rule)) or "in" for r in ranked}
    passing = [r for r in ranked if screened[str(r["model"])] == "in"]
    if passing:
        chosen = passing[0]
        reason = (f"highest validation on-style ({_number(chosen, style_key):.1f}%) among the "
                  f"{len(passing)} of {len(ranked)} adapter(s) within the validation screens")
    else:
        chosen = ranked[0]
        reason = (f"no adapter was within the validation screens; highest validation on-style "
                  f"({_number(chosen, style_key):.1f}%) goes to the test set")
    return Finalist(str(chosen["model"]), reason, screened)
