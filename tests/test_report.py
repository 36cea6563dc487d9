"""Stage `report`: results.md in Table A.6's shape and Figures 2-4 from a fixture metrics set."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from pipeline import report
from pipeline.core.evalmetrics import metrics_record

FAMILY = "SmolLM2-135M-Instruct"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lora_name(precision, r, lr, n):
    return f"lora-{precision}-r{r}-lr{lr:g}-n{n}"


def summary(pct, similarity, n_eval=100):
    return {"n_eval": n_eval, "pct_conversational": pct, "pct_conversational_ci_low": max(0, pct - 9),
            "pct_conversational_ci_high": min(100, pct + 9), "flesch_mean": 40 + pct / 3, "flesch_median": 41 + pct / 3,
            "similarity_mean": similarity, "answer_words_mean": 55 - pct / 4}


def write_records(folder: Path, grid: bool = True, openai: bool = False) -> list[dict]:
    """A base model and LoRA adapters (a 2x2x2x2 grid, or one adapter), as evaluate writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [metrics_record("base", "base", summary(12.0, 0.712), family=FAMILY, precision="fp32", system_prompt="verbose")]
    points = itertools.product(["bf16", "int8"], [32, 64], [1e-4, 1e-3], [25, 150]) if grid else [("int8", 32, 1e-3, 150)]
    for index, (precision, r, lr, n) in enumerate(points):
        pct = min(98.0, 20 + n / 2 + (30 if lr == 1e-3 else 0) + (10 if precision == "int8" else 0) + index % 3)
        records.append(metrics_record(lora_name(precision, r, lr, n), "lora", summary(pct, 0.70 + index / 1000),
                                      family=FAMILY, precision=precision, lora_r=r, lora_alpha=r, learning_rate=lr, n_train=n))
    if openai:
        records.append(metrics_record("openai-gpt-4o-mini-2024-07-18", "openai-base", summary(29.4, 0.85), family="gpt-4o-mini"))
        records.append(metrics_record("openai-gpt-4o-mini-2024-07-18-n100", "openai-finetuned", summary(90.8, 0.86),
                                      family="gpt-4o-mini", n_train=100))
    for record in records:
        (folder / f"{record['model']}.json").write_text(json.dumps(record))
    return records


@pytest.fixture
def report_dir(tmp_path, monkeypatch, write_params):
    write_params({"openai": {"enabled": False, "n_train": [100]}})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_valid_png(path: Path, min_bytes: int = 15_000) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > min_bytes, f"{path}: only {len(data)} bytes"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        # non-trivial: not one flat colour
        extrema = image.convert("L").getextrema()
        assert extrema[1] - extrema[0] > 100
    assert width >= 600 and height >= 400
    return width, height


def test_report_from_a_fixture_grid(report_dir, capsys):
    records = write_records(Path("metrics/eval"))
    report.main(["--no-mlflow"])

    results = Path("reports/results.md").read_text()
    header = ("| Model | Data type | LoRA r | Learning rate | Training samples | % conversational responses "
              "| 95% CI | Similarity prediction & correct answer |")
    assert header in results
    assert f"| {FAMILY} | float32 | - | - | 0 | 12.0 | 3.0-21.0 | 0.712 |" in results  # the base row
    best = max(records[1:], key=lambda r: r["pct_conversational"])
    assert f"| {FAMILY} finetuned | {best['pct_conversational']:.1f} |" in results
    assert f"| {FAMILY} | int8 | 64 | 0.001 | 150 |" in results
    table_lines = [line for line in results.splitlines() if line.startswith(f"| {FAMILY} |")]
    assert len(table_lines) == 1 + 16
    # OpenAI disabled in params: both paper models appear as not run, for 0 and each n_train.
    assert results.count("| gpt-4o-mini | unknown | unknown | unknown | 0 | not run |") == 1
    assert results.count("| gpt-4.1-mini | unknown | unknown | unknown | 100 | not run |") == 1

    for name in report.FIGURE_FILES.values():
        assert_valid_png(Path("reports/figures") / name)
    import pandas as pd

    lines = pd.read_csv("reports/plots/on_style_vs_samples.csv")
    assert set(lines["panel"]) == {"bfloat16, r=32", "bfloat16, r=64", "int8, r=32", "int8, r=64"}
    assert len(lines) == 16 + 8  # every (precision, r, lr) line starts at the base model (n_train 0)
    assert (lines[lines["n_train"] == 0]["pct_conversational"] == 12.0).all()
    bars = pd.read_csv("reports/plots/base_vs_finetuned.csv")
    assert bars["pct_conversational"].tolist() == [12.0, best["pct_conversational"]]
    assert "finetuned" in capsys.readouterr().out


