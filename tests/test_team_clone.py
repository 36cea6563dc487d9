"""Storage that outlives a checkout: the default DVC remote is outside the working tree, and a
second clone against the shared tracking server and the shared remote gets the Production model
working after the first checkout is deleted (the model's base reference is an absolute path
into that deleted checkout; the clone's `dvc pull`ed models/base is used, hash-checked)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.errors import TonetuneError
from tests.conftest import REPO_ROOT
from tests.test_registry import QUESTION, SERVE_BATCH_SIZE, SERVE_POLICY, save_adapter


def sh(cwd: Path, *command: str) -> str:
    completed = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True)
    assert completed.returncode == 0, f"{' '.join(command)}: {completed.stdout}{completed.stderr}"
    return completed.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def test_the_default_dvc_remote_lives_outside_the_checkout():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc" / "config")
    default = config["core"]["remote"].strip()
    url = config[f"'remote \"{default}\"'"]["url"].strip()
    assert url.startswith(("~/", "/", "s3://")), url  # not a folder of the working tree
    resolved = Path(url).expanduser()
    assert REPO_ROOT not in resolved.parents


def test_a_second_clone_pulls_and_loads_the_production_model(team_server_info, tmp_path, tiny_llama_dir, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipeline.core.config import TrackingConfig
    from pipeline.core.tracking import configure_mlflow
    from registry.model import DecodingPolicy, base_model_reference, log_adapter_model, resolve_base_model

    remote, alice, bob = tmp_path / "team-remote", tmp_path / "alice", tmp_path / "bob"
    alice.mkdir()
    sh(alice, "git", "init", "-q", "-b", "main")
    dvc(alice, "init", "-q")
    dvc(alice, "remote", "add", "-d", "-f", "local", str(remote))  # the team's shared remote
    shutil.copytree(tiny_llama_dir, alice / "models" / "base")
    dvc(alice, "add", "-q", "models/base")
    sh(alice, "git", "add", "-A")
    sh(alice, "git", "commit", "-q", "-m", "base model")

    # alice trains (a tiny adapter over her models/base), logs it to the team server, promotes it
    team_server_info["ready"]()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server_info["uri"])
    monkeypatch.chdir(alice)
    configure_mlflow(TrackingConfig(experiment="team-clone", system_metrics=False))
    reference = base_model_reference(alice / "models" / "base")
    assert reference["path"] == str((alice / "models" / "base").resolve())
    adapter = save_adapter(tiny_llama_dir, alice / "models" / "adapters" / "lora-a", seed=5, r=4)
    with mlflow.start_run(run_name="lora-a"):
        info = log_adapter_model(adapter, reference, "fp32", DecodingPolicy(**SERVE_POLICY), SERVE_BATCH_SIZE)
    version = mlflow.register_model(info.model_uri, "tt-team-clone")
    MlflowClient().set_registered_model_alias("tt-team-clone", "production", version.version)
    expected = list(mlflow.pyfunc.load_model("models:/tt-team-clone@production").predict([QUESTION]))
    dvc(alice, "push", "-q")

    # bob clones, alice's checkout disappears, bob pulls and loads Production from the server
    sh(tmp_path, "git", "clone", "-q", str(alice), str(bob))
    monkeypatch.chdir(tmp_path)
    shutil.rmtree(alice)
    assert not (bob / "models" / "base").exists()
    dvc(bob, "pull", "-q")
    monkeypatch.chdir(bob)
    model = mlflow.pyfunc.load_model("models:/tt-team-clone@production")
    assert list(model.predict([QUESTION])) == expected and expected[0].strip()
    assert resolve_base_model(reference) == Path("models/base")  # bob's pulled copy, same weights hash

    monkeypatch.chdir(tmp_path)  # elsewhere (no models/base) the missing reference is one clear error
    with pytest.raises(TonetuneError, match=f"not found at {alice / 'models' / 'base'}"):
        mlflow.pyfunc.load_model("models:/tt-team-clone@production")
