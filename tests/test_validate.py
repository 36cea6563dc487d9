"""The data-quality gate: real great-expectations, real textstat, the real packaged MiniLM.

Each planted bad row must fail its own check with a message naming the row's id; the clean
fixture must pass and leave a Data Docs site. The embedder is loaded once per module (~10 s).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipeline import validate
from pipeline.core.config import EmbeddingsConfig, load_config
from pipeline.core.textmetrics import flesch_reading_ease, load_embedder
from tests.pairs_fixtures import (
    CLEAN_ROWS,
    FLESCH_JUST_BELOW_75,
    FLESCH_ROW,
    PARAPHRASED_EIFFEL_QUESTION,
    clean_pairs,
    with_row,
)


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(EmbeddingsConfig())


@pytest.fixture
def config(write_params):
    write_params()
    return load_config()


def gate(frame, config, embedder, tmp_path):
    """Run the gate on `frame`; return (outcomes by name, failure lines, docs dir)."""
    docs = tmp_path / "data_quality"
    _, outcomes = validate.run_gate(frame, config, embedder, docs)
    return {o.name: o for o in outcomes}, validate.failure_lines(outcomes, len(frame)), docs


def test_clean_fixture_passes_and_writes_data_docs(config, embedder, tmp_path):
    outcomes, lines, docs = gate(clean_pairs(), config, embedder, tmp_path)
    assert lines == []
    assert all(outcome.success for outcome in outcomes.values())
    # every rule of the issue is present as its own check
    assert {"answer_flesch", "question_not_near_duplicate", "answer_faithful", "answer_not_null",
            "id_unique", "question_ends_with_question_mark", "question_length", "answer_length"} <= set(outcomes)
    index = docs / "index.html"
    assert index.exists()
    assert "pairs_quality" in index.read_text()
    assert list(docs.glob("validations/**/*.html")), "the validation result page is part of the site"


def test_planted_flesch_is_really_just_below_75():
    """The fixture itself: a real answer textstat scores in [74, 75)."""
    assert 74 <= flesch_reading_ease(FLESCH_JUST_BELOW_75) < 75


EIFFEL = {"title": "Eiffel Tower", "answer": CLEAN_ROWS[0][2], "factual_answer": CLEAN_ROWS[0][3]}

PLANTED = {
    # name: (the planted row's values, the check that must fail, what the message must show)
    "flesch_74.8": (FLESCH_ROW | {"flesch": 80.0}, "answer_flesch", "value=74.805"),
    "paraphrased_duplicate": (EIFFEL | {"question": PARAPHRASED_EIFFEL_QUESTION},
                              "question_not_near_duplicate", "nearest_earlier_id='pair-000'"),
    "null_answer": ({"answer": None}, "answer_not_null", "value=None"),
    "duplicate_id": ({"id": "pair-003"}, "id_unique", "id='pair-003'"),
    "blank_factual_answer": ({"factual_answer": " "}, "factual_answer_not_blank", "value=' '"),
    "no_question_mark": ({"question": "Tell me why the sky is blue on a clear day."},
                         "question_ends_with_question_mark", "value='Tell me why"),
    "unfaithful_answer": ({"factual_answer": "The French Revolution began in 1789 with the storming of the Bastille."},
                          "answer_faithful", "value="),
    "answer_too_short": ({"answer": "Air scatters blue."}, "answer_length", "value='Air scatters blue.'"),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_bad_row_fails_its_check_naming_the_row(case, config, embedder, tmp_path):
    values, check, shown = PLANTED[case]
    outcomes, lines, docs = gate(with_row(clean_pairs(), **values), config, embedder, tmp_path)
    failed = {name for name, outcome in outcomes.items() if not outcome.success}
    assert failed == {check}, lines
    [line] = lines
    row_id = values.get("id", "planted")
    assert line.startswith(f"FAILED {check} ") and f"id='{row_id}'" in line and shown in line, line
    assert (docs / "index.html").exists(), "Data Docs are written on failure too"


def test_stored_scores_are_not_trusted(config, embedder, tmp_path):
    """The file claims Flesch 99 and faithfulness 1.0 for the bad row; the gate recomputes."""
    frame = with_row(clean_pairs(), **FLESCH_ROW, flesch=99.0, faithfulness=1.0)
    outcomes, _, _ = gate(frame, config, embedder, tmp_path)
    assert not outcomes["answer_flesch"].success
    assert outcomes["answer_flesch"].examples == [{"id": "planted", "value": 74.805}]


def test_thresholds_come_from_the_tone_gate(write_params, embedder, tmp_path):
    """One source of truth: lowering the tone's Flesch gate lets the 74.8 row through."""
    write_params({"tone": {"gate": [{"metric": "flesch_reading_ease", "direction": "higher", "threshold": 74.5}]}})
    frame = with_row(clean_pairs(), **FLESCH_ROW)
    outcomes, _, _ = gate(frame, load_config(), embedder, tmp_path)
    assert outcomes["answer_flesch"].success


