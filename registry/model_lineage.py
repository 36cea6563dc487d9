"""Model lineage: where a registered model version came from, and whether its inputs still exist.

For `models:/<name>@<alias>` or `models:/<name>/<version>`, `lineage_for_model` follows

    version (aliases, legacy stage, metrics recorded at promotion)
      -> training run (MLflow: status, params, git commit)
      -> base model (id, weights sha256; does models/base on disk still hold those weights?)
      -> datasets the run logged (path + the DVC md5 it trained on: its dataset inputs, else its
         `dataset.*` tags; pipeline.core.tracking.logged_datasets), each audited with
         `registry.lineage.lineage_for_file`: md5 on disk vs
         dvc.lock, the upstream stages and their params, generation run, source corpus, commit
      -> dvc.lock digest at promotion vs now (pipeline.core.dvcmeta.lock_digest: every stage but
         promote, whose own entry DVC writes after promotion)

The verdict is MATCH only when every dataset on disk is the file dvc.lock records AND the file the
version was trained on; otherwise the worst dataset status (MODIFIED, MISSING, NOT TRACKED, or
DIFFERS when dvc.lock now records another file than the one trained on). `render_text` prints it;
`ModelLineageReport.to_dict` is the same as JSON. Reads only: nothing is written to the store,
which is opened by pipeline.core.tracking.open_client (a missing sqlite store is an error, not created).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.contracts import Tags
from pipeline.core.dvcmeta import lock_digest
from pipeline.core.errors import TonetuneError
from pipeline.core.tracking import find_run, logged_datasets, open_client
from registry.lineage import MATCH, MISSING, MODIFIED, NOT_TRACKED, LineageReport, lineage_for_file
from registry.policy import tone_of

DIFFERS = "DIFFERS"  # the file matches dvc.lock, but dvc.lock now records another file than the one trained on
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
SHOWN_PARAMS = ("precision", "lora_r", "lora_alpha", "learning_rate", "n_train", "epochs", "effective_batch_size",
                "target_modules", "seed", "system_prompt", "base_model_id")
SEVERITY = [MATCH, DIFFERS, MODIFIED, NOT_TRACKED, MISSING]


@dataclass(frozen=True)
class DatasetLineage:
    """One dataset the training run logged: what it trained on, and the file's audit today."""

    name: str
    path: str
    trained_md5: str | None
    status: str  # MATCH / DIFFERS / MODIFIED / MISSING / NOT TRACKED
    file: LineageReport


@dataclass(frozen=True)
class BaseModelCheck:
    """The base model the adapter references, and whether the folder still holds its weights."""

    model_id: str | None
    sha256: str | None
    path: str | None
    status: str  # MATCH / MODIFIED / MISSING / unknown


@dataclass
class ModelLineageReport:
    """Everything `registry lineage models:/...` knows about one version."""

    uri: str
    name: str
    version: str
    aliases: list[str]
    stage: str | None
    source: str | None
    created: str | None
    version_tags: dict[str, str]
    run_id: str | None
    run_found: bool
    run_name: str | None
    run_status: str | None
    experiment: str | None
    params: dict[str, str]
    git_commit: str | None
    base_model: BaseModelCheck
    datasets: list[DatasetLineage] = field(default_factory=list)
    dvc_lock_md5_at_promotion: str | None = None
    dvc_lock_md5_now: str | None = None
    status: str = MATCH

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for --json)."""
        return asdict(self)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    match = MODEL_URI.match(uri)
    if not match:
        raise TonetuneError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return match.group("name"), match.group("alias"), match.group("version")


def resolve_version(client, uri: str):
    """The ModelVersion a models:/ URI names (one-line error when there is none)."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise TonetuneError(f"{uri}: no such model version in the registry (see `python -m registry list`)") from None


def dataset_status(file_report: LineageReport, trained_md5: str | None) -> str:
    """The file's audit, plus: is dvc.lock's file still the one this model was trained on?"""
    if file_report.status == MATCH and trained_md5 and file_report.locked_md5 != trained_md5:
        return DIFFERS
    return file_report.status


def check_base_model(params: dict[str, str]) -> BaseModelCheck:
    """Does the referenced base folder still hold the weights the adapter was trained on?"""
    path, sha256 = params.get("base_model_path"), params.get("base_model_sha256")
    if not path or not sha256:
        return BaseModelCheck(params.get("base_model_id"), sha256, path, "unknown")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return BaseModelCheck(params.get("base_model_id"), sha256, path, MISSING)
    from registry.model import weights_sha256

    try:
        status = MATCH if weights_sha256(folder) == sha256 else MODIFIED
    except TonetuneError:
        status = MISSING
    return BaseModelCheck(params.get("base_model_id"), sha256, path, status)


