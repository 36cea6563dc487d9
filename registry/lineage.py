"""Dataset lineage: where a DVC-tracked file came from, read back from the evidence on disk.

For a file such as data/splits/train_100.parquet, `lineage_for_file` follows the chain

    file -> its md5 and the stage that made it (dvc.lock, also inside a directory out)
         -> the params of that stage and of every stage upstream of it (dvc.lock per stage)
         -> the generation MLflow run (data/generated/manifest.json), and whether the store has it
         -> the source corpus and its version (same manifest)
         -> the git commit that last recorded dvc.lock

and says whether the file on disk still matches dvc.lock: MATCH, MODIFIED, MISSING (tracked, not
on disk: `dvc pull`/`dvc checkout`) or NOT TRACKED. `render_text` prints it for people;
`LineageReport.to_dict` is the same content as JSON. Model lineage (registry issue 7) starts from
a model version's dataset tags and reuses `lineage_for_file` for each dataset.

Runs from the repository root (paths as in dvc.yaml). Reads files only: no DVC import, and the
MLflow store is opened (pipeline.core.tracking.open_client) only if it exists: a lookup never
creates an empty mlflow.db.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import GENERATION_MANIFEST_PATH
from pipeline.core.dvcmeta import DVC_LOCK, file_md5, locked_md5, locked_outputs, read_lock
from pipeline.core.errors import TonetuneError
from pipeline.core.tracking import find_run, open_client, project_tracking, tracking_uri

MATCH, MODIFIED, MISSING, NOT_TRACKED = "MATCH", "MODIFIED", "MISSING", "NOT TRACKED"
GENERATE_STAGE = "generate"


@dataclass(frozen=True)
class StageParams:
    """One stage of the chain with the params dvc.lock recorded when it last ran.

    `changed` lists params whose value in params.yaml now differs from the locked one
    (key -> [locked, current]): the stage would re-run on the next `dvc repro`."""

    stage: str
    params: dict[str, Any]
    changed: dict[str, list[Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunLink:
    """An MLflow run named by the evidence, and whether the tracking store still has it."""

    run_id: str | None
    tracking_uri: str | None
    exists: bool | None  # None: could not check (no store, store unreachable)
    detail: str


@dataclass(frozen=True)
class CommitInfo:
    """The last git commit that recorded dvc.lock, and whether dvc.lock changed since."""

    commit: str | None
    date: str | None
    subject: str | None
    lock_uncommitted: bool | None


@dataclass(frozen=True)
class LineageReport:
    """Everything `registry lineage` knows about one file (see the module docstring)."""

    path: str
    status: str
    md5_on_disk: str | None
    locked_md5: str | None
    stage: str | None
    stages: list[StageParams]
    generation_manifest: dict[str, Any]
    generation_manifest_status: str | None
    generation_run: RunLink | None
    commit: CommitInfo

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for --json and for model lineage to embed)."""
        return asdict(self)


# --------------------------------------------------------------------------- dvc.lock


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"split": {"seed": 0}} -> {"split.seed": 0}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def locked_params(stage_entry: dict[str, Any]) -> dict[str, Any]:
    """A stage's params from dvc.lock, flattened, over all params files it reads."""
    params: dict[str, Any] = {}
    for values in (stage_entry.get("params") or {}).values():
        params.update(flatten(values or {}))
    return params


def current_params(stage_entry: dict[str, Any]) -> dict[str, Any]:
    """The same params files as they are now (flattened), to spot edits since the lock."""
    import yaml

    current: dict[str, Any] = {}
    for params_file in stage_entry.get("params") or {}:
        path = Path(params_file)
        if path.exists():
            current.update(flatten(yaml.safe_load(path.read_text()) or {}))
    return current


def producer_of(path: str, lock_path: Path) -> str | None:
    """The stage whose outs contain `path` (a file out, or a file inside a directory out)."""
    for output in locked_outputs(lock_path):
        out = output.path.rstrip("/")
        if path == out or path.startswith(out + "/"):
            return output.stage
    return None


