"""MLflow plumbing shared by every stage: where the store is, the one way to open it and find a
run in it (`open_client`, `find_run`), and what a run records about the code.

The default store is `sqlite:///mlflow.db` at the repo root with artifacts under
`mlartifacts/`; `MLFLOW_TRACKING_URI` in the environment overrides it (tests point it at a
temporary store or a real `mlflow server`). Telemetry is switched off before MLflow is imported.
Secrets never pass through here: callers log params they chose, never the environment.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import TrackingConfig, load_config
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError

MLFLOW_CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input tag: the `context` of log_input
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}


def disable_telemetry() -> None:
    """Stop MLflow/DVC from phoning home (it would only time out offline)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def tracking_uri(tracking: TrackingConfig) -> str:
    """The store in use: $MLFLOW_TRACKING_URI, else params' tracking_uri."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking.tracking_uri


def project_tracking() -> TrackingConfig:
    """params.yaml's tracking section; the defaults when params.yaml is absent or invalid (a
    read-only audit, e.g. `registry lineage`, must still find the store)."""
    try:
        return load_config().tracking
    except TonetuneError:
        return TrackingConfig()


def store_missing(uri: str) -> bool:
    """A sqlite store whose file does not exist (opening it would create an empty one)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


def open_client(tracking: TrackingConfig | None = None):
    """The one way to open the project's store for reading or registry work: an MlflowClient on
    $MLFLOW_TRACKING_URI / params' tracking_uri (tracking and registry), also set as MLflow's
    default so `mlflow.register_model` and `models:/` URIs use the same store.

    A sqlite store that does not exist is a one-line error, not created: a lookup must not leave
    an empty mlflow.db behind. Stages that log runs use `configure_mlflow` instead (it creates
    the store and the experiment)."""
    uri = tracking_uri(tracking or project_tracking())
    if store_missing(uri):
        raise TonetuneError(f"no MLflow store at {uri}: run the pipeline first (dvc repro)")
    disable_telemetry()
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def not_found(error) -> bool:
    """An MlflowException that means 'no such run / model / version / alias'."""
    code = str(getattr(error, "error_code", ""))
    return "RESOURCE_DOES_NOT_EXIST" in code or "INVALID_PARAMETER_VALUE" in code or "not found" in str(error).lower()


INSERT_RACE_ATTEMPTS = 3  # one lost race is the common case; three covers a burst of parallel writers


def lost_insert_race(error: BaseException) -> bool:
    """The store's check-then-insert lost to a concurrent writer (a UNIQUE violation): the row
    exists now, so the same write retried finds it (an upsert becomes an update, a dataset input
    links the dataset that the other writer inserted)."""
    from mlflow.exceptions import MlflowException

    text = str(error)
    return isinstance(error, MlflowException) and (
        "UNIQUE constraint failed" in text or "IntegrityError" in text or "duplicate key value" in text
    )


def retry_lost_insert_race(write, *args, attempts: int = INSERT_RACE_ATTEMPTS, **kwargs):
    """Call an MLflow write that the SQL store does as check-then-insert (a tag, an alias, a
    dataset input), retrying (with tenacity) only when it lost that race to a writer elsewhere:
    seen in CI against `mlflow server` on PostgreSQL, for registry tags and for two grid points
    logging the same split at once. Any other error is raised at once."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_incrementing

    retrying = Retrying(stop=stop_after_attempt(attempts), wait=wait_incrementing(start=0.05, increment=0.05),
                        retry=retry_if_exception(lost_insert_race), reraise=True)
    return retrying(write, *args, **kwargs)


def find_run(client, run_id: str | None):
    """The run with this id, or None when the store does not have it (deleted, another store).
    Other store errors (unreachable server) propagate."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if not_found(error):
            return None
        raise


@dataclass(frozen=True)
class LoggedDataset:
    """A dataset a run logged with `log_dataset_input`: name, path, DVC md5, and whether it was
    logged with context `training` (the data the model learned from)."""

    name: str
    path: str
    dvc_md5: str | None
    training: bool


def logged_datasets(run) -> list[LoggedDataset]:
    """The datasets a run logged, training ones first, then by name: MLflow's dataset inputs
    (context and the path/dvc_md5 input tags), then `dataset.<name>.*` tags for any input the
    store did not return (a dataset tag without an input counts as training when its name
    starts with `train`, as the split files are named)."""
    found: dict[str, LoggedDataset] = {}
    for dataset_input in getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []:
        input_tags = {tag.key: tag.value for tag in dataset_input.tags}
        path = input_tags.get(Tags.DATASET_INPUT_PATH)
        if path:
            name = dataset_input.dataset.name
            md5 = input_tags.get(Tags.DATASET_INPUT_MD5) or dataset_input.dataset.digest
            found[name] = LoggedDataset(name, path, md5, input_tags.get(MLFLOW_CONTEXT_TAG) == Tags.TRAINING_CONTEXT)
    tags = run.data.tags
    for key in sorted(tags):
        parsed = Tags.parse_dataset(key)
        if parsed and parsed[1] == "path" and parsed[0] not in found:
            name = parsed[0]
            found[name] = LoggedDataset(name, tags[key], tags.get(Tags.dataset(name, "dvc_md5")), name.startswith("train"))
    return sorted(found.values(), key=lambda item: (not item.training, item.name))


