"""The train grid fanned out with Ray (pipeline.grid) on CPU: a local Ray with 2 CPUs and no GPU,
two grid points of the tiny fixture model trained in parallel by the real train stage, both
logged to the session's PostgreSQL-backed tracking server (with system metrics), both adapters
committed to DVC so that `dvc status` is clean and `dvc repro` skips them."""

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
from tests.test_train import TRAIN_OVERRIDES, write_splits

POINTS = ["train@fp32-4-0.01-20", "train@fp32-8-0.01-20"]
NAMES = ["lora-fp32-r4-lr0.01-n20", "lora-fp32-r8-lr0.01-n20"]


def run(command: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir):
    """A git + DVC project with the repo's dvc.yaml, pipeline code, the tiny base model, toy splits
    and params with a two-point grid (r 4 and 8)."""
    root = tmp_path_factory.mktemp("grid_project")
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in ("pipeline", "registry", "prompts", "tones", "corpora"):  # code, and what dvc.yaml names
        shutil.copytree(REPO_ROOT / folder, root / folder, ignore=ignore)
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"] = {**params["train"], **TRAIN_OVERRIDES,
                       "grid": {**TRAIN_OVERRIDES["grid"], "lora_r": [4, 8]}}
    params["tracking"] = {**params["tracking"], "experiment": "team-grid", "system_metrics_interval_s": 1}
    params["evaluate"] = {**params["evaluate"], "max_new_tokens": 8}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(tiny_llama_dir, root / "models" / "base")
    write_splits(root / "data" / "splits")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


@pytest.mark.slow
def test_two_grid_points_run_in_parallel_as_ray_tasks_and_are_committed(project, team_server_info):
    """Slow (~2 min on the shared 2-core machine): a local Ray starts (~15 s), two fresh stage
    processes import torch, TRL and MLflow side by side on 2 cores and train, then DVC hashes
    and commits; a second run of the grid checks that nothing is redone."""
    import mlflow

    team_server_info["ready"]()
    env = {**os.environ, "MLFLOW_TRACKING_URI": team_server_info["uri"], "PYTHONPATH": str(project)}
    env.pop("TONETUNE_PARAMS", None)
    command = [sys.executable, "-m", "pipeline.grid", "--executor", "ray", "--num-cpus", "2", "--num-gpus", "0"]
    completed = run(command, project, env)
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    out = completed.stdout
    print(out)  # the fan-out's report (shown with -rP, and on failure)
    assert "2 point(s) submitted to Ray (0 GPU, 2 CPU; 0 GPU per task)" in out
    assert all(f"grid: {point} done" in out for point in POINTS), out
    assert "grid: 2 built, 0 failed" in out

    # both runs on the shared server, under one grid parent, with system metrics
    mlflow.set_tracking_uri(team_server_info["uri"])
    runs = mlflow.search_runs(experiment_names=["team-grid"], output_format="list",
                              filter_string="tags.`tonetune.role` = 'train'")
    assert sorted(r.info.run_name for r in runs) == NAMES and {r.info.status for r in runs} == {"FINISHED"}
    parents = mlflow.search_runs(experiment_names=["team-grid"], output_format="list",
                                 filter_string="tags.`tonetune.role` = 'train-grid'")
    assert len(parents) == 1 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    for r in runs:
        assert "system/cpu_utilization_percentage" in r.data.metrics, sorted(r.data.metrics)
        assert "system/system_memory_usage_megabytes" in r.data.metrics
    first, second = sorted(runs, key=lambda r: r.info.start_time)
    assert second.info.start_time < first.info.end_time  # the two trainings overlapped

    # the adapters are where DVC expects them and dvc.lock records them: nothing left to do
    for name in NAMES:
        assert (project / "models" / "adapters" / name / "adapter_model.safetensors").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(POINTS) <= set(lock["stages"])
    status = run([sys.executable, "-m", "dvc", "status", "--json", *POINTS], project, env)
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    repro = run([sys.executable, "-m", "dvc", "repro", "--single-item", *POINTS], project, env)
    assert repro.returncode == 0, repro.stderr
    assert all(f"Stage '{point}' didn't change, skipping" in repro.stdout for point in POINTS), repro.stdout

    # a second fan-out finds nothing to run (and starts no Ray)
    again = run(command, project, env)
    assert again.returncode == 0 and "grid: nothing to run" in again.stdout, again.stdout + again.stderr
    assert all(f"grid: {point} is up to date, skipped" in again.stdout for point in POINTS)


def test_grid_refuses_an_unknown_point_and_missing_inputs_with_one_line(project, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    env.pop("TONETUNE_PARAMS", None)
    completed = run([sys.executable, "-m", "pipeline.grid", "--only", "train@bf16-1-1-1"], project, env)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: --only: train@bf16-1-1-1 is not a stage")
    bare = tmp_path / "bare"
    shutil.copytree(project, bare, ignore=shutil.ignore_patterns("models", "dvc.lock"))
    completed = run([sys.executable, "-m", "pipeline.grid", "--num-gpus", "0"], bare, {**env, "PYTHONPATH": str(bare)})
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "models/base is missing: run `dvc repro split base_model`" in completed.stderr.strip().splitlines()[-1]