def upstream_stages(stage: str, lock_path: Path) -> list[str]:
    """`stage` and every stage it depends on through dvc.lock deps, nearest first.

    Ordered by the longest path from `stage` (split -> validate -> generate -> source: generate
    comes after validate because validate also reads its output)."""
    stages = read_lock(lock_path).get("stages") or {}
    depth = {stage: 0}
    frontier = [stage]
    while frontier:
        current = frontier.pop()
        for dep in (stages.get(current) or {}).get("deps") or []:
            parent = producer_of(str(dep.get("path", "")), lock_path)
            if parent and parent != current and depth.get(parent, -1) < depth[current] + 1 and depth[current] < len(stages):
                depth[parent] = depth[current] + 1
                frontier.append(parent)
    return sorted(depth, key=lambda name: (depth[name], name))


def stage_params(stages: list[str], lock_path: Path) -> list[StageParams]:
    """Locked params of each stage, with the ones edited in params.yaml since."""
    entries = read_lock(lock_path).get("stages") or {}
    result = []
    for name in stages:
        entry = entries.get(name) or {}
        locked = locked_params(entry)
        now = current_params(entry)
        changed = {key: [value, now.get(key)] for key, value in locked.items() if key in now and now[key] != value}
        result.append(StageParams(name, locked, changed))
    return result


def file_status(path: Path, lock_path: Path) -> tuple[str, str | None, str | None, str | None]:
    """(status, md5 on disk, md5 in dvc.lock, stage) of one file."""
    on_disk = file_md5(path) if path.is_file() else None
    locked = locked_md5(path.as_posix(), lock_path)
    if locked is None:
        return NOT_TRACKED, on_disk, None, None
    if on_disk is None:
        return MISSING, None, locked[0], locked[1]
    return (MATCH if on_disk == locked[0] else MODIFIED), on_disk, locked[0], locked[1]


# --------------------------------------------------------------------------- MLflow and git


def read_manifest(path: Path = GENERATION_MANIFEST_PATH) -> dict[str, Any]:
    """The generation manifest ({} when absent or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_link(run_id: str | None) -> RunLink:
    """Whether the project's store has the run (a sqlite store that does not exist is not
    created: pipeline.core.tracking.open_client refuses it)."""
    uri = tracking_uri(project_tracking())
    if not run_id:
        return RunLink(None, uri, None, "no run id recorded")
    try:
        client = open_client()
    except TonetuneError:
        return RunLink(run_id, uri, None, f"tracking store {uri} not found here")
    from mlflow.exceptions import MlflowException

    try:
        run = find_run(client, run_id)
        if run is None:
            return RunLink(run_id, uri, False, "run not in the tracking store")
        experiment = client.get_experiment(run.info.experiment_id)
    except MlflowException as error:
        return RunLink(run_id, uri, None, f"could not query the store: {' '.join(str(error).split())[:200]}")
    return RunLink(run_id, uri, True, f"{run.info.status}, experiment {experiment.name!r}, run name {run.info.run_name!r}")


def git(*args: str) -> str | None:
    """Output of a git command, None when git fails (no repo, no commits)."""
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


def lock_commit(lock_path: Path) -> CommitInfo:
    """The last commit that touched dvc.lock (`git log -1 -- dvc.lock`), and whether it is dirty."""
    line = git("log", "-1", "--format=%H%x09%cs%x09%s", "--", lock_path.as_posix())
    commit = date = subject = None
    if line:
        commit, date, subject = (line.split("\t", 2) + [None, None])[:3]
    status = git("status", "--porcelain", "--", lock_path.as_posix())
    inside = git("rev-parse", "--is-inside-work-tree")
    return CommitInfo(commit, date, subject, bool(status) if inside else None)


# --------------------------------------------------------------------------- the report


def lineage_for_file(path: str | Path, lock_path: Path = DVC_LOCK, check_run: bool = True) -> LineageReport:
    """Assemble the lineage chain of one file (relative to the repository root)."""
    path = Path(path)
    if path.is_absolute():
        path = path.resolve().relative_to(Path.cwd().resolve())
    status, on_disk, locked, stage = file_status(path, lock_path)
    stages = upstream_stages(stage, lock_path) if stage else []
    manifest, manifest_status, run = {}, None, None
    if GENERATE_STAGE in stages:
        manifest = read_manifest(GENERATION_MANIFEST_PATH)
        manifest_status = file_status(GENERATION_MANIFEST_PATH, lock_path)[0]
        run_id = manifest.get("mlflow_run_id")
        run = run_link(run_id) if check_run else RunLink(run_id, None, None, "not checked")
    return LineageReport(
        path=path.as_posix(),
        status=status,
        md5_on_disk=on_disk,
        locked_md5=locked,
        stage=stage,
        stages=stage_params(stages, lock_path),
        generation_manifest=manifest,
        generation_manifest_status=manifest_status,
        generation_run=run,
        commit=lock_commit(lock_path),
    )


def format_value(value: Any) -> str:
    """Compact, stable rendering of a param value."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, bool)) or value is None else str(value)


