"""The tone: its style metrics, the criteria built from them, and the names they are reported under.

params.yaml `tone` (pipeline.core.config.ToneConfig) names the metrics; this module turns a name
into a function of one answer and applies criteria to tables of scores. Every stage that judges
style goes through here: the generation gate (`tone.gate`), the data-quality gate, the evaluation's
on-style rate (`tone.on_style`) and the promotion, so a tone means the same thing everywhere.

Metrics (the `metric` of a criterion):

- `flesch_reading_ease`: textstat's Flesch reading ease, higher is easier (the paper's; column `flesch`);
- `flesch_kincaid_grade`: textstat's Flesch-Kincaid grade level, a US school grade (column `fk_grade`);
- `words_per_answer`: whitespace-separated words (column `words`, the definition of `answer_words_mean`);
- `tones.<module>:<function>`: a user's function `f(text: str) -> float` in the repository's
  `tones/` package (column: the function's name); dvc.yaml lists the `tones` folder as a
  dependency of every stage that scores style, so editing it re-runs them;
- `hub:<hub id>@<revision>#<label>` or `hub:<local folder>#<label>`: the probability (0..1) of
  `label` by a sequence classifier from the Hugging Face hub (pipeline.core.hubclassifier; column:
  the label, lower-cased, `_` for anything else);
- `rubric:<name>`: a 1..5 score by the judge's LLM (`judge.model` through `judge.client`) following
  the rubric `<tone.prompts>/rubric_<name>.txt` (pipeline.core.rubric; column `rubric_<name>`);
  on-style only, and only where the caller passes the judge's config (`MetricContext`).

An empty answer has no score (NaN) and passes no criterion. Several criteria combine with AND: an
answer is on-style (or passes the gate) only when it passes every one.

Names: the on-style rate is reported as `pct_<tone.name>` (the default tone's name is
`conversational`, so the paper's `pct_conversational` is unchanged) and each metric's mean and
median as `<column>_mean` / `<column>_median`.

What this module does not do: compute embeddings or similarity (pipeline.core.textmetrics).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core import hubclassifier, rubric
from pipeline.core.errors import TonetuneError
from pipeline.core.metricnames import (  # noqa: F401 - re-exported: the tone's names
    BUILTIN_METRICS,
    FLESCH,
    GRADE,
    HUB_PREFIX,
    RUBRIC_PREFIX,
    WORDS,
    MetricContext,
    StyleMetric,
    metric_column,
)

if TYPE_CHECKING:
    from pipeline.core.config import JudgeConfig, StyleCriterion, ToneConfig

USER_FUNCTION = re.compile(r"^(?P<module>[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*):(?P<function>[A-Za-z_]\w*)$")
# textstat languages with their own readability constants or syllable rules (textstat 0.7.13).
TEXTSTAT_LANGUAGES = ("en_US", "de", "es", "fr", "it", "nl", "ru", "pl", "cs", "hu")


def _textstat_metric(method: str, language: str) -> Callable[[str], float]:
    """textstat's `method` under `language`. textstat keeps one global language, so each call
    sets it (an assignment): metrics of different languages never leak into each other."""
    from pipeline.core.textmetrics import _textstat

    textstat = _textstat()
    function = getattr(textstat, method)

    def measure(text: str) -> float:
        textstat.set_lang(language)
        return function(text)

    return measure


def word_count(text: str) -> int:
    """Whitespace-separated words (the same definition as evalmetrics' answer_words_mean)."""
    return len(str(text).split())


def user_function_file(metric: str) -> Path:
    """The file of a `module:function` metric, relative to the working directory (a DVC dep)."""
    match = USER_FUNCTION.match(metric)
    if not match:
        raise TonetuneError(f"tone metric {metric!r}: expected one of {BUILTIN_METRICS} or `module:function`")
    module_path = Path(*match["module"].split("."))
    package = module_path / "__init__.py"
    return package if package.exists() else module_path.with_suffix(".py")


def _user_metric(metric: str) -> StyleMetric:
    import sys

    match = USER_FUNCTION.match(metric)
    if not match:
        raise TonetuneError(f"tone metric {metric!r}: expected one of {BUILTIN_METRICS} or `module:function`")
    import importlib.util

    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        spec = importlib.util.find_spec(match["module"])
    except ModuleNotFoundError:
        spec = None
    if spec is None or spec.origin is None:
        raise TonetuneError(f"tone metric {metric!r}: {user_function_file(metric)} not found "
                            "(paths are relative to the repository root)")
    source = Path(spec.origin)
    if source.is_relative_to(Path.cwd()):
        source = source.relative_to(Path.cwd())
    try:
        module = importlib.import_module(match["module"])
    except Exception as error:  # noqa: BLE001 - a user's module can fail in any way: name it, one line
        raise TonetuneError(f"tone metric {metric!r}: importing {source} failed: {type(error).__name__}: {error}") from None
    function = getattr(module, match["function"], None)
    if not callable(function):
        raise TonetuneError(f"tone metric {metric!r}: {source} has no function {match['function']!r}")
    return StyleMetric(metric, match["function"], match["function"], function, source)


def resolve_metric(metric: str, language: str = "en_US", context: MetricContext | None = None) -> StyleMetric:
    """The metric a criterion names (see the module docstring). `context`: what a `rubric:`
    metric needs (the tone's prompts, the judge's params); the other metrics ignore it."""
    if metric == FLESCH:
        return StyleMetric(metric, "flesch", "Flesch reading ease", _textstat_metric("flesch_reading_ease", language))
    if metric == GRADE:
        return StyleMetric(metric, "fk_grade", "Flesch-Kincaid grade", _textstat_metric("flesch_kincaid_grade", language))
    if metric == WORDS:
        return StyleMetric(metric, "words", "words per answer", word_count)
    if metric.startswith(HUB_PREFIX):
        return hubclassifier.style_metric(metric)
    if metric.startswith(RUBRIC_PREFIX):
        return rubric.style_metric(metric, context)
    return _user_metric(metric)


def check_metric(metric: str, context: MetricContext | None = None) -> None:
    """The cheap checks of a `hub:` or `rubric:` metric (its syntax, revision, folder, label,
    rubric file, judge price): one line naming the metric, before any model is loaded or request
    sent. Nothing for the other metrics (they are checked when resolved)."""
    if metric.startswith(HUB_PREFIX):
        hubclassifier.check(metric)
    elif metric.startswith(RUBRIC_PREFIX):
        rubric.check(metric, context)


def criterion_mask(scores: Sequence[float] | np.ndarray, direction: str, threshold: float) -> np.ndarray:
    """Boolean per answer: score >= threshold (higher) or <= threshold (lower); NaN is False."""
    values = np.asarray(scores, dtype=float)
    if direction == "higher":
        return np.nan_to_num(values, nan=-np.inf) >= threshold
    if direction == "lower":
        return np.nan_to_num(values, nan=np.inf) <= threshold
    raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")


def describe_criterion(criterion: StyleCriterion) -> str:
    """`flesch_reading_ease >= 60`."""
    return f"{criterion.metric} {'>=' if criterion.direction == 'higher' else '<='} {criterion.threshold:g}"


def describe_criteria(criteria: Sequence[StyleCriterion]) -> str:
    """`a >= 1 AND b <= 2`."""
    return " AND ".join(describe_criterion(c) for c in criteria)


@dataclass(frozen=True)
class Criteria:
    """Criteria combined with AND. Metrics are resolved (imported) only to score texts."""

    criteria: tuple[StyleCriterion, ...]
    language: str = "en_US"
    context: MetricContext | None = field(default=None, compare=False)

    @classmethod
    def build(cls, criteria: Sequence[StyleCriterion], language: str = "en_US",
              context: MetricContext | None = None) -> Criteria:
        return cls(tuple(criteria), language, context)

    def check(self) -> Criteria:
        """The cheap checks of every `hub:`/`rubric:` metric (check_metric); returns self."""
        for metric in dict.fromkeys(c.metric for c in self.criteria):
            check_metric(metric, self.context)
        return self

    @classmethod
    def flesch_at_least(cls, threshold: float) -> Criteria:
        """The paper's single criterion, Flesch reading ease >= threshold."""
        from pipeline.core.config import StyleCriterion

        return cls((StyleCriterion(metric=FLESCH, direction="higher", threshold=threshold),))

    @property
    def columns(self) -> tuple[str, ...]:
        """Distinct metric columns, in criterion order."""
        return tuple(dict.fromkeys(metric_column(c.metric) for c in self.criteria))

    def metrics(self) -> tuple[StyleMetric, ...]:
        """The distinct metrics, resolved (a user function is imported here)."""
        seen: dict[str, StyleMetric] = {}
        for c in self.criteria:
            if c.metric not in seen:
                seen[c.metric] = resolve_metric(c.metric, self.language, self.context)
        return tuple(seen.values())

    def score(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{column: scores} for every distinct metric (NaN for an empty text)."""
        texts = [str(text) for text in texts]
        return {metric.column: metric.scores(texts) for metric in self.metrics()}

    def mask(self, scores: Mapping[str, Any]) -> np.ndarray:
        """Boolean per answer: every criterion passes (AND). `scores`: a table or {column: values}."""
        masks = [criterion_mask(np.asarray(scores[metric_column(c.metric)], dtype=float), c.direction, c.threshold)
                 for c in self.criteria]
        return np.logical_and.reduce(masks)

    def failures(self, scores: Mapping[str, float]) -> list[str]:
        """The criteria one answer's scores fail, described (`flesch_reading_ease 52.1 < 75`)."""
        failed = []
        for c in self.criteria:
            value = float(scores[metric_column(c.metric)])
            if not bool(criterion_mask([value], c.direction, c.threshold)[0]):
                sign = "<" if c.direction == "higher" else ">"
                failed.append(f"{c.metric} {value:.1f} {sign} {c.threshold:g}")
        return failed

    def describe(self) -> str:
        return describe_criteria(self.criteria)


def style_key(tone: ToneConfig) -> str:
    """The on-style rate's metric key: `pct_<tone.name>` (`pct_conversational` for the default tone)."""
    return f"pct_{tone.name}"


def style_label(tone: ToneConfig) -> str:
    """`% conversational`."""
    return f"% {tone.name.replace('_', ' ')}"


def metric_context(tone: ToneConfig, judge: JudgeConfig | None = None) -> MetricContext:
    """The context of the tone's metrics: its prompts and description, and the judge's params."""
    return MetricContext(tone.prompts, tone.description, judge)


def on_style(tone: ToneConfig, judge: JudgeConfig | None = None) -> Criteria:
    """The evaluation's criteria (what counts as on-style). `judge` (params `judge`): the model
    and client of `rubric:` metrics; the stages that score on-style (score, heldout, the OpenAI
    arm, promote) pass `config.judge`. Nothing is checked or loaded here (`Criteria.check`)."""
    return Criteria.build(tone.on_style, tone.language, metric_context(tone, judge))


def gate(tone: ToneConfig) -> Criteria:
    """The generation gate's criteria (what a generated answer must pass). A rubric is never in
    the gate (params validation refuses it), so the gate needs no judge."""
    return Criteria.build(tone.gate, tone.language, metric_context(tone))


def user_function_files(tone: ToneConfig) -> list[Path]:
    """Files of the tone's user-function metrics (DVC dependencies of the stages using them)."""
    metrics = {c.metric for c in (*tone.gate, *tone.on_style)
               if c.metric not in BUILTIN_METRICS and not c.metric.startswith((HUB_PREFIX, RUBRIC_PREFIX))}
    return sorted({user_function_file(metric) for metric in metrics})


def tone_tags(tone: ToneConfig, prefix: str = "", legacy_threshold_key: str | None = None) -> dict[str, str]:
    """What the tone was, as MLflow tags: `<prefix>tone` (its name), `<prefix>tone.on_style`,
    `<prefix>tone.gate` (criteria, AND) and `<prefix>tone.language`. A tone whose on-style rule is
    the paper's (one Flesch >= t criterion) also gets `legacy_threshold_key` = t, the tag older
    runs and registered versions carry (e.g. `eval.conversational_threshold`)."""
    tags = {
        f"{prefix}tone": tone.name,
        f"{prefix}tone.on_style": describe_criteria(tone.on_style),
        f"{prefix}tone.gate": describe_criteria(tone.gate),
        f"{prefix}tone.language": tone.language,
        f"{prefix}tone.description": tone.description,
    }
    paper_rule = len(tone.on_style) == 1 and tone.on_style[0].metric == FLESCH and tone.on_style[0].direction == "higher"
    if legacy_threshold_key and paper_rule:
        tags[legacy_threshold_key] = str(float(tone.on_style[0].threshold))
    return tags


def style_metric_keys(tone: ToneConfig) -> tuple[str, ...]:
    """The metrics-record keys of the tone's style: pct_<name> (+ _ci_low/_ci_high), then
    <column>_mean and <column>_median per on-style metric."""
    key = style_key(tone)
    columns = Criteria.build(tone.on_style, tone.language).columns
    return (key, f"{key}_ci_low", f"{key}_ci_high",
            *(f"{column}_{stat}" for column in columns for stat in ("mean", "median")))