# The MLflow UI (3.x) opens an experiment tagged genai_development, or one holding traces (the
# judge's evaluations make them), in its GenAI view, whose "Evaluation runs" page lists every
# run that logged no model: generate, split, the grid parent, score, report... The pipeline's
# experiment is a model-development one: tagged so, the UI opens the classic view (Runs: every
# stage's run, `tags.stage` tells which; Models: the adapters; Traces: the judge's assessments).
EXPERIMENT_KIND = "custom_model_development"


def configure_mlflow(tracking: TrackingConfig) -> str:
    """Point MLflow at the project's store and return the experiment id (created if missing,
    tagged as a model-development experiment for the UI; see EXPERIMENT_KIND).

    A new experiment stores artifacts under `tracking.artifact_root` (absolute file URI) so
    runs made by `dvc repro`, `mlflow run` and tests all land in one predictable place.
    """
    disable_telemetry()
    import mlflow

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    system_metrics(tracking)
    parent_run_id = os.environ.get("MLFLOW_RUN_ID")
    if parent_run_id:  # under `mlflow run`: stay in the experiment of the project's run
        experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        if Tags.EXPERIMENT_KIND not in experiment.tags:  # a kind chosen in the UI is kept
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, Tags.EXPERIMENT_KIND, EXPERIMENT_KIND)
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///") and os.environ.get("MLFLOW_TRACKING_URI"):
        # a store chosen by the environment keeps its artifacts beside its database
        database = Path(uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / Path(tracking.artifact_root).name).resolve().as_uri()
    elif not uri.startswith(("http://", "https://", "databricks")):
        artifact_location = Path(tracking.artifact_root).resolve().as_uri()
    try:
        experiment_id = mlflow.create_experiment(tracking.experiment, artifact_location=artifact_location,
                                                 tags={Tags.EXPERIMENT_KIND: EXPERIMENT_KIND})
    except Exception:  # another process created it between our lookup and create
        experiment_id = mlflow.get_experiment_by_name(tracking.experiment).experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def system_metrics(tracking: TrackingConfig) -> bool:
    """Switch MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory
    where pynvml finds a GPU) on or off for the runs this process starts, per
    `tracking.system_metrics`, sampled every `tracking.system_metrics_interval_s` seconds.

    `configure_mlflow` calls it, so every stage's run fills the UI's "System metrics" panel
    (`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`, ...). MLflow
    keeps the switch in environment variables, so stage subprocesses inherit it.
    """
    import logging

    import mlflow

    # its start/stop notes (4 INFO lines per run, "Skip logging GPU metrics" on CPU) are noise
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)
    if not tracking.system_metrics:
        mlflow.disable_system_metrics_logging()
        return False
    mlflow.set_system_metrics_sampling_interval(tracking.system_metrics_interval_s)
    mlflow.enable_system_metrics_logging()
    return True


def git_commit(repo: str | Path = ".") -> str | None:
    """HEAD's commit hash, or None outside a git repo / before the first commit."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


def git_is_dirty(repo: str | Path = ".") -> bool | None:
    """Whether tracked files differ from HEAD (None outside a git repo)."""
    try:
        result = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(result.stdout.strip())


def code_version_tags(repo: str | Path = ".") -> dict[str, str]:
    """Tags that tie a run to the code that made it (MLflow's own keys, so the UI shows them)."""
    tags = {}
    commit = git_commit(repo)
    if commit:
        tags[Tags.MLFLOW_GIT_COMMIT] = commit
        tags[Tags.GIT_COMMIT] = commit
    dirty = git_is_dirty(repo)
    if dirty is not None:
        tags["git_dirty"] = str(dirty).lower()
    return tags


def log_dataset_input_to(client, run_id: str, frame, path: str | Path, context: str, name: str | None = None) -> str:
    """Log a parquet split as an MLflow dataset input of `run_id`, with DVC's md5; returns the md5.

    MLflow's own digest is not DVC's, so the DVC md5 (the plain md5 of the file, equal to what
    dvc.lock records) is used as the dataset digest and as an input tag, which is what ties a run
    to the exact file a lineage audit checks later. The write is retried when it loses the
    store's insert race to another run logging the same split.
    """
    import mlflow
    from mlflow.entities import DatasetInput, InputTag

    from pipeline.core.dvcmeta import file_md5

    path = Path(path)
    md5 = file_md5(path)
    with warnings.catch_warnings():  # two notes per split that no user can act on:
        # MLflow registers its local-file source class twice and says the path is ambiguous, and
        # its schema inference (lazy, in _to_mlflow_entity) explains that integer columns cannot
        # hold missing values.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted", category=UserWarning)
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=path.as_posix(), name=name or path.stem, digest=md5)
        entity = dataset._to_mlflow_entity()
    tags = [InputTag(Tags.DATASET_INPUT_MD5, md5), InputTag(Tags.DATASET_INPUT_PATH, path.as_posix()),
            InputTag(MLFLOW_CONTEXT_TAG, context)]
    retry_lost_insert_race(client.log_inputs, run_id, datasets=[DatasetInput(entity, tags)])
    return md5


