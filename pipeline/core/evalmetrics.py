"""The paper's evaluation metrics (section 2.4, appendix A.6) as pure functions of arrays and strings.

Shared by every evaluator (the open-weights `evaluate` stage, the OpenAI arm) so all models are
scored by one definition. Nothing here loads a model or computes Flesch/embeddings itself: the
callers compute per-answer Flesch (`pipeline.core.textmetrics`) and cosine similarity, put them in a
predictions table, and `summarize_predictions` turns that table into the numbers reported, so
every number can be recomputed from the saved predictions alone.

Definitions (one row = one validation question):

- on-style ("conversational" in the paper): the tone's `on_style` criteria, all passing
  (pipeline.core.tone; the paper's and the default tone's: Flesch reading ease >= 60). An empty answer has no
  Flesch score (NaN) and never counts as conversational: textstat would score "" as 206.8.
- pct_<tone.name> (pct_conversational for the default tone): 100 * on-style rows / all rows (empty
  answers stay in the denominator).
- pct_<tone.name>_ci_low/high: percentile bootstrap 95% interval of it, seeded.
- <column>_mean / <column>_median per style metric (flesch_mean / flesch_median for the default
  tone): over answers with a score.
- similarity_mean: mean cosine similarity between answer and reference answer embeddings.
- answer_words_mean: mean whitespace-separated words per answer.
- stopped_pct: % of answers that ended at the end-of-turn token rather than at max_new_tokens
  (only when the table has a `stopped` column; a low value means truncated, runaway answers).
- repetition_rate: mean over answers of `textmetrics.repeated_ngram_rate(answer, 4)`, the share of
  an answer's word 4-grams that repeat an earlier 4-gram of the same answer (0 for fluent prose,
  near 1 for a decoding loop). With stopped_pct it is the degeneration the promotion policy guards.

A metrics record (`metrics_record`) is one flat JSON object per model, written to
`metrics/eval/<model>.json` (what `dvc metrics show` and the report read). Its descriptive keys:
model, kind ("base", "lora", "openai-base", "openai-finetuned"), family (the base model's display
name), precision, lora_r, learning_rate, n_train (0 for a base model); None where unknown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.textmetrics import repeated_ngram_rate

if TYPE_CHECKING:
    from pipeline.core.tone import Criteria

REPETITION_NGRAM = 4  # the n of repetition_rate: a repeated 4-word phrase is a loop, not a turn of phrase
PREDICTION_COLUMNS = ("question", "reference", "answer", "flesch", "similarity")
METRIC_KEYS = (
    "n_eval",
    "pct_conversational",
    "pct_conversational_ci_low",
    "pct_conversational_ci_high",
    "flesch_mean",
    "flesch_median",
    "similarity_mean",
    "answer_words_mean",
    "repetition_rate",
)
DEGENERATION_KEYS = ("stopped_pct", "repetition_rate")  # what the promotion's degeneration guard reads
DESCRIPTIVE_KEYS = ("model", "kind", "family", "precision", "lora_r", "learning_rate", "n_train")
MODEL_KINDS = ("base", "lora", "openai-base", "openai-finetuned")


def word_count(text: str) -> int:
    """Words in an answer: whitespace-separated tokens (the paper reports no finer definition)."""
    return len(str(text).split())


def conversational_mask(flesch: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """Boolean per answer: Flesch >= threshold; NaN (no score, e.g. empty answer) is False."""
    scores = np.asarray(flesch, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(scores, nan=-np.inf) >= threshold


def percent(mask: Sequence[bool] | np.ndarray) -> float:
    """100 * share of True values; NaN for an empty set (nothing was evaluated)."""
    values = np.asarray(mask, dtype=bool)
    return float(100.0 * values.mean()) if values.size else math.nan


def percent_conversational(flesch: Sequence[float] | np.ndarray, threshold: float) -> float:
    """% of answers with Flesch >= threshold, out of all answers (the paper's main outcome)."""
    return percent(conversational_mask(flesch, threshold))


def bootstrap_percent_ci(
    mask: Sequence[bool] | np.ndarray, n_resamples: int, seed: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `percent(mask)`, reproducible for a given seed.

    Resampling n answers with replacement from a pass/fail vector with k passes gives a pass
    count distributed Binomial(n, k/n), so drawing that count directly is the same bootstrap
    without materialising n_resamples x n indices (1000 x 1000 at paper scale).
    """
    values = np.asarray(mask, dtype=bool)
    if values.size == 0:
        return math.nan, math.nan
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    passes = rng.binomial(values.size, values.mean(), size=n_resamples)
    resampled = 100.0 * passes / values.size
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return float(low), float(high)


def nan_mean(values: Iterable[float]) -> float:
    """Mean over finite values; NaN when there are none (not a warning)."""
    array = np.asarray(list(values), dtype=float)
    finite = array[np.isfinite(array)]
    return float(finite.mean()) if finite.size else math.nan


def nan_median(values: Iterable[float]) -> float:
    """Median over finite values; NaN when there are none."""
    array = np.asarray(list(values), dtype=float)
    finite = array[np.isfinite(array)]
    return float(np.median(finite)) if finite.size else math.nan


def summarize(
    answers: Sequence[str],
    flesch: Sequence[float] | np.ndarray,
    similarity: Sequence[float] | np.ndarray,
    threshold: float,
    bootstrap_samples: int,
    seed: int,
    stopped: Sequence[bool] | np.ndarray | None = None,
) -> dict[str, float | int]:
    """Every metric of one model under the paper's single criterion, Flesch >= threshold."""
    return summarize_style(answers, {"flesch": flesch}, conversational_mask(flesch, threshold), similarity,
                           bootstrap_samples, seed, stopped=stopped)


def summarize_style(
    answers: Sequence[str],
    style_scores: Mapping[str, Sequence[float] | np.ndarray],
    on_style: Sequence[bool] | np.ndarray,
    similarity: Sequence[float] | np.ndarray,
    bootstrap_samples: int,
    seed: int,
    stopped: Sequence[bool] | np.ndarray | None = None,
    style_key: str = "pct_conversational",
) -> dict[str, float | int]:
    """Every metric of one model from per-answer values: the on-style rate under `style_key`
    (pct_<tone.name>) with its interval, then `<column>_mean` / `_median` per style metric."""
    lengths = {len(answers), len(on_style), len(similarity), *(len(v) for v in style_scores.values())}
    if len(lengths) != 1:
        raise ValueError(
            f"answers, style scores and similarity differ in length: {len(answers)}, "
            f"{[len(v) for v in style_scores.values()]}, {len(similarity)}"
        )
    mask = np.asarray(on_style, dtype=bool)
    low, high = bootstrap_percent_ci(mask, bootstrap_samples, seed)
    summary: dict[str, float | int] = {
        "n_eval": len(answers),
        style_key: percent(mask),
        f"{style_key}_ci_low": low,
        f"{style_key}_ci_high": high,
    }
    for column, values in style_scores.items():
        summary[f"{column}_mean"] = nan_mean(values)
        summary[f"{column}_median"] = nan_median(values)
    summary["similarity_mean"] = nan_mean(similarity)
    summary["answer_words_mean"] = nan_mean(word_count(a) for a in answers)
    summary["repetition_rate"] = nan_mean(repeated_ngram_rate(a, REPETITION_NGRAM) for a in answers)
    if stopped is not None:
        summary["stopped_pct"] = percent(stopped)
    return summary


def summarize_predictions(predictions, criteria: Criteria | float, bootstrap_samples: int, seed: int,
                          style_key: str = "pct_conversational") -> dict[str, Any]:
    """`summarize_style` applied to a predictions table (question, reference, answer, similarity,
    one column per style metric [, stopped]): the one path from saved predictions to reported
    numbers. `criteria`: the tone's on-style criteria, or a number (the paper's Flesch >= it)."""
    from pipeline.core.tone import Criteria

    if not isinstance(criteria, Criteria):
        criteria = Criteria.flesch_at_least(float(criteria))
    missing = [c for c in ("answer", *criteria.columns, "similarity") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions table lacks column(s) {missing}; it has {list(predictions.columns)}")
    stopped = predictions["stopped"].to_numpy(dtype=bool) if "stopped" in predictions.columns else None
    return summarize_style(
        predictions["answer"].fillna("").astype(str).tolist(),
        {column: predictions[column].to_numpy(dtype=float) for column in criteria.columns},
        criteria.mask(predictions),
        predictions["similarity"].to_numpy(dtype=float),
        bootstrap_samples,
        seed,
        stopped=stopped,
        style_key=style_key,
    )


def metrics_record(
    model: str,
    kind: str,
    summary: Mapping[str, Any],
    *,
    family: str | None = None,
    precision: str | None = None,
    lora_r: int | None = None,
    learning_rate: float | None = None,
    n_train: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One model's flat metrics record (descriptive keys first), rounded for a readable diff.

    JSON cannot hold NaN, so missing numbers become None (null)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if kind in ("base", "openai-base") and n_train is None:
        n_train = 0
    record: dict[str, Any] = {
        "model": model,
        "kind": kind,
        "family": family,
        "precision": precision,
        "lora_r": lora_r,
        "learning_rate": learning_rate,
        "n_train": n_train,
    }
    for key, value in {**summary, **extra}.items():
        if isinstance(value, float | np.floating):
            value = None if not math.isfinite(value) else round(float(value), 4)
        elif isinstance(value, np.integer):
            value = int(value)
        record[key] = value
    return record
