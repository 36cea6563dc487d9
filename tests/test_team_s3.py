"""S3-compatible storage: the DVC remote and MLflow artifacts on S3, against moto's S3 server on
127.0.0.1 (tests/fakes/s3_server.py), with the real dvc / dvc-s3 and MLflow clients."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.s3_server import S3Server


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.create_bucket("tonetune")
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def dvc(repo: Path, *args: str) -> str:
    completed = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True,
                               env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert completed.returncode == 0, f"dvc {' '.join(args)}: {completed.stdout}{completed.stderr}"
    return completed.stdout


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_push_then_pull_from_s3_restores_byte_identical_outputs(s3_env, tmp_path):
    """`dvc push` to an S3 remote, delete the cache and the outputs, `dvc pull`: same bytes.
    The remote's config holds only the bucket and endpoint; credentials come from the environment."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "remote", "add", "-d", "team", "s3://tonetune/dvc-storage")
    dvc(repo, "remote", "modify", "team", "endpointurl", s3_env.endpoint_url)
    adapter = repo / "models" / "adapters" / "lora-x"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(300_000))
    (adapter / "adapter_config.json").write_text('{"r": 8}\n')
    (repo / "data").mkdir()
    (repo / "data" / "pairs.parquet").write_bytes(os.urandom(50_000))
    dvc(repo, "add", "-q", "models/adapters/lora-x", "data/pairs.parquet")
    before = {**tree_digest(adapter), "pairs": hashlib.sha256((repo / "data/pairs.parquet").read_bytes()).hexdigest()}

    dvc(repo, "push", "-q")
    assert len(s3_env.keys("tonetune", "dvc-storage/")) == 4  # 3 files + the directory manifest
    assert "testing-secret" not in (repo / ".dvc" / "config").read_text()

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(adapter)
    (repo / "data" / "pairs.parquet").unlink()
    dvc(repo, "pull", "-q")
    after = {**tree_digest(adapter), "pairs": hashlib.sha256((repo / "data/pairs.parquet").read_bytes()).hexdigest()}
    assert after == before
    assert "in sync" in dvc(repo, "status", "--cloud")


def test_mlflow_artifacts_on_s3_log_and_load_back(s3_env, tmp_path):
    """An experiment whose artifact_location is s3://...: a logged file and a logged pyfunc model
    land in the bucket and load back through MLflow."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("s3", artifact_location="s3://tonetune/mlartifacts")
    report = tmp_path / "results.md"
    report.write_text("# results\nbase 22% -> lora 82%\n")

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [f"echo: {q}" for q in model_input["question"]]

    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(report), "report")
        info = mlflow.pyfunc.log_model(name="echo", python_model=Echo())
    keys = s3_env.keys("tonetune", f"mlartifacts/{run.info.run_id}/")
    assert f"mlartifacts/{run.info.run_id}/artifacts/report/results.md" in keys

    downloaded = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report/results.md",
                                                     dst_path=str(tmp_path / "back"))
    assert Path(downloaded).read_bytes() == report.read_bytes()
    import pandas as pd

    model = mlflow.pyfunc.load_model(info.model_uri)
    assert list(model.predict(pd.DataFrame({"question": ["why?"]}))) == ["echo: why?"]
    mlflow.set_tracking_uri(None)
