"""A real `dvc repro` in a temporary git repo: the gate stops the DAG on bad data, lets good data
through to split, and `dvc metrics show`, `dvc params diff` and `registry lineage` work on the
result.

The repo gets a copy of pipeline/ and registry/, the project's params.yaml (split scaled down
to 10 rows), and a dvc.yaml holding the project's REAL validate and split entries (read from
the repo's dvc.yaml, so a wrong dep/out there fails here) plus a stub `generate` stage that
copies a fixture parquet and logs a real MLflow run, like the real stage's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.pairs_fixtures import FLESCH_ROW, clean_pairs, with_row

pytestmark = pytest.mark.slow  # three `dvc repro` runs, each loading GX + MiniLM: ~2-3 min on 2 cores

STUB_GENERATE = """\
import json, os, shutil
import mlflow

mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
mlflow.set_experiment("tonetune")
with mlflow.start_run(run_name="generate") as run:
    mlflow.log_param("backend", "fixture")
os.makedirs("data/generated", exist_ok=True)
shutil.copy("fixtures/pairs.parquet", "data/generated/pairs.parquet")
manifest = {"mlflow_run_id": run.info.run_id, "experiment": "tonetune", "prompt_version": "fixture-v1",
            "model": "fixture", "backend": "fixture", "source_corpus": "fixture corpus 1.0",
            "sections_md5": "0123456789abcdef0123456789abcdef"}
with open("data/generated/manifest.json", "w") as handle:
    json.dump(manifest, handle)
"""


def run(command: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the temp repo, output captured as text."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def stage_definitions() -> dict:
    """The stub generate stage + the project's own validate and split stages."""
    project = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    generate = {
        "cmd": "python fixtures/generate.py",
        "deps": ["fixtures/generate.py", "fixtures/pairs.parquet"],
        "params": ["generate"],
        "outs": ["data/generated/pairs.parquet", "data/generated/manifest.json"],
    }
    return {"stages": {"generate": generate, "validate": project["validate"], "split": project["split"]}}


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """Build the repo, run the pipeline on bad data, then on good data; record what happened."""
    from pipeline.core.assets import ensure_nltk_cmudict

    ensure_nltk_cmudict()  # share the project's offline CMU dictionary with the subprocesses
    root = tmp_path_factory.mktemp("dvc_gate")
    repo = root / "repo"
    (repo / "fixtures").mkdir(parents=True)
    for package in ("pipeline", "registry", "prompts", "tones", "corpora"):  # code, and what dvc.yaml names
        shutil.copytree(REPO_ROOT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["split"] = {"val_size": 3, "train_sizes": [2, 4, 6], "test_size": None, "min_test_size": 1, "seed": 0}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stage_definitions(), sort_keys=False))
    (repo / "fixtures/generate.py").write_text(STUB_GENERATE)
    (repo / ".gitignore").write_text("__pycache__/\n/mlartifacts/\n/nltk_data/\n")

    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PYTHONPATH": str(repo),
    }
    env.pop("TONETUNE_PARAMS", None)
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["dvc", "init", "-q"], repo, env)

    record: dict = {"repo": repo, "env": env}
    with_row(clean_pairs(), **FLESCH_ROW).to_parquet(repo / "fixtures/pairs.parquet")
    record["bad"] = run(["dvc", "repro"], repo, env, check=False)
    record["bad_split_outputs"] = sorted(str(p.relative_to(repo)) for p in repo.glob("data/splits/*")) + (
        ["metrics/splits.json"] if (repo / "metrics/splits.json").exists() else [])
    record["bad_summary"] = json.loads((repo / "metrics/data_quality.json").read_text())
    record["bad_lock"] = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").exists() else {}

    clean_pairs().to_parquet(repo / "fixtures/pairs.parquet")
    record["good"] = run(["dvc", "repro"], repo, env, check=False)
    if record["good"].returncode != 0:
        return record  # test_good_data_runs_validate_then_split reports why; the rest have nothing to read
    record["good_lock"] = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    record["good_status"] = run(["dvc", "status"], repo, env).stdout.strip()

    # Everything the later tests read is made here, in this order, so that each test can run
    # alone (-k) and none depends on another having run first.
    run(["git", "add", "."], repo, env)
    run(["git", "commit", "-q", "-m", "pipeline on good data"], repo, env)
    record["metrics_show"] = run(["dvc", "metrics", "show"], repo, env).stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"]["seed"] = 7
    params["generate"]["dedup_threshold"] = 0.85
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    record["params_diff"] = run(["dvc", "params", "diff"], repo, env).stdout
    return record


