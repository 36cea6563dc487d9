"""The tone spec (pipeline.core.tone): built-in and user metrics, criteria combined with AND,
the names metrics are reported under, and the default tone reproducing the paper's numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core import evalmetrics, tone
from pipeline.core.config import StyleCriterion, ToneConfig, parse_config
from pipeline.core.errors import TonetuneError
from pipeline.core.textmetrics import flesch_reading_ease
from tests.conftest import REPO_ROOT

EASY = "The cat sat on the mat. It was warm. We all liked it."
HARD = ("Notwithstanding considerable methodological heterogeneity, contemporary epidemiological "
        "investigations demonstrate substantial associations between socioeconomic determinants and morbidity.")


def criterion(metric: str, direction: str, threshold: float) -> StyleCriterion:
    return StyleCriterion(metric=metric, direction=direction, threshold=threshold)


def test_builtin_metrics_are_textstats_and_word_counts():
    import textstat

    flesch = tone.resolve_metric("flesch_reading_ease")
    grade = tone.resolve_metric("flesch_kincaid_grade")
    words = tone.resolve_metric("words_per_answer")
    assert (flesch.column, grade.column, words.column) == ("flesch", "fk_grade", "words")
    assert flesch.scores([EASY, HARD]).tolist() == [flesch_reading_ease(EASY), flesch_reading_ease(HARD)]
    assert grade.scores([HARD])[0] == pytest.approx(textstat.flesch_kincaid_grade(HARD))
    assert grade.scores([HARD])[0] > grade.scores([EASY])[0] + 5  # a hard text is many grades higher
    assert words.scores([EASY, ""]).tolist()[0] == 13 and math.isnan(words.scores([""])[0])  # empty: no score


def test_criteria_combine_with_and_and_respect_direction():
    criteria = tone.Criteria.build([criterion("flesch_kincaid_grade", "lower", 8),
                                    criterion("words_per_answer", "lower", 20)])
    texts = [EASY, HARD, " ".join([EASY] * 3), ""]  # easy+short, hard, easy but long, empty
    scores = criteria.score(texts)
    assert list(scores) == ["fk_grade", "words"]
    assert criteria.mask(scores).tolist() == [True, False, False, False]
    assert criteria.describe() == "flesch_kincaid_grade <= 8 AND words_per_answer <= 20"
    assert criteria.failures({"fk_grade": 12.0, "words": 10}) == ["flesch_kincaid_grade 12.0 > 8"]


def test_higher_is_better_uses_at_least_and_nan_never_passes():
    assert tone.criterion_mask([60.0, 59.9, math.nan], "higher", 60).tolist() == [True, False, False]
    assert tone.criterion_mask([8.0, 8.1, math.nan], "lower", 8).tolist() == [True, False, False]


def test_user_function_metric_comes_from_the_tones_package(monkeypatch):
    """The worked example's metric, tones/support.py: the share of words that address the reader."""
    monkeypatch.chdir(REPO_ROOT)
    metric = tone.resolve_metric("tones.support:second_person")
    assert metric.column == "second_person" and metric.source_file.as_posix() == "tones/support.py"
    assert metric.scores(["You can reset your password.", "The password resets.", ""])[:2].tolist() == [0.4, 0.0]
    spec = ToneConfig(name="support", on_style=(criterion("tones.support:second_person", "higher", 0.1),))
    assert tone.user_function_files(spec) == [Path("tones/support.py")]
    assert tone.on_style(spec).mask({"second_person": [0.4, 0.0, math.nan]}).tolist() == [True, False, False]


@pytest.mark.parametrize(("metric", "message"), [
    ("tones.nowhere:fn", "tones/nowhere.py not found"),
    ("tones.support:missing", "has no function 'missing'"),
])
def test_a_bad_user_function_is_one_line(monkeypatch, metric, message):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(TonetuneError, match=message):
        tone.resolve_metric(metric)


def test_metrics_are_named_after_the_tone():
    spec = ToneConfig(name="formal", on_style=(criterion("flesch_kincaid_grade", "lower", 8),
                                               criterion("words_per_answer", "lower", 60)))
    criteria = tone.on_style(spec)
    answers = [EASY, HARD, ""]
    table = pd.DataFrame({"answer": answers, **criteria.score(answers), "similarity": [0.9, 0.8, 0.1]})
    summary = evalmetrics.summarize_predictions(table, criteria, 200, 0, style_key=tone.style_key(spec))
    assert tone.style_key(spec) == "pct_formal" and not any("conversational" in key for key in summary)
    assert summary["pct_formal"] == pytest.approx(100 / 3)
    assert {"fk_grade_mean", "fk_grade_median", "words_mean", "words_median"} <= set(summary)
    assert "flesch_mean" not in summary
    assert tone.style_metric_keys(spec)[:3] == ("pct_formal", "pct_formal_ci_low", "pct_formal_ci_high")
    tags = tone.tone_tags(spec, "eval.", "eval.conversational_threshold")
    assert tags["eval.tone"] == "formal" and "eval.conversational_threshold" not in tags
    assert tags["eval.tone.on_style"] == "flesch_kincaid_grade <= 8 AND words_per_answer <= 60"


