"""The `train` grid fanned out over many GPUs or machines with Ray, then committed to DVC.

    python -m pipeline.grid [--executor ray|local] [--address ray://HEAD:10001]
                            [--num-gpus 1] [--num-cpus-per-task 1] [--only train@...]

1. DVC says which `train@...` points of dvc.yaml's matrix are not built (`dvc status`), and
   gives each point's exact command (`python -m pipeline.train --precision ... --n-train ...`);
2. each of them runs as one Ray task (`num_gpus` per task, 1 by default, 0 on CPU) in the
   project folder, so the train stage's own code runs unchanged and logs to the tracking
   server of `MLFLOW_TRACKING_URI`, writing its adapter where DVC expects it
   (models/adapters/<run-name>/);
3. the driver records the finished points with `dvc commit train@...`, so `dvc status` is clean
   for them and `dvc repro` skips them and goes on with predict/score/report/promote.

Why Ray tasks + `dvc commit` rather than Ray running `dvc repro` or `dvc exp run` workers: DVC
holds a repository lock during repro, so parallel `dvc repro` calls in one workspace block
each other, and `dvc exp` workers each need a full temp copy of the workspace (`models/base`
included) on the machine that runs them. A Ray task needs only the stage's inputs and runs on
whichever node has a free GPU; DVC keeps its role of deciding what is stale and recording
what was built. Across machines the project folder must be at the same path on every node (a
shared filesystem), with the same venv; `--executor local` runs the points one after another
in this process's machine (no Ray), which is the same as `dvc repro train`.

Concurrent points each create their MLflow runs; the first run of a new grid also creates the
grid's parent run `train-grid-<id>`, and two points starting at the same instant can both
create one: after the fan-out the duplicates are merged (children moved to the oldest parent,
the others deleted).

Stage-level leaf: imports pipeline.core only; the train stage runs as a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import load_config
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.tracking import configure_mlflow, disable_telemetry

TRAIN_STAGE = "train"
GRID_ROLE_TAG = Tags.ROLE  # the tag pipeline.train puts on its runs (train / train-grid)
# What a task passes on to the stage process when set here (the shared server, the params file, ...)
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "TONETUNE_PARAMS", "TONETUNE_BASE_MODEL_DIR", "PYTHONPATH",
                 "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MLFLOW_S3_ENDPOINT_URL")


@dataclass(frozen=True)
class GridPoint:
    stage: str  # train@bf16-32-0.001-150
    cmd: str  # as dvc.yaml renders it
    outs: tuple[str, ...]  # models/adapters/lora-...


@dataclass(frozen=True)
class PointResult:
    stage: str
    returncode: int
    wall_s: float
    node: str
    tail: str


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)


def grid_points(project: Path) -> list[GridPoint]:
    """Every `train@...` stage of dvc.yaml's matrix, with the command and outs DVC renders."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stages = [stage for stage in repo.index.stages if stage.name.startswith(f"{TRAIN_STAGE}@")]
        points = [GridPoint(stage.addressing, stage.cmd, tuple(out.def_path for out in stage.outs))
                  for stage in stages]
    if not points:
        raise TonetuneError(f"{project / 'dvc.yaml'}: no `{TRAIN_STAGE}@...` stages (is train.grid empty?)")
    return sorted(points, key=lambda point: point.stage)


def stale_points(points: list[GridPoint], project: Path) -> list[GridPoint]:
    """The points `dvc status` reports as changed (not built, or built from other inputs)."""
    completed = dvc("status", "--json", *[point.stage for point in points], cwd=project)
    if completed.returncode != 0:
        raise TonetuneError(f"dvc status failed: {completed.stderr.strip().splitlines()[-1:]}")
    changed = json.loads(completed.stdout or "{}")
    for stage, problems in changed.items():
        for problem in problems:
            if not isinstance(problem, dict):  # "always changed"
                continue
            deleted = [path for path, state in problem.get("changed deps", {}).items() if state == "deleted"]
            if deleted:
                raise TonetuneError(f"{stage}: input {deleted[0]} is missing: run `dvc repro split base_model` "
                                    f"(or `dvc pull`) before the grid")
    return [point for point in points if point.stage in changed]


def run_point(point: GridPoint, project: str, env: dict[str, str]) -> PointResult:
    """Run one grid point's stage command in the project folder (the body of a Ray task)."""
    import socket

    started = time.perf_counter()
    python_dir = str(Path(sys.executable).parent)  # the stage's `python` is this venv's
    process_env = {**os.environ, **env, "PATH": python_dir + os.pathsep + os.environ.get("PATH", "")}
    completed = subprocess.run(point.cmd, shell=True, cwd=project, env=process_env, capture_output=True, text=True)
    output = (completed.stdout + completed.stderr).strip().splitlines()
    return PointResult(point.stage, completed.returncode, time.perf_counter() - started, socket.gethostname(),
                       "\n".join(output[-15:]))