def test_report_with_one_adapter_and_openai_rows(report_dir):
    write_records(Path("metrics/eval"), grid=False)
    write_records(Path("metrics/openai"), grid=False, openai=True)  # the OpenAI arm's own folder
    for path in Path("metrics/openai").glob("*.json"):
        if "openai" not in path.name:
            path.unlink()
    report.main(["--no-mlflow"])
    results = Path("reports/results.md").read_text()
    assert "| gpt-4o-mini | unknown | unknown | unknown | 100 | 90.8 |" in results
    assert "| gpt-4.1-mini | unknown | unknown | unknown | 0 | not run |" in results  # only the missing one
    assert "| gpt-4o-mini | unknown | unknown | unknown | 0 | not run |" not in results
    for name in report.FIGURE_FILES.values():
        assert_valid_png(Path("reports/figures") / name)


def test_report_logs_figures_to_mlflow(report_dir, mlflow_uri):
    import mlflow

    write_records(Path("metrics/eval"), grid=False)
    report.main([])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'report'")
    assert len(runs) == 1
    client = mlflow.MlflowClient()
    run_id = runs.iloc[0]["run_id"]
    figures = {Path(a.path).name for a in client.list_artifacts(run_id, "report/figures")}
    assert figures == set(report.FIGURE_FILES.values())
    assert client.get_run(run_id).data.metrics["SmolLM2_135M_Instruct.base_pct_conversational"] == 12.0


def test_report_without_metrics_fails_in_one_line(report_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--no-mlflow"])
    assert exit_info.value.code == 2
    assert "no metrics" in capsys.readouterr().err


def test_a_broken_metrics_file_is_named(report_dir, capsys):
    Path("metrics/eval").mkdir(parents=True)
    Path("metrics/eval/base.json").write_text('{"model": "base"}')
    with pytest.raises(SystemExit):
        report.main(["--no-mlflow"])
    assert "metrics/eval/base.json: not a metrics record" in capsys.readouterr().err


def test_report_shows_degeneration_and_the_decoding_ablation(report_dir):
    folder = Path("metrics/eval")
    folder.mkdir(parents=True)
    degeneration = {"stopped_pct": 54.0, "repetition_rate": 0.29}
    ablation = {"ablation_n_eval": 40, "ablation_greedy_pct_conversational": 72.5, "ablation_policy_pct_conversational": 80.0,
                "ablation_greedy_similarity_mean": 0.544, "ablation_policy_similarity_mean": 0.542,
                "ablation_greedy_stopped_pct": 60.0, "ablation_policy_stopped_pct": 82.5,
                "ablation_greedy_repetition_rate": 0.29, "ablation_policy_repetition_rate": 0.009}
    adapter = metrics_record("lora-bf16-r32-lr0.001-n150", "lora", {**summary(80.0, 0.551), **degeneration, **ablation},
                             family=FAMILY, precision="bf16", lora_r=32, learning_rate=1e-3, n_train=150)
    base = metrics_record("base", "base", summary(22.0, 0.59), family=FAMILY, precision="bf16", system_prompt="verbose")
    for record in (adapter, base):
        (folder / f"{record['model']}.json").write_text(json.dumps(record))
    report.main(["--no-mlflow"])
    results = Path("reports/results.md").read_text()
    assert "| Similarity prediction & correct answer | % ended turn | repetition |" in results
    assert "| 80.0 | 71.0-89.0 | 0.551 | 54.0 | 0.290 |" in results
    assert "| 22.0 | 13.0-31.0 | 0.590 | - | - |" in results  # a record without degeneration keys
    assert "Decoding, the same for every model: greedy, no_repeat_ngram_size=4" in results
    ablation_part = results.split("## Decoding ablation", 1)[1]
    assert "first `evaluate.ablation_limit`" in ablation_part
    assert "| lora-bf16-r32-lr0.001-n150 | 40 | 72.5 | 80.0 | 0.544 | 0.542 | 60.0 | 82.5 | 0.290 | 0.009 |" in ablation_part
    assert "| base |" not in ablation_part  # no ablation recorded for it
