"""The foundation stages under the real tools: `dvc repro source base_model` and
`mlflow run . -e source` in a throw-away git repo built from the working tree, plus the
MLproject's entry points.

The temporary repo is built by copying (not `git clone`, which would miss uncommitted files):
pipeline/, params.yaml, MLproject and a dvc.yaml cut down to the two foundation stages, taken
from the real dvc.yaml so the test follows it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.dvcmeta import file_md5, locked_outputs
from tests.conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent
FOUNDATION_STAGES = ("source", "base_model")
MLPROJECT_STAGES = ("source", "base_model", "generate", "validate", "split", "train", "predict", "score", "report", "promote")


def tool_env(**extra: str) -> dict[str, str]:
    """The test environment with the venv's python/dvc/mlflow first on PATH (stage commands say
    `python -m ...`), and no params override leaking in from another test."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("TONETUNE_PARAMS", None)
    return env


def run(command: list[str], cwd: Path, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=tool_env(**extra), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def foundation_repo(tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding the project code and only the foundation stages."""
    repo = tmp_path_factory.mktemp("foundation_repo")
    # the code, and what dvc.yaml names besides it: the tone's prompts, style metrics and the files corpus
    for folder in ("pipeline", "prompts", "tones", "corpora"):
        shutil.copytree(REPO_ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "MLproject"):
        shutil.copy(REPO_ROOT / name, repo / name)
    full = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    subset = {"stages": {name: full["stages"][name] for name in FOUNDATION_STAGES}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(subset, sort_keys=False))
    run(["git", "init", "--quiet"], repo)
    run([str(VENV_BIN / "dvc"), "init", "--quiet"], repo)
    run(["git", "add", "."], repo)
    run(["git", "commit", "--quiet", "-m", "foundation stages"], repo)
    return repo


@pytest.mark.slow
def test_dvc_repro_builds_the_foundation_and_then_has_nothing_to_do(foundation_repo):
    """Slow (1-3 min on 2 shared cores): the base_model stage really dequantises the 98 MB
    GGUF and DVC caches the 260 MB result; nothing less shows that dvc.yaml, the stage CLIs
    and the outputs agree."""
    first = run([str(VENV_BIN / "dvc"), "repro", *FOUNDATION_STAGES], foundation_repo)
    assert "Running stage 'source'" in first.stdout and "Running stage 'base_model'" in first.stdout

    sections = foundation_repo / "data/source/sections.parquet"
    base = foundation_repo / "models/base"
    assert sections.stat().st_size > 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tonetune_base.json"} <= {
        path.name for path in base.iterdir()
    }
    locked = {output.path: output for output in locked_outputs(foundation_repo / "dvc.lock")}
    assert locked["data/source/sections.parquet"].md5 == file_md5(sections)
    assert locked["models/base"].is_dir and len(locked["models/base"].md5) == 32
    assert locked["models/base"].stage == "base_model"

    second = run([str(VENV_BIN / "dvc"), "repro", *FOUNDATION_STAGES], foundation_repo)
    assert "Running stage" not in second.stdout, second.stdout
    assert "up to date" in second.stdout
    status = run([str(VENV_BIN / "dvc"), "status"], foundation_repo)
    assert "up to date" in status.stdout, status.stdout


def test_mlflow_run_source_entry_point(foundation_repo, tmp_path):
    """`mlflow run . -e source --env-manager local` works offline and records a finished run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    output = foundation_repo / "data/source/sections.parquet"
    result = run(
        [str(VENV_BIN / "mlflow"), "run", ".", "-e", "source", "--env-manager", "local"],
        foundation_repo, MLFLOW_TRACKING_URI=uri,
    )
    assert "source: 1539 sections" in result.stdout + result.stderr
    assert output.exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(run.info.status, run.data.tags["mlflow.project.entryPoint"]) for run in runs] == [("FINISHED", "source")]


def load_mlproject():
    from mlflow.projects import _project_spec

    return _project_spec.load_project(str(REPO_ROOT))


def test_mlproject_has_an_entry_point_per_stage():
    project = load_mlproject()
    for stage in MLPROJECT_STAGES:
        command = project.get_entry_point(stage).compute_command({}, "/tmp")
        module = "registry.promote" if stage == "promote" else f"pipeline.{stage}"
        assert f"python -m {module}" in command, command


def train_argv(parameters: dict[str, str]) -> list[str]:
    """The argv `mlflow run -e train` would give pipeline.train: the entry point's command,
    rendered by MLflow and run by bash as MLflow does, with `python` swapped for a printer."""
    command = load_mlproject().get_entry_point("train").compute_command(parameters, "/tmp")
    assert "python -m pipeline.train" in command, command
    printer = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    command = command.replace("python -m pipeline.train", printer)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=True)
    import json

    return json.loads(result.stdout)


def test_mlproject_train_passes_the_grid_point():
    train = load_mlproject().get_entry_point("train")
    assert set(train.parameters) == {"precision", "lora_r", "learning_rate", "n_train", "adapter_dir"}
    point = {"precision": "int8", "lora_r": "48", "learning_rate": "0.0002", "n_train": "100"}
    assert train_argv({**point, "adapter_dir": "models/x y"}) == [
        "--precision", "int8", "--lora-r", "48", "--learning-rate", "0.0002", "--n-train", "100",
        "--adapter-dir", "models/x y",
    ]
    # Without adapter_dir, pipeline.train picks models/adapters/<run-name> itself.
    assert train_argv(point)[-2:] == ["--n-train", "100"]
    assert "--adapter-dir" not in train_argv(point)


def test_mlproject_train_flags_are_the_ones_pipeline_train_accepts():
    help_text = run([sys.executable, "-m", "pipeline.train", "--help"], REPO_ROOT, timeout=60).stdout
    for flag in ("--precision", "--lora-r", "--learning-rate", "--n-train", "--adapter-dir"):
        assert flag in help_text, f"pipeline.train has no {flag} option"


def test_mlproject_train_defaults_are_the_demo_grid_point():
    """`mlflow run . -e train` with no -P trains what `dvc repro` trains: the defaults are the
    first value of each train.grid list in params.yaml (the demo has one point)."""
    grid = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["grid"]
    defaults = {name: parameter.default for name, parameter in load_mlproject().get_entry_point("train").parameters.items()}
    assert defaults["precision"] == grid["precision"][0]
    for name in ("lora_r", "learning_rate", "n_train"):
        assert float(defaults[name]) == float(grid[name][0]), (name, defaults[name], grid[name])
