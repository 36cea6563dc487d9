"""Stage split: nested/disjoint/seeded invariants (hypothesis), the gate check, the too-few-rows
error, the files, the stats and the MLflow run (real sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import split
from pipeline.core.dvcmeta import file_md5
from pipeline.core.errors import TonetuneError
from tests.conftest import REPO_ROOT
from tests.pairs_fixtures import many_pairs


@st.composite
def split_requests(draw):
    """(n_rows, val_size, train_sizes, seed) with enough rows for the request."""
    train_sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=5, unique=True))
    val_size = draw(st.integers(1, 40))
    n_rows = val_size + max(train_sizes) + draw(st.integers(1, 30))
    return n_rows, val_size, train_sizes, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(split_requests())
def test_plan_is_nested_disjoint_sized_and_seeded(request):
    n_rows, val_size, train_sizes, seed = request
    plan = split.plan_split(n_rows, val_size, train_sizes, seed)
    val = set(plan.val.tolist())
    assert len(val) == len(plan.val) == val_size
    assert sorted(plan.train) == sorted(train_sizes)
    ordered = sorted(plan.train)
    for size in ordered:
        rows = plan.train[size].tolist()
        assert len(rows) == len(set(rows)) == size
        assert all(0 <= row < n_rows for row in rows)
        assert not val & set(rows), "a training row is also a validation row"
    for smaller, larger in zip(ordered, ordered[1:], strict=False):
        assert plan.train[larger][:smaller].tolist() == plan.train[smaller].tolist()  # prefix => subset
    again = split.plan_split(n_rows, val_size, list(reversed(train_sizes)), seed)
    assert again.val.tolist() == plan.val.tolist()
    assert all(again.train[size].tolist() == plan.train[size].tolist() for size in train_sizes)
    # the test set: every row the others leave, disjoint from both
    assert sorted([*plan.val, *plan.train[max(train_sizes)], *plan.test]) == list(range(n_rows))
    capped = split.plan_split(n_rows, val_size, train_sizes, seed, test_size=1)
    assert capped.test.tolist() == plan.test[:1].tolist() and capped.val.tolist() == plan.val.tolist()


@settings(max_examples=200, deadline=None)
@given(split_requests(), st.data())
def test_no_source_section_is_in_two_splits(request, data):
    n_rows, val_size, train_sizes, seed = request
    sections = data.draw(st.lists(st.integers(0, max(n_rows // 3, 1)), min_size=n_rows, max_size=n_rows))
    plan = split.plan_split(n_rows, val_size, train_sizes, seed, sections=sections)
    owners = {}
    for name, rows in (("val", plan.val), ("train", plan.train[max(train_sizes)]), ("test", plan.test)):
        for row in rows:
            assert owners.setdefault(sections[row], name) == name, f"section {sections[row]} in {owners[sections[row]]} and {name}"
    assert len(plan.val) >= val_size
    assert sorted([*plan.val, *plan.train[max(train_sizes)], *plan.test]) == list(range(n_rows))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(0, 100))
def test_too_few_rows_names_available_and_needed(val_size, largest, short_by):
    needed = val_size + largest + 1  # at least one test row
    available = max(needed - 1 - short_by, 0)
    with pytest.raises(TonetuneError, match=rf"needs {needed} rows .* only {available}"):
        split.plan_split(available, val_size, [largest], seed=0)


def test_seed_changes_the_split():
    first = split.plan_split(1000, 100, [100], seed=0)
    second = split.plan_split(1000, 100, [100], seed=1)
    assert first.val.tolist() != second.val.tolist()


# ------------------------------------------------------------------ the stage


def distinct_pairs(count: int) -> pd.DataFrame:
    """`count` pairs with distinct questions (real ones, from the demo recording) and sections."""
    questions = [json.loads(line)["question"] for line in (REPO_ROOT / "recordings/demo/part-1.jsonl").read_text().splitlines()]
    frame = many_pairs(count)
    frame["question"] = questions[:count]
    frame["source_id"] = [f"section-{position}" for position in range(count)]
    return frame


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, write_params, mlflow_uri):
    """A repo-shaped working dir: 12 validated pairs, a passing gate summary, a manifest."""
    write_params({"split": {"val_size": 3, "train_sizes": [6, 2, 4], "seed": 5, "min_test_size": 1}},
                 path=tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/generated").mkdir(parents=True)
    distinct_pairs(12).to_parquet("data/generated/pairs.parquet")
    write_gate(success=True)
    (tmp_path / "data/generated/manifest.json").write_text(json.dumps({"mlflow_run_id": "gen-run-123"}))
    return tmp_path


def write_gate(success: bool, md5: str | None = None, failed=()):
    """A metrics/data_quality.json like the validate stage writes."""
    summary = {"success": success, "failed_checks": ", ".join(failed), "rows": 12,
               "pairs_md5": md5 or file_md5("data/generated/pairs.parquet")}
    split.write_json(split.DATA_QUALITY_PATH, summary)


def test_stage_writes_nested_disjoint_files_stats_and_mlflow_run(stage_dir, capsys):
    import mlflow

    split.main([])
    frames = {path.stem: pd.read_parquet(path) for path in (stage_dir / "data/splits").glob("*.parquet")}
    assert sorted(frames) == ["test", "train_2", "train_4", "train_6", "val"]
    assert list(frames["val"].columns) == list(many_pairs(1).columns)
    ids = {name: frame["id"].tolist() for name, frame in frames.items()}
    assert ids["train_2"] == ids["train_4"][:2] and ids["train_4"] == ids["train_6"][:4]
    assert not set(ids["val"]) & set(ids["train_6"])
    assert not set(ids["test"]) & (set(ids["val"]) | set(ids["train_6"]))

    stats = json.loads((stage_dir / "reports/splits.json").read_text())
    assert stats["pairs_rows"] == 12 and stats["unused_rows"] == 0 and stats["test_dropped_near_duplicates"] == 0
    assert {name: s["rows"] for name, s in stats["splits"].items()} == {
        "val": 3, "train_2": 2, "train_4": 4, "train_6": 6, "test": 3}
    for s in stats["splits"].values():
        assert 75 <= s["flesch_min"] <= s["flesch_median"] and s["flesch_min"] <= s["flesch_mean"]
        assert s["answer_chars_mean"] > s["question_chars_mean"] > 10
    metrics = json.loads((stage_dir / "metrics/splits.json").read_text())
    assert metrics == {
        "pairs_rows": 12, "unused_rows": 0,
        "val_rows": 3, "val_flesch_mean": stats["splits"]["val"]["flesch_mean"],
        "train_largest_rows": 6, "train_largest_flesch_mean": stats["splits"]["train_6"]["flesch_mean"],
        "test_rows": 3, "test_dropped_near_duplicates": 0, "cross_split_max_cosine": stats["cross_split_max_cosine"],
    }
    assert 0 < metrics["cross_split_max_cosine"] <= 0.8

    [run] = mlflow.search_runs(experiment_names=["tonetune"], output_format="list")
    assert run.info.run_name == "split"
    tags = run.data.tags
    assert tags["generation_run_id"] == "gen-run-123"
    assert tags["pairs_md5"] == file_md5("data/generated/pairs.parquet")
    assert tags["data_quality_success"] == "true"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train_2", "train_4", "train_6", "val"]
    for name, dataset_input in inputs.items():
        assert dataset_input.dataset.digest == file_md5(f"data/splits/{name}.parquet")
        context = {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]
        assert context == {"val": "validation", "test": "test"}.get(name, "training")
    assert f"MLflow run {run.info.run_id}" in capsys.readouterr().out


def test_stage_is_deterministic_and_drops_stale_train_files(stage_dir):
    split.main([])
    first = {p.name: file_md5(p) for p in (stage_dir / "data/splits").glob("*.parquet")}
    (stage_dir / "data/splits/train_9000.parquet").write_bytes(b"from an old config")
    split.main([])
    second = {p.name: file_md5(p) for p in (stage_dir / "data/splits").glob("*.parquet")}
    assert first == second


@pytest.mark.parametrize(
    "prepare, message",
    [
        (lambda d: write_gate(False, failed=["answer_flesch", "id_unique"]),
         "data-quality gate failed for data/generated/pairs.parquet (answer_flesch, id_unique; details in "
         "reports/data_quality/summary.json)"),
        (lambda d: write_gate(True, md5="0" * 32), f"is for pairs md5 {'0' * 32} but"),
        (lambda d: (d / split.DATA_QUALITY_PATH).unlink(), "metrics/data_quality.json not found: run the validate stage"),
        (lambda d: distinct_pairs(8).to_parquet("data/generated/pairs.parquet") or write_gate(True),
         "split needs 10 rows (split.val_size 3 + largest split.train_sizes 6 + test 1) but pairs has only 8"),
        (lambda d: near_duplicate(d, "val", "train") or write_gate(True), "to a training question: the pairs were not deduplicated"),
    ],
    ids=["gate_failed", "other_pairs_md5", "not_validated", "too_few_rows", "val_train_near_duplicate"],
)
def test_refuses_before_writing_anything(stage_dir, prepare, message, capsys):
    prepare(stage_dir)
    with pytest.raises(SystemExit) as exit_info:
        split.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (stage_dir / "data/splits").exists() and not (stage_dir / "metrics/splits.json").exists()


def plan_of(pairs: pd.DataFrame):
    """The plan the stage_dir params give for these pairs (val 3, train 6, seed 5)."""
    return split.plan_split(len(pairs), 3, [2, 4, 6], 5, None, 1, pairs["source_id"].tolist())


def near_duplicate(directory, into: str, of: str) -> None:
    """Rewrite pairs.parquet so that a question of split `into` repeats one of split `of`."""
    pairs = pd.read_parquet("data/generated/pairs.parquet")
    plan = plan_of(pairs)
    rows = {"val": plan.val, "train": plan.train[6], "test": plan.test}
    pairs.loc[rows[into][0], "question"] = pairs.loc[rows[of][0], "question"] + " "
    pairs.to_parquet("data/generated/pairs.parquet")


def test_a_test_question_that_repeats_a_training_question_is_dropped_and_counted(stage_dir):
    near_duplicate(stage_dir, "test", "train")
    write_gate(True)
    pairs = pd.read_parquet("data/generated/pairs.parquet")
    planted = pairs.loc[plan_of(pairs).test[0], "id"]
    split.main([])
    test = pd.read_parquet("data/splits/test.parquet")
    assert planted not in test["id"].tolist() and len(test) == 2
    assert json.loads(Path("metrics/splits.json").read_text())["test_dropped_near_duplicates"] == 1


def test_no_question_pair_across_splits_is_above_the_dedup_threshold(stage_dir):
    from pipeline.core.config import load_config
    from pipeline.core.textmetrics import load_embedder

    split.main([])
    frames = {p.stem: pd.read_parquet(p) for p in Path("data/splits").glob("*.parquet")}
    embedder, threshold = load_embedder(load_config().embeddings), load_config().generate.dedup_threshold
    groups = {"val": frames["val"], "train": frames["train_6"], "test": frames["test"]}
    for first, second in (("val", "train"), ("val", "test"), ("train", "test")):
        cosine = split.near_duplicates(groups[first]["question"].tolist(), groups[second]["question"].tolist(),
                                       embedder, threshold)
        assert cosine.max() <= threshold, (first, second, cosine.max())
        assert not set(groups[first]["source_id"]) & set(groups[second]["source_id"])
