"""The paper's evaluation metrics, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline.core import evalmetrics

# Flesch = 206.835 - 1.015 * words/sentence - 84.6 * syllables/word, worked out by hand:
HAND_FLESCH = {
    "The cat sat on the mat.": 206.835 - 1.015 * 6 - 84.6 * 6 / 6,  # 116.145
    "I like it. It is good.": 206.835 - 1.015 * 3 - 84.6 * 6 / 6,  # 119.19
    # pho-to-syn-the-sis con-verts e-lec-tro-mag-net-ic ra-di-a-tion in-to chem-i-cal en-er-gy
    "Photosynthesis converts electromagnetic radiation into chemical energy.": 206.835 - 1.015 * 7 - 84.6 * 25 / 7,
}


@pytest.mark.parametrize("text", list(HAND_FLESCH))
def test_flesch_of_fixed_strings_matches_the_formula_by_hand(text):
    from pipeline.core.textmetrics import flesch_reading_ease

    assert flesch_reading_ease(text) == pytest.approx(HAND_FLESCH[text], abs=1e-6)


def test_threshold_is_inclusive_and_missing_scores_never_count():
    flesch = [60.0, 59.99, 75.0, math.nan, 0.0]
    assert evalmetrics.conversational_mask(flesch, 60).tolist() == [True, False, True, False, False]
    assert evalmetrics.percent_conversational(flesch, 60) == pytest.approx(40.0)
    assert evalmetrics.percent_conversational(flesch, 75) == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("text", "words"),
    [("The cat sat on the mat.", 6), ("  Well,  sure!\nWhy not? ", 4), ("", 0), ("one", 1)],
)
def test_word_count(text, words):
    assert evalmetrics.word_count(text) == words


def test_summary_of_fixed_answers_matches_hand_computation():
    answers = list(HAND_FLESCH) + [""]
    flesch = [*HAND_FLESCH.values(), math.nan]  # the empty answer has no score
    similarity = [0.9, 0.5, 0.7, 0.1]
    summary = evalmetrics.summarize(answers, flesch, similarity, threshold=60, bootstrap_samples=500, seed=0,
                                    stopped=[True, True, False, True])
    assert summary["n_eval"] == 4
    assert summary["pct_conversational"] == pytest.approx(50.0)  # 2 of 4, the empty one counts as not
    assert summary["flesch_mean"] == pytest.approx((116.145 + 119.19 - 102.41285714285714) / 3)
    assert summary["flesch_median"] == pytest.approx(116.145)
    assert summary["similarity_mean"] == pytest.approx(0.55)
    assert summary["answer_words_mean"] == pytest.approx((6 + 6 + 7 + 0) / 4)
    assert summary["stopped_pct"] == pytest.approx(75.0)
    assert summary["repetition_rate"] == pytest.approx(0.0)  # no 4-gram repeats inside any answer
    assert summary["pct_conversational_ci_low"] <= 50.0 <= summary["pct_conversational_ci_high"]


def test_summary_from_a_predictions_table_equals_summary_from_arrays():
    table = pd.DataFrame(
        {"question": ["q1", "q2", "q3"], "reference": ["r1", "r2", "r3"], "answer": ["Yes it is.", "No.", None],
         "flesch": [90.0, 30.0, math.nan], "similarity": [0.8, 0.6, 0.2]}
    )
    from_table = evalmetrics.summarize_predictions(table, 60, 300, 1)
    from_arrays = evalmetrics.summarize(["Yes it is.", "No.", ""], [90.0, 30.0, math.nan], [0.8, 0.6, 0.2], 60, 300, 1)
    assert from_table == from_arrays
    assert "stopped_pct" not in from_table
    with pytest.raises(ValueError, match="flesch"):
        evalmetrics.summarize_predictions(table.drop(columns="flesch"), 60, 300, 1)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="differ in length"):
        evalmetrics.summarize(["a", "b"], [1.0], [0.5, 0.5], 60, 10, 0)


@pytest.mark.parametrize(("passes", "expected"), [(0, (0.0, 0.0)), (20, (100.0, 100.0))])
def test_bootstrap_of_all_or_nothing_is_degenerate(passes, expected):
    mask = np.arange(20) < passes
    assert evalmetrics.bootstrap_percent_ci(mask, 1000, seed=0) == expected


def test_bootstrap_is_seeded_and_matches_resampling_and_the_normal_approximation():
    mask = np.arange(400) % 2 == 0  # 50% of 400
    low, high = evalmetrics.bootstrap_percent_ci(mask, 4000, seed=7)
    assert (low, high) == evalmetrics.bootstrap_percent_ci(mask, 4000, seed=7)
    assert (low, high) != evalmetrics.bootstrap_percent_ci(mask, 4000, seed=8)
    half_width = 1.96 * math.sqrt(0.5 * 0.5 / 400) * 100  # 4.9 points
    assert low == pytest.approx(50 - half_width, abs=0.6) and high == pytest.approx(50 + half_width, abs=0.6)
    # The binomial shortcut is the same distribution as resampling rows with replacement.
    rng = np.random.default_rng(0)
    resampled = 100 * mask[rng.integers(0, mask.size, size=(4000, mask.size))].mean(axis=1)
    brute = np.quantile(resampled, [0.025, 0.975])
    assert low == pytest.approx(brute[0], abs=0.6) and high == pytest.approx(brute[1], abs=0.6)


def test_empty_evaluation_gives_nan_not_an_error():
    assert math.isnan(evalmetrics.percent([]))
    assert all(math.isnan(v) for v in evalmetrics.bootstrap_percent_ci([], 10, 0))
    assert math.isnan(evalmetrics.nan_mean([math.nan]))


def test_metrics_record_is_json_ready_and_base_models_have_zero_training_samples():
    summary = {"n_eval": np.int64(3), "pct_conversational": 33.333333, "flesch_mean": math.nan}
    record = evalmetrics.metrics_record("base", "base", summary, family="SmolLM2-135M-Instruct", precision="fp32")
    assert list(record)[:7] == list(evalmetrics.DESCRIPTIVE_KEYS)
    assert record["n_train"] == 0 and record["lora_r"] is None
    assert record["n_eval"] == 3 and type(record["n_eval"]) is int
    assert record["pct_conversational"] == 33.3333 and record["flesch_mean"] is None
    lora = evalmetrics.metrics_record("lora-x", "lora", {}, lora_r=32, learning_rate=1e-3, n_train=100, system_prompt="concise")
    assert lora["n_train"] == 100 and lora["system_prompt"] == "concise"
    with pytest.raises(ValueError, match="kind"):
        evalmetrics.metrics_record("m", "finetuned", {})


def test_repetition_rate_is_the_mean_of_the_per_answer_rates():
    from pipeline.core.textmetrics import repeated_ngram_rate

    loop = "I am here to help you. " * 5
    answers = [loop, "The cat sat on the mat.", ""]
    summary = evalmetrics.summarize(answers, [90.0, 116.0, math.nan], [0.5, 0.6, 0.1], 60, 50, 0)
    assert repeated_ngram_rate(loop) == pytest.approx(21 / 27)  # 30 words, 27 grams, the first 6 are new
    assert summary["repetition_rate"] == pytest.approx((21 / 27 + 0 + 0) / 3)
    record = evalmetrics.metrics_record("m", "lora", summary)
    assert record["repetition_rate"] == round(21 / 81, 4) and set(evalmetrics.DEGENERATION_KEYS) - {"stopped_pct"} <= set(record)