@pytest.mark.parametrize("block_rows", [1, 2, 3, 1024])
def test_max_cosine_to_earlier_matches_brute_force(block_rows):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(9, 5)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    best, nearest = validate.max_cosine_to_earlier(vectors, block_rows=block_rows)
    assert math.isnan(best[0]) and nearest[0] == -1
    for row in range(1, len(vectors)):
        similarities = vectors[:row] @ vectors[row]
        assert nearest[row] == int(np.argmax(similarities))
        assert best[row] == pytest.approx(float(similarities.max()), abs=1e-6)


def test_later_duplicate_is_the_one_reported(config, embedder, tmp_path):
    """File order decides: with the paraphrase placed FIRST, the original is the offender."""
    planted = with_row(clean_pairs(), id="first", **EIFFEL, question=PARAPHRASED_EIFFEL_QUESTION)
    frame = pd.concat([planted.tail(1), planted.head(-1)], ignore_index=True)
    outcomes, _, _ = gate(frame, config, embedder, tmp_path)
    [example] = outcomes["question_not_near_duplicate"].examples
    assert example["id"] == "pair-000" and example["nearest_earlier_id"] == "first"


# ------------------------------------------------------------------ the stage entry point


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, write_params):
    """A working directory laid out like the repo, with params written."""
    write_params(path=tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/generated").mkdir(parents=True)
    return tmp_path


def assert_scalars_only(metrics: dict, prefix: str = "") -> None:
    """DVC metrics: numbers, bools and strings, nested in mappings; no lists or nulls (which
    `dvc metrics diff` cannot parse and `dvc exp show` renders as '...')."""
    for key, value in metrics.items():
        if isinstance(value, dict):
            assert_scalars_only(value, f"{prefix}{key}.")
        else:
            assert isinstance(value, int | float | str), f"{prefix}{key} = {value!r} is not a scalar"


def test_main_failure_writes_summary_then_exits_1(stage_dir, embedder, capsys):
    with_row(clean_pairs(), answer=None).to_parquet("data/generated/pairs.parquet")
    with pytest.raises(SystemExit) as exit_info:
        validate.main([])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "FAILED answer_not_null" in err and "id='planted'" in err
    assert err.strip().splitlines()[-1].startswith("error: data-quality gate failed (answer_not_null")
    metrics = json.loads((stage_dir / "metrics/data_quality.json").read_text())
    assert metrics["success"] is False and metrics["checks_failed"] == 1
    assert metrics["failed_checks"] == "answer_not_null"
    assert_scalars_only(metrics)
    summary = json.loads((stage_dir / "reports/data_quality/summary.json").read_text())
    assert summary["success"] is False and summary["failed_checks"] == ["answer_not_null"]
    assert summary["checks"]["answer_not_null"]["examples"] == [{"id": "planted", "value": None}]
    assert (stage_dir / "reports/data_quality/index.html").exists()


def test_main_success_summary_has_md5_and_rows(stage_dir, embedder, capsys):
    from pipeline.core.dvcmeta import file_md5

    clean_pairs().to_parquet("data/generated/pairs.parquet")
    (stage_dir / "reports/data_quality").mkdir(parents=True)
    (stage_dir / "reports/data_quality/stale.html").write_text("old run")
    validate.main([])
    summary = json.loads((stage_dir / "metrics/data_quality.json").read_text())
    assert summary["success"] is True and summary["rows"] == 10 and summary["checks_failed"] == 0
    assert summary["pairs_md5"] == file_md5(stage_dir / "data/generated/pairs.parquet")
    assert summary["recomputed"]["flesch_min"] >= 75
    assert_scalars_only(summary)
    details = json.loads((stage_dir / "reports/data_quality/summary.json").read_text())
    assert details["pairs_md5"] == summary["pairs_md5"] and details["failed_checks"] == []
    assert len(details["checks"]) == 16 and details["thresholds"]["gate"] == "flesch_reading_ease >= 75"
    assert not (stage_dir / "reports/data_quality/stale.html").exists(), "old Data Docs pages are replaced"
    assert "16/16 checks passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda: None, "data/generated/pairs.parquet not found"),
        (lambda: clean_pairs().drop(columns=["factual_answer"]).to_parquet("data/generated/pairs.parquet"),
         "missing column(s) ['factual_answer']"),
        (lambda: clean_pairs().assign(question=7).to_parquet("data/generated/pairs.parquet"),
         "column 'question' must hold text"),
    ],
    ids=["missing_file", "missing_column", "non_text"],
)
def test_bad_input_is_one_line_before_any_work(stage_dir, setup, message, capsys, monkeypatch):
    import pipeline.core.textmetrics

    monkeypatch.setattr(pipeline.core.textmetrics, "load_embedder", lambda *a: pytest.fail("loaded a model"))
    setup()
    with pytest.raises(SystemExit) as exit_info:
        validate.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (stage_dir / "metrics").exists() and not (stage_dir / "reports").exists()


def test_a_tones_gate_is_checked_under_its_own_name(write_params, embedder, tmp_path):
    """Another tone's gate (here: at most 3 words) replaces the Flesch check, named after its metric."""
    write_params({"tone": {"gate": [{"metric": "words_per_answer", "direction": "lower", "threshold": 3}]}})
    outcomes, _, _ = gate(clean_pairs(), load_config(), embedder, tmp_path)
    assert "answer_flesch" not in outcomes
    assert not outcomes["answer_words"].success and outcomes["answer_words"].unexpected_count == len(clean_pairs())