VERDICTS = {
    MATCH: "the file on disk is the one dvc.lock records",
    MODIFIED: "the file on disk differs from dvc.lock (edited by hand or by a run not recorded in dvc.lock)",
    MISSING: "dvc.lock records this file but it is not on disk (dvc pull / dvc checkout)",
    NOT_TRACKED: "no stage in dvc.lock produces this file (run dvc repro, or dvc add it)",
}
MANIFEST_KEYS = ("experiment", "prompt_version", "model", "backend", "seed")


def render_text(report: LineageReport) -> str:
    """The chain as indented lines for a terminal."""
    lines = [f"lineage of {report.path}"]
    lines.append(f"  file        md5 on disk {report.md5_on_disk or '-'}; dvc.lock {report.locked_md5 or '-'}")
    lines.append(f"  -> stage    {report.stage or '- (not produced by any stage in dvc.lock)'}")
    for entry in report.stages:
        shown = " ".join(f"{key}={format_value(value)}" for key, value in sorted(entry.params.items()))
        lines.append(textwrap.fill(f"{entry.stage}: {shown or '(none)'}", width=110, initial_indent="  -> params   ",
                                   subsequent_indent=" " * 15, break_long_words=False, break_on_hyphens=False))
        for key, (locked, current) in sorted(entry.changed.items()):
            lines.append(f"               ! {key} is {format_value(current)} in params.yaml now (locked {format_value(locked)})")
    if report.generation_run is not None:
        run = report.generation_run
        found = {True: "found", False: "NOT FOUND", None: "not checked"}[run.exists]
        lines.append(f"  -> MLflow   generation run {run.run_id or '-'}: {found} ({run.detail}) in {run.tracking_uri or '-'}")
        manifest = report.generation_manifest
        details = " ".join(f"{key}={format_value(manifest[key])}" for key in MANIFEST_KEYS if key in manifest)
        lines.append(f"              manifest {GENERATION_MANIFEST_PATH.as_posix()} ({report.generation_manifest_status}) {details}")
        corpus = manifest.get("source_corpus", "-")
        sections = {k: v for k, v in manifest.items() if k.startswith("sections") or (k.startswith("source") and k != "source_corpus")}
        extra = " ".join(f"{key}={format_value(value)}" for key, value in sorted(sections.items()))
        lines.append(f"  -> source   {corpus} {extra}".rstrip())
    commit = report.commit
    if commit.commit:
        dirty = "; dvc.lock has UNCOMMITTED changes" if commit.lock_uncommitted else ""
        lines.append(f"  -> commit   {commit.commit} {commit.date} {commit.subject!r} (last commit of dvc.lock){dirty}")
    else:
        lines.append("  -> commit   - (dvc.lock is not in any git commit yet)")
    lines.append(f"  {report.status}: {VERDICTS[report.status]}")
    return "\n".join(lines)
