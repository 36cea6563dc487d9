"""Stage split: nested/disjoint/seeded invariants (hypothesis), the gate check, the too-few-rows
error, the files, the stats and the MLflow run (real sqlite store)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import split
from pipeline.core.dvcmeta import file_md5
from pipeline.core.errors import TonetuneError
from tests.pairs_fixtures import many_pairs


@st.composite
def split_requests(draw):
    """(n_rows, val_size, train_sizes, seed) with enough rows for the request."""
    train_sizes = draw(st.lists(st.integers(1, 60), min_size=1, max_size=5, unique=True))
    val_size = draw(st.integers(1, 40))
    n_rows = val_size + max(train_sizes) + draw(st.integers(0, 30))
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


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 50), st.integers(1, 50), st.integers(0, 100))
def test_too_few_rows_names_available_and_needed(val_size, largest, short_by):
    needed = val_size + largest
    available = max(needed - 1 - short_by, 0)
    with pytest.raises(TonetuneError, match=rf"needs {needed} rows .* only {available}"):
        split.plan_split(available, val_size, [largest], seed=0)


def test_seed_changes_the_split():
    first = split.plan_split(1000, 100, [100], seed=0)
    second = split.plan_split(1000, 100, [100], seed=1)
    assert first.val.tolist() != second.val.tolist()


# ------------------------------------------------------------------ the stage


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, write_params, mlflow_uri):
    """A repo-shaped working dir: 12 validated pairs, a passing gate summary, a manifest."""
    write_params({"split": {"val_size": 3, "train_sizes": [6, 2, 4], "seed": 5}}, path=tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/generated").mkdir(parents=True)
    many_pairs(12).to_parquet("data/generated/pairs.parquet")
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
    assert sorted(frames) == ["train_2", "train_4", "train_6", "val"]
    assert list(frames["val"].columns) == list(many_pairs(1).columns)
    ids = {name: frame["id"].tolist() for name, frame in frames.items()}
    assert ids["train_2"] == ids["train_4"][:2] and ids["train_4"] == ids["train_6"][:4]
    assert not set(ids["val"]) & set(ids["train_6"])

    stats = json.loads((stage_dir / "reports/splits.json").read_text())
    assert stats["pairs_rows"] == 12 and stats["unused_rows"] == 3
    assert {name: s["rows"] for name, s in stats["splits"].items()} == {"val": 3, "train_2": 2, "train_4": 4, "train_6": 6}
    for s in stats["splits"].values():
        assert 75 <= s["flesch_min"] <= s["flesch_median"] and s["flesch_min"] <= s["flesch_mean"]
        assert s["answer_chars_mean"] > s["question_chars_mean"] > 10
    metrics = json.loads((stage_dir / "metrics/splits.json").read_text())
    assert metrics == {
        "pairs_rows": 12, "unused_rows": 3,
        "val_rows": 3, "val_flesch_mean": stats["splits"]["val"]["flesch_mean"],
        "train_largest_rows": 6, "train_largest_flesch_mean": stats["splits"]["train_6"]["flesch_mean"],
    }

    [run] = mlflow.search_runs(experiment_names=["tonetune"], output_format="list")
    assert run.info.run_name == "split"
    tags = run.data.tags
    assert tags["generation_run_id"] == "gen-run-123"
    assert tags["pairs_md5"] == file_md5("data/generated/pairs.parquet")
    assert tags["data_quality_success"] == "true"
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["train_2", "train_4", "train_6", "val"]
    for name, dataset_input in inputs.items():
        assert dataset_input.dataset.digest == file_md5(f"data/splits/{name}.parquet")
        context = {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"]
        assert context == ("validation" if name == "val" else "training")
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
        (lambda d: many_pairs(8).to_parquet("data/generated/pairs.parquet") or write_gate(True),
         "split needs 9 rows (split.val_size 3 + largest split.train_sizes 6) but pairs has only 8"),
    ],
    ids=["gate_failed", "other_pairs_md5", "not_validated", "too_few_rows"],
)
def test_refuses_before_writing_anything(stage_dir, prepare, message, capsys):
    prepare(stage_dir)
    with pytest.raises(SystemExit) as exit_info:
        split.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (stage_dir / "data/splits").exists() and not (stage_dir / "metrics/splits.json").exists()