def log_dataset_input(frame, path: str | Path, context: str, name: str | None = None) -> str:
    """`log_dataset_input_to` the active run (started if none, as `mlflow.log_input` does), plus
    run tags `dataset.<name>.*` (path, DVC md5, the DVC stage that wrote it and whether the file
    still matches dvc.lock) that the lineage audit reads."""
    import mlflow

    from pipeline.core.dvcmeta import locked_md5

    run = mlflow.active_run() or mlflow.start_run()
    md5 = log_dataset_input_to(mlflow.MlflowClient(), run.info.run_id, frame, path, context, name)
    path = Path(path)
    dataset_name = name or path.stem
    tags = {Tags.dataset(dataset_name, "path"): path.as_posix(), Tags.dataset(dataset_name, "dvc_md5"): md5}
    locked = locked_md5(path)
    if locked:
        tags[Tags.dataset(dataset_name, "dvc_stage")] = locked[1]
        tags[Tags.dataset(dataset_name, "matches_dvc_lock")] = str(locked[0] == md5).lower()
    mlflow.set_tags(tags)
    return md5


PROMPT_REGISTRY_PREFIX = "tonetune"  # registered prompt names: tonetune-<tone>-<prompt name>


def prompt_tags(prompts, tone_name: str) -> dict[str, str]:
    """What a run sent, as tags: the tone's prompts folder and set version, and per prompt file
    its version (content hash) and path (pipeline.core.prompts.TonePrompts)."""
    tags = {"tone.prompts": Path(prompts.folder).as_posix(), f"prompts.{tone_name}.version": prompts.version()}
    for name, prompt in prompts.files.items():
        tags[f"prompt.{name}.version"] = prompt.version
    return tags


def register_prompts(prompts, tone_name: str) -> dict[str, str]:
    """Each prompt in MLflow's Prompt Registry as `tonetune-<tone>-<name>`, a new registry version
    only when the text differs from the latest one; returns {`prompt.<name>.uri`: prompts:/name/N}.
    The registry is a convenience on top of the tags: when the store cannot hold prompts, the
    reason is returned as `prompt.registry` and nothing else changes."""
    import mlflow

    uris: dict[str, str] = {}
    try:
        for name, prompt in prompts.files.items():
            registered = f"{PROMPT_REGISTRY_PREFIX}-{tone_name}-{name}"
            latest = mlflow.genai.load_prompt(f"prompts:/{registered}@latest", allow_missing=True, link_to_model=False)
            if latest is None or latest.template != prompt.template:
                latest = mlflow.genai.register_prompt(
                    name=registered, template=prompt.template,
                    commit_message=f"{prompt.path.as_posix()} (sha256 {prompt.version})",
                    tags={"tonetune.sha256_12": prompt.version, "tonetune.path": prompt.path.as_posix()})
            uris[f"prompt.{name}.uri"] = f"prompts:/{registered}/{latest.version}"
    except Exception as error:  # noqa: BLE001 - an older server or a store without prompts: keep the tags
        return {"prompt.registry": f"unavailable ({type(error).__name__}: {str(error)[:200]})"}
    return uris


def log_prompts(prompts, tone_name: str, run_id: str | None = None) -> dict[str, str]:
    """Record the prompts a run sent: version tags, the texts as artifacts under `prompts/`, and
    the Prompt Registry versions; on `run_id` (without re-opening it) or the active run."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    tags = {**prompt_tags(prompts, tone_name), **register_prompts(prompts, tone_name)}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for prompt in prompts.files.values():
        client.log_text(run_id, prompt.template, f"prompts/{prompt.path.name}")
    return tags