def lineage_for_model(uri: str, client=None, check_run: bool = True) -> ModelLineageReport:
    """Assemble the lineage chain of one registered model version (see the module docstring)."""
    if client is None:
        client = open_client()
    version = resolve_version(client, uri)
    name, number = version.name, str(version.version)
    aliases = sorted(alias for alias, v in client.get_registered_model(name).aliases.items() if str(v) == number)
    run_id = version.run_id or version.tags.get(Tags.TRAINING_RUN_ID)
    run = find_run(client, run_id)
    experiment = client.get_experiment(run.info.experiment_id).name if run else None
    params = dict(run.data.params) if run else {}
    datasets = []
    for dataset in (logged_datasets(run) if run else []):
        file_report = lineage_for_file(dataset.path, check_run=check_run)
        datasets.append(DatasetLineage(dataset.name, dataset.path, dataset.dvc_md5,
                                       dataset_status(file_report, dataset.dvc_md5), file_report))
    test_md5, test_path = version.tags.get(Tags.decision("test_md5")), version.tags.get(Tags.dataset("test", "path"))
    if test_md5 and test_path:  # the held-out test set the promotion decision read
        file_report = lineage_for_file(test_path, check_run=False)
        datasets.append(DatasetLineage("test", test_path, test_md5, dataset_status(file_report, test_md5), file_report))
    statuses = [d.status for d in datasets] or [NOT_TRACKED]
    created = getattr(version, "creation_timestamp", None)
    return ModelLineageReport(
        uri=uri,
        name=name,
        version=number,
        aliases=aliases,
        stage=getattr(version, "current_stage", None),
        source=version.source,
        created=_iso(created) if created else None,
        version_tags=dict(version.tags),
        run_id=run_id,
        run_found=run is not None,
        run_name=run.info.run_name if run else version.tags.get(Tags.TRAINING_RUN_NAME),
        run_status=run.info.status if run else None,
        experiment=experiment,
        params=params,
        git_commit=(run.data.tags.get(Tags.GIT_COMMIT) if run else None) or version.tags.get(Tags.GIT_COMMIT),
        base_model=check_base_model(params),
        datasets=datasets,
        dvc_lock_md5_at_promotion=version.tags.get(Tags.DVC_LOCK_MD5),
        dvc_lock_md5_now=lock_digest(),
        status=max(statuses, key=lambda s: SEVERITY.index(s) if s in SEVERITY else len(SEVERITY)),
    )


def _iso(milliseconds: int) -> str:
    """MLflow's epoch milliseconds as UTC ISO 8601."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(milliseconds / 1000))


VERDICTS = {
    MATCH: "every dataset on disk is the file dvc.lock records and the file this version was trained on",
    DIFFERS: "dvc.lock now records other data than this version was trained on (the pipeline ran again since)",
    MODIFIED: "a dataset on disk differs from dvc.lock (edited, or made by a run dvc.lock does not record)",
    MISSING: "a dataset is not on disk (dvc pull / dvc checkout)",
    NOT_TRACKED: "a dataset is not produced by any stage in dvc.lock",
}


def _metric(tags: dict[str, str], key: str, digits: int) -> str:
    """A metric tag rounded for display ('-' when absent)."""
    try:
        return f"{float(tags[key]):.{digits}f}"
    except (KeyError, ValueError):
        return "-"


def render_text(report: ModelLineageReport) -> str:
    """The chain as indented lines for a terminal (dataset chains via registry.lineage)."""
    from registry.lineage import format_value
    from registry.lineage import render_text as render_file

    tags = report.version_tags
    lines = [f"lineage of {report.uri}"]
    lines.append(f"  version     {report.name} v{report.version} (aliases: {', '.join(report.aliases) or '-'}; "
                 f"stage {report.stage or '-'}; registered {report.created or '-'})")
    lines.append(f"              source {report.source or '-'}")
    tone = tone_of(tags)
    key = f"pct_{tone}"
    lines.append(f"  metrics     {_metric(tags, Tags.metric(key), 1)}% {tone.replace('_', ' ')} "
                 f"[{_metric(tags, Tags.metric(key + '_ci_low'), 1)}, {_metric(tags, Tags.metric(key + '_ci_high'), 1)}], "
                 f"similarity {_metric(tags, Tags.metric('similarity_mean'), 3)} (base: "
                 f"{_metric(tags, Tags.base(key), 1)}%, {_metric(tags, Tags.base('similarity_mean'), 3)})")
    if tags.get(Tags.PROMOTE_FORCED) == "true":
        lines.append(f"              FORCED promotion: {tags.get(Tags.PROMOTE_FORCE_REASON)} (overrode {tags.get(Tags.PROMOTE_OVERRIDDEN)})")
    found = "found" if report.run_found else "NOT FOUND in the tracking store"
    lines.append(f"  -> training run {report.run_id or '-'} {report.run_name or ''!s}: {found}"
                 + (f" ({report.run_status}, experiment {report.experiment!r})" if report.run_found else ""))
    shown = " ".join(f"{key}={format_value(report.params[key])}" for key in SHOWN_PARAMS if key in report.params)
    lines.append(f"  -> params    {shown or '(none recorded)'}")
    base = report.base_model
    lines.append(f"  -> base model {base.model_id or '-'} sha256 {str(base.sha256 or '-')[:16]}... at {base.path or '-'}: {base.status}")
    for dataset in report.datasets:
        file = dataset.file
        lines.append(f"  -> dataset   {dataset.name}: {dataset.path}")
        used = "decided on" if dataset.name == "test" else "trained on"
        lines.append(f"                {used} md5 {dataset.trained_md5 or '-'}; dvc.lock {file.locked_md5 or '-'} "
                     f"({file.stage or '-'}); on disk {file.md5_on_disk or '-'}: {dataset.status}")
    if report.datasets:
        first = report.datasets[0].file
        lines.append(f"  -> chain of {first.path} (registry lineage {first.path}):")
        lines.extend("     " + line for line in render_file(first).splitlines()[1:])
    else:
        lines.append("  -> dataset   (the training run logged no datasets)")
    lines.append(f"  -> commit    trained at {report.git_commit or '-'}; promoted at {tags.get(Tags.PROMOTE_GIT_COMMIT, '-')}")
    lock_then, lock_now = report.dvc_lock_md5_at_promotion, report.dvc_lock_md5_now
    same = "unchanged since" if lock_then and lock_then == lock_now else "CHANGED since" if lock_then else "not recorded at"
    lines.append(f"              dvc.lock digest {lock_now or '-'} ({same} promotion{'' if same != 'CHANGED since' else f': was {lock_then}'})")
    lines.append(f"  {report.status}: {VERDICTS.get(report.status, report.status)}")
    return "\n".join(lines)