def good_run(dvc_repo) -> dict:
    """The fixture's record, failing with the pipeline's own output if the good run failed."""
    good = dvc_repo["good"]
    assert good.returncode == 0, good.stdout + good.stderr
    return dvc_repo


def test_bad_data_stops_at_validate_and_split_never_runs(dvc_repo):
    bad = dvc_repo["bad"]
    output = bad.stdout + bad.stderr
    assert bad.returncode != 0, output
    assert "Running stage 'validate'" in output and "Running stage 'split'" not in output
    assert "FAILED answer_flesch" in output and "id='planted'" in output and "value=74.805" in output
    assert dvc_repo["bad_split_outputs"] == []
    assert dvc_repo["bad_summary"]["success"] is False
    assert dvc_repo["bad_summary"]["failed_checks"] == "answer_flesch"
    assert set(dvc_repo["bad_lock"].get("stages", {})) == {"generate"}, "a failed validate is not locked"


def test_good_data_runs_validate_then_split(dvc_repo):
    good, repo = dvc_repo["good"], dvc_repo["repo"]
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Running stage 'split'" in good.stdout
    assert sorted(p.name for p in (repo / "data/splits").iterdir()) == [
        "test.parquet", "train_2.parquet", "train_4.parquet", "train_6.parquet", "val.parquet"]
    assert (repo / "reports/data_quality/index.html").exists()
    lock = good_run(dvc_repo)["good_lock"]
    assert {"generate", "validate", "split"} <= set(lock)
    assert lock["validate"]["params"]["params.yaml"]["tone.gate"] == [
        {"metric": "flesch_reading_ease", "direction": "higher", "threshold": 75}]
    assert {out["path"] for out in lock["split"]["outs"]} == {"data/splits", "reports/splits.json", "metrics/splits.json"}
    assert {out["path"] for out in lock["validate"]["outs"]} == {"reports/data_quality", "metrics/data_quality.json"}
    assert "data_quality" in (repo / "reports/.gitignore").read_text(), "Data Docs live in the DVC cache"
    assert dvc_repo["good_status"] == "Data and pipelines are up to date."


def test_metrics_show_and_params_diff_after_commit(dvc_repo):
    metrics = good_run(dvc_repo)["metrics_show"]
    repo, env = dvc_repo["repo"], dvc_repo["env"]
    assert "metrics/data_quality.json" in metrics and "metrics/splits.json" in metrics
    assert "train_largest_rows" in metrics and "checks_failed" in metrics
    # Scalars only: `dvc metrics show --json` returns every key of both files (DVC drops lists
    # and nulls, logging "unsupported type").
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    data = shown[""]["data"]
    for name in ("metrics/data_quality.json", "metrics/splits.json"):
        assert data[name]["data"] == json.loads((repo / name).read_text()), name

    diff = dvc_repo["params_diff"]
    assert "split.seed" in diff and "generate.dedup_threshold" in diff, diff


def test_lineage_of_a_split_file(dvc_repo):
    repo, env = good_run(dvc_repo)["repo"], dvc_repo["env"]
    result = run([sys.executable, "-m", "registry", "lineage", "data/splits/train_4.parquet"], repo, env)
    text = result.stdout
    commit = run(["git", "log", "-1", "--format=%H", "--", "dvc.lock"], repo, env).stdout.strip()
    lines = text.splitlines()
    assert lines[0] == "lineage of data/splits/train_4.parquet"
    assert "-> stage    split" in text
    stages_in_order = [line.split(":")[0].split()[-1] for line in lines if "-> params" in line]
    assert stages_in_order == ["split", "validate", "generate"]
    assert "! split.seed is 7 in params.yaml now (locked 0)" in text
    assert "generation run" in text and ": found (FINISHED" in text
    assert "fixture corpus 1.0" in text and "sections_md5=0123456789abcdef" in text
    assert f"-> commit   {commit}" in text and "pipeline on good data" in text
    assert lines[-1].startswith("  MATCH:")

    # Replace (not edit: the cache may be linked) the file: lineage must notice.
    target = repo / "data/splits/train_4.parquet"
    target.unlink()
    target.write_bytes(b"edited by hand")
    modified = run([sys.executable, "-m", "registry", "lineage", "--json", "--strict",
                    "data/splits/train_4.parquet"], repo, env, check=False)
    assert modified.returncode == 1
    assert json.loads(modified.stdout)["status"] == "MODIFIED"