def test_the_default_tone_is_the_papers_rule_under_its_names():
    """params.yaml's tone gives exactly the numbers (and keys) of the paper's Flesch >= 60 rule."""
    spec = parse_config({}).tone
    assert spec == ToneConfig() and tone.style_key(spec) == "pct_conversational"
    rng = np.random.default_rng(0)
    answers = [EASY, HARD, "", "Yes. It is.", "Sure thing, it rains a lot there in spring."] * 4
    flesch = tone.on_style(spec).score(answers)["flesch"]
    similarity = rng.uniform(0, 1, len(answers))
    table = pd.DataFrame({"answer": answers, "flesch": flesch, "similarity": similarity})
    reference = evalmetrics.summarize(answers, flesch, similarity, 60, 300, 1)
    assert evalmetrics.summarize_predictions(table, tone.on_style(spec), 300, 1) == reference
    assert list(evalmetrics.summarize_predictions(table, tone.on_style(spec), 300, 1)) == list(reference)
    assert tone.tone_tags(spec, "eval.", "eval.conversational_threshold")["eval.conversational_threshold"] == "60.0"


def test_the_spec_names_textstats_language():
    """Spanish Flesch (textstat's Fernandez Huerta constants) differs from the English formula,
    and scoring in Spanish leaves the English metric as it was (textstat's language is global)."""
    text = "El gato se sentó en la alfombra. Hacía calor y todos estaban contentos."
    english_before = tone.resolve_metric("flesch_reading_ease").scores([text])[0]
    spanish = tone.resolve_metric("flesch_reading_ease", "es").scores([text])[0]
    assert spanish != pytest.approx(english_before, abs=1.0)
    assert tone.resolve_metric("flesch_reading_ease").scores([text])[0] == english_before
    assert flesch_reading_ease(EASY) == tone.resolve_metric("flesch_reading_ease").scores([EASY])[0]


def test_the_model_card_names_the_tones_metrics_and_an_old_version_stays_conversational():
    """A version registered with a tone's tags shows its own metric names, rule and prompt versions;
    a version registered before tones (no `tone` tag, the paper's metric tags) reads as before."""
    from registry.card import model_card
    from registry.policy import Candidate

    spec = ToneConfig(name="support_formal", description="formally", on_style=(
        criterion("flesch_kincaid_grade", "lower", 10), criterion("words_per_answer", "lower", 60)))
    tags = {**tone.tone_tags(spec, "", "evaluate.conversational_threshold"),
            "metric.pct_support_formal": "70.0", "metric.fk_grade_mean": "7.5", "metric.fk_grade_median": "7.0",
            "metric.words_mean": "31", "metric.words_median": "30", "base.pct_support_formal": "20.0",
            "prompt.system_concise.version": "abc123def456", "tone.prompts": "prompts/support",
            "prompt.system_concise.uri": "prompts:/tonetune-support_formal-system_concise/2"}
    card = model_card("tonetune-support", "3", tags)
    assert "support formal LoRA adapter" in card and "| % support formal | 70.0 | 20.0 |" in card
    assert "mean Flesch-Kincaid grade" in card and "conversational" not in card
    assert "flesch_kincaid_grade <= 10 AND words_per_answer <= 60" in card
    assert "`system_concise` abc123def456 (prompts:/tonetune-support_formal-system_concise/2)" in card
    assert Candidate.from_version_tags(tags, "3").pct_on_style == 70.0

    legacy = {"metric.pct_conversational": "81.0", "metric.flesch_mean": "75.2", "metric.flesch_median": "76.0",
              "base.pct_conversational": "28.0", "evaluate.conversational_threshold": "60.0"}
    old = model_card("tonetune-conversational", "1", legacy)
    assert "| % conversational | 81.0 | 28.0 |" in old and "mean Flesch" in old and "Flesch >= 60.0" in old
    assert "not recorded" in old
    assert Candidate.from_version_tags(legacy, "1").pct_on_style == 81.0