def run_with_ray(points: list[GridPoint], project: Path, env: dict[str, str], address: str | None,
                 num_gpus: float, num_cpus_per_task: float, num_cpus: int | None) -> list[PointResult]:
    """One Ray task per point (num_gpus / num_cpus each); results in completion order."""
    import ray

    # workers import this module (the task body) from the project folder, as the stage will
    pythonpath = os.pathsep.join(filter(None, [str(project), env.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=None if num_gpus else 0, include_dashboard=False,
                 log_to_driver=False, object_store_memory=200 * 1024 * 1024, runtime_env=runtime_env)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < num_gpus:  # the tasks would wait forever
            raise TonetuneError(f"the Ray cluster has {gpus:g} GPU(s), a task asks for {num_gpus:g}: "
                                f"pass --num-gpus 0 to train on CPU")
        task = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus_per_task, max_retries=0)(run_point)
        pending = {task.remote(point, str(project), env): point for point in points}
        print(f"grid: {len(points)} point(s) submitted to Ray ({ray.cluster_resources().get('GPU', 0):g} GPU, "
              f"{ray.cluster_resources().get('CPU', 0):g} CPU; {num_gpus:g} GPU per task)", flush=True)
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            result = ray.get(done[0])
            pending.pop(done[0])
            report(result)
            results.append(result)
        return results
    finally:
        ray.shutdown()


def run_locally(points: list[GridPoint], project: Path, env: dict[str, str]) -> list[PointResult]:
    results = []
    for point in points:
        results.append(run_point(point, str(project), env))
        report(results[-1])
    return results


def report(result: PointResult) -> None:
    status = "done" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"grid: {result.stage} {status} in {result.wall_s:.0f} s on {result.node}", flush=True)
    if result.returncode != 0:
        print(result.tail, file=sys.stderr)


def merge_duplicate_parents(experiment_id: str) -> int:
    """Points that started at the same instant may each have created the grid's parent run:
    keep the oldest `train-grid` run per grid id, move the children, delete the others."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    parents = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                                 filter_string=f"tags.`{GRID_ROLE_TAG}` = 'train-grid'")
    by_grid: dict[str, list] = {}
    for run in parents:
        by_grid.setdefault(run.data.tags.get("grid", ""), []).append(run)
    merged = 0
    for runs in by_grid.values():
        keep, *extra = sorted(runs, key=lambda run: (run.info.start_time, run.info.run_id))
        for duplicate in extra:
            children = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                                          filter_string=f"tags.`{Tags.MLFLOW_PARENT_RUN_ID}` = '{duplicate.info.run_id}'")
            for child in children:
                client.set_tag(child.info.run_id, Tags.MLFLOW_PARENT_RUN_ID, keep.info.run_id)
            client.delete_run(duplicate.info.run_id)
            merged += 1
    return merged


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.grid",
        description="Run the train grid points that DVC reports as not built as parallel Ray tasks "
        "(one GPU each), then `dvc commit` them. Tracking: $MLFLOW_TRACKING_URI (a shared server).",
    )
    parser.add_argument("--executor", choices=("ray", "local"), default="ray")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="an existing Ray cluster (ray://HEAD:10001 or auto); default: start a local one")
    parser.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per task (0 on CPU)")
    parser.add_argument("--num-cpus-per-task", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    parser.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="only these train@... points")
    parser.add_argument("--no-commit", action="store_true", help="leave `dvc commit` to you")
    parser.add_argument("--project", type=Path, default=Path("."), help="the project folder (shared across nodes)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    disable_telemetry()
    if args.num_gpus < 0 or args.num_cpus_per_task <= 0:
        raise TonetuneError("--num-gpus must be >= 0 and --num-cpus-per-task > 0")
    project = args.project.resolve()
    if not (project / "dvc.yaml").is_file():
        raise TonetuneError(f"{project}: no dvc.yaml (run from the project folder or pass --project)")
    config = load_config()
    points = grid_points(project)
    if args.only:
        unknown = sorted(set(args.only) - {point.stage for point in points})
        if unknown:
            raise TonetuneError(f"--only: {unknown[0]} is not a stage of the current train.grid "
                                f"(have: {', '.join(point.stage for point in points)})")
        points = [point for point in points if point.stage in args.only]
    todo = stale_points(points, project)
    for point in points:
        if point not in todo:
            print(f"grid: {point.stage} is up to date, skipped", flush=True)
    if not todo:
        print("grid: nothing to run")
        return
    experiment_id = configure_mlflow(config.tracking)  # creates the experiment once, before the fan-out
    env = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
    import mlflow

    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    if args.executor == "ray":
        results = run_with_ray(todo, project, env, args.address, args.num_gpus, args.num_cpus_per_task, args.num_cpus)
    else:
        results = run_locally(todo, project, env)
    merged = merge_duplicate_parents(experiment_id)
    if merged:
        print(f"grid: merged {merged} duplicate grid parent run(s)")
    built = sorted(result.stage for result in results if result.returncode == 0)
    failed = sorted(result.stage for result in results if result.returncode != 0)
    if built and not args.no_commit:
        completed = dvc("commit", "--force", *built, cwd=project)
        if completed.returncode != 0:
            raise TonetuneError(f"dvc commit {' '.join(built)} failed: {completed.stderr.strip()[-500:]}")
        print(f"grid: dvc commit {shlex.join(built)}: recorded in dvc.lock")
    print(f"grid: {len(built)} built, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
