"""Stage `promote`: put the best LoRA adapter in the MLflow registry as the Production model.

    python -m registry.promote                          # the DVC stage (after `report`)
    python -m registry promote [VERSION] [--force --reason TEXT]
    python -m registry rollback

The policy (one place: `policy_key`, `similarity_floor`, `is_better`):

1. guard: an adapter is eligible only if its mean similarity to the reference answers is at
   most `promote.similarity_tolerance` below the base model's (a tone that loses the content
   is not an improvement);
2. primary: the highest % conversational answers (Flesch >= evaluate.conversational_threshold);
3. tie-breaks: fewer training samples (cheaper data), then a smaller LoRA r (smaller adapter),
   then the model name, so the choice is deterministic.

A candidate replaces the current Production version only if it is strictly better under 2-3
(an equal one is not: no churn; the Production version is judged by this round's evaluation of
its training run when there is one, else by the metrics recorded on it when it was promoted)
and only if the data-quality gate passed for the exact
pairs.parquet its training split came from (metrics/data_quality.json when its md5 matches,
else the verdict the `split` run recorded for it). `--force --reason TEXT` overrides the
refusals; the reason and what was overridden are recorded as version tags. Versions that were
rolled back are skipped by the stage (else `dvc repro` would undo the rollback); promote them
explicitly by number.

Promotion registers the adapter's pyfunc model (logged by the train stage, registry/model.py)
as a version of `promote.registered_model_name`, tagged with its metrics, the base model's, the
dataset DVC md5s, training params, git commit, dvc.lock md5, training run id and data-quality
verdict, with a model card as the description. It sets alias `production`, moves the old one to
alias `previous`, moves the legacy stage to Production (archiving the old one; MLflow's
FutureWarning about stages is suppressed) and appends to a history tag that `rollback` pops.

Concurrency: a file lock serialises promotions that share a store: next to the sqlite file for a
local store, in the system temp folder (keyed by the server URI) for a server. Inside it every
step is check-then-act and idempotent: one training run maps to one version (an existing one is
reused) and promoting the current Production run is a no-op. Processes on different machines
share no lock; for them registration de-duplicates afterwards (the lowest version number for a
run wins, a duplicate this process created is deleted) and the alias is re-read after it is set.
Two such processes promoting *different* runs at the same instant end with one Production
version (the last writer's), but `previous` may skip the other one.

Exit codes: 0 promoted, or nothing to do (already Production, the stage kept a Production
version that is at least as good, or no adapter passes the similarity guard: "NOT PROMOTED");
1 refused by the gate (data quality, or an explicit VERSION not better); 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import METRICS_DIR, Config, load_config
from pipeline.core.errors import TonetuneError, exit_on_user_error

EVAL_DIR = METRICS_DIR / "eval"
DATA_QUALITY_PATH = METRICS_DIR / "data_quality.json"
PRODUCTION, PREVIOUS = "production", "previous"
LEGACY_STAGE = "Production"
BASE_KIND, ADAPTER_KIND = "base", "lora"
HISTORY_TAG = "tonetune.production_history"  # on the registered model: versions that were Production, oldest first
HISTORY_LIMIT = 100
RUN_TAG = "tonetune.training_run_id"
ROLLED_BACK_TAG = "tonetune.rolled_back"
METRIC_KEYS = (
    "pct_conversational", "pct_conversational_ci_low", "pct_conversational_ci_high",
    "similarity_mean", "flesch_mean", "flesch_median", "answer_words_mean", "n_eval",
)
PARAM_KEYS = (
    "precision", "lora_r", "lora_alpha", "learning_rate", "n_train", "epochs", "effective_batch_size",
    "target_modules", "system_prompt", "seed", "base_model_id", "base_model_sha256",
)
LOCK_ENV = "TONETUNE_PROMOTE_LOCK"  # "off": skip the file lock (tests of the lock-free path)
LOCK_TIMEOUT_S = 300
MAX_TAG_CHARS = 5000
SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
POLICY_TEXT = (
    "max % conversational; guard: similarity >= base similarity - {tolerance}; "
    "ties: fewer training samples, then smaller LoRA r"
)


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Candidate:
    """One adapter's evaluation, as the policy sees it."""

    model: str
    run_id: str | None
    pct_conversational: float
    similarity_mean: float
    n_train: int
    lora_r: int
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Candidate:
        """From a metrics/eval/<model>.json record (pipeline.core.evalmetrics.metrics_record)."""
        return cls(
            model=str(record["model"]),
            run_id=record.get("mlflow_run_id"),
            pct_conversational=_as_float(record.get("pct_conversational")),
            similarity_mean=_as_float(record.get("similarity_mean")),
            n_train=int(_as_float(record.get("n_train"), default=0)),
            lora_r=int(_as_float(record.get("lora_r"), default=0)),
            record=record,
        )

    @classmethod
    def from_version_tags(cls, tags: dict[str, str], version: str) -> Candidate:
        """From the tags promotion wrote on a model version (`metric.*`, `param.*`)."""
        if "metric.pct_conversational" not in tags:
            raise TonetuneError(
                f"version {version} has no tonetune metric tags (registered outside `registry promote`?): "
                "promote it with --force --reason TEXT"
            )
        record = {key.removeprefix("metric."): _as_float(value) for key, value in tags.items() if key.startswith("metric.")}
        record.update({key.removeprefix("param."): value for key, value in tags.items() if key.startswith("param.")})
        record["model"] = tags.get("tonetune.eval_model", f"version {version}")
        record["mlflow_run_id"] = tags.get(RUN_TAG)
        return cls.from_record(record)


def _as_float(value: Any, default: float = float("nan")) -> float:
    """A metric as float; None / text that is not a number -> `default`."""
    try:
        return default if value is None else float(value)
    except (TypeError, ValueError):
        return default


def policy_key(candidate: Candidate) -> tuple:
    """Smaller is better: more % conversational, then fewer samples, then smaller r."""
    return (-candidate.pct_conversational, candidate.n_train, candidate.lora_r)


def similarity_floor(base_similarity: float, tolerance: float) -> float:
    """The lowest similarity an adapter may have and still be eligible."""
    return base_similarity - tolerance


def is_eligible(candidate: Candidate, floor: float) -> bool:
    """Has metrics and passes the similarity guard (NaN never passes)."""
    return candidate.pct_conversational == candidate.pct_conversational and candidate.similarity_mean >= floor


def is_better(candidate: Candidate, incumbent: Candidate) -> bool:
    """Strictly better under the policy (equal keys keep the incumbent: no churn)."""
    return policy_key(candidate) < policy_key(incumbent)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Best first (policy key, then name for a deterministic order)."""
    return sorted(candidates, key=lambda c: (*policy_key(c), c.model))


def load_eval_records(eval_dir: Path) -> tuple[dict[str, Any], list[Candidate]]:
    """(base record, adapter candidates) from metrics/eval/*.json."""
    files = sorted(Path(eval_dir).glob("*.json"))
    if not files:
        raise TonetuneError(f"{eval_dir}: no metrics files (run `dvc repro evaluate` first)")
    base, candidates = None, []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise TonetuneError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if record.get("kind") == BASE_KIND:
            base = record
        elif record.get("kind") == ADAPTER_KIND:
            candidates.append(Candidate.from_record(record))
    if base is None or base.get("similarity_mean") is None:
        raise TonetuneError(f"{eval_dir}: no base model metrics with similarity_mean (the guard needs them)")
    if not candidates:
        raise TonetuneError(f"{eval_dir}: no adapter metrics (kind 'lora'): nothing to promote")
    return base, candidates


def describe(candidate: Candidate) -> str:
    """`name (62.0% conversational, similarity 0.712, n=150, r=32)` for messages."""
    return (
        f"{candidate.model} ({candidate.pct_conversational:.1f}% conversational, similarity "
        f"{candidate.similarity_mean:.3f}, n={candidate.n_train}, r={candidate.lora_r})"
    )


# --------------------------------------------------------------------------- data-quality evidence


@dataclass(frozen=True)
class DataQuality:
    """The data-quality verdict for the pairs.parquet an adapter's training split came from."""

    success: bool | None  # None: no evidence found
    pairs_md5: str | None
    source: str
    generation_run_id: str | None = None


def training_dataset(run) -> tuple[str, str] | None:
    """(path, DVC md5) of the run's training split, from its `dataset.train_*` tags."""
    tags = run.data.tags
    for key, md5 in sorted(tags.items()):
        match = re.fullmatch(r"dataset\.(train_[^.]+)\.dvc_md5", key)
        if match:
            return tags.get(f"dataset.{match.group(1)}.path", f"data/splits/{match.group(1)}.parquet"), md5
    return None


def split_run_for(client, experiment_id: str, stem: str, md5: str):
    """The newest `split` run that logged a training file `stem` with this md5 (None if none)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.stage = 'split' and tags.`dataset.{stem}.dvc_md5` = '{md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def pairs_md5_from_lock(train_path: str, md5: str, lock_path: Path) -> str | None:
    """pairs.parquet md5 that dvc.lock's `split` stage read, if dvc.lock records this train file."""
    from pipeline.core.config import PAIRS_PATH
    from pipeline.core.dvcmeta import locked_md5, read_lock

    locked = locked_md5(train_path, lock_path)
    if not locked or locked[0] != md5:
        return None
    deps = ((read_lock(lock_path).get("stages") or {}).get(locked[1]) or {}).get("deps") or []
    return next((str(dep.get("md5")) for dep in deps if dep.get("path") == PAIRS_PATH.as_posix()), None)


def read_summary(path: Path) -> dict[str, Any]:
    """validate's metrics/data_quality.json ({} when absent)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{path}: not valid JSON ({error.msg})") from None


def data_quality_verdict(client, run, summary_path: Path, lock_path: Path) -> DataQuality:
    """Did the data-quality gate pass for the data this run trained on?

    Evidence, most direct first: data_quality_success/pairs_md5 tags on the training run; else
    the `split` run that logged the same training file (its pairs_md5 and verdict tags); else
    dvc.lock (the pairs.parquet md5 the split stage read). The verdict comes from
    metrics/data_quality.json when it is for that same pairs md5 (the file DVC tracks), else
    from the recorded tag (split only runs on data that passed).
    """
    tags = run.data.tags
    pairs_md5, recorded, source, generation_run = tags.get("pairs_md5"), tags.get("data_quality_success"), "training run tags", None
    if not pairs_md5:
        train = training_dataset(run)
        if train is None:
            return DataQuality(None, None, "the training run records no training dataset md5")
        path, md5 = train
        split_run = split_run_for(client, run.info.experiment_id, Path(path).stem, md5)
        if split_run is not None:
            pairs_md5 = split_run.data.tags.get("pairs_md5")
            recorded = split_run.data.tags.get("data_quality_success")
            generation_run = split_run.data.tags.get("generation_run_id")
            source = f"split run {split_run.info.run_id}"
        else:
            pairs_md5, recorded, source = pairs_md5_from_lock(path, md5, lock_path), None, "dvc.lock"
    if not pairs_md5:
        return DataQuality(None, None, f"no record of which pairs.parquet {run.info.run_id} was trained on")
    summary = read_summary(summary_path)
    if summary.get("pairs_md5") == pairs_md5 and "success" in summary:
        return DataQuality(bool(summary["success"]), pairs_md5, Path(summary_path).as_posix(), generation_run)
    if recorded in ("true", "false"):
        return DataQuality(recorded == "true", pairs_md5, source, generation_run)
    return DataQuality(None, pairs_md5, f"{Path(summary_path).as_posix()} is not for pairs md5 {pairs_md5}", generation_run)


# --------------------------------------------------------------------------- what a version records


def redact(text: str) -> str:
    """Replace the value of any secret-looking environment variable (…API_KEY, TOKEN, SECRET,
    PASSWORD) found in `text`: a reason typed on the command line must not leak a key."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8 and value in text:
            text = text.replace(value, f"[{name} redacted]")
    return text


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as redacted strings within MLflow's length limit; None values dropped."""
    return {key: redact(str(value))[:MAX_TAG_CHARS] for key, value in tags.items() if value is not None}


def _fmt(value: Any, digits: int) -> str:
    """A number for the model card ('-' when missing)."""
    number = _as_float(value)
    return "-" if number != number else f"{number:.{digits}f}"


def version_tags(candidate: Candidate, base: dict[str, Any], run, quality: DataQuality, config: Config) -> dict[str, str]:
    """Everything a version records about where it came from (no environment, no secrets)."""
    from pipeline.core.dvcmeta import lock_digest
    from pipeline.core.tracking import git_commit

    params = run.data.params
    tags: dict[str, Any] = {
        RUN_TAG: run.info.run_id,
        "tonetune.training_run_name": run.info.run_name,
        "tonetune.eval_model": candidate.model,
        "tonetune.experiment_id": run.info.experiment_id,
        **{f"metric.{key}": candidate.record.get(key) for key in METRIC_KEYS},
        "base.pct_conversational": base.get("pct_conversational"),
        "base.similarity_mean": base.get("similarity_mean"),
        "base.flesch_mean": base.get("flesch_mean"),
        "base.answer_words_mean": base.get("answer_words_mean"),
        "base.model": base.get("family"),
        **{f"param.{key}": params.get(key, candidate.record.get(key)) for key in PARAM_KEYS},
        **{key: value for key, value in run.data.tags.items() if key.startswith("dataset.")},
        "data_quality.success": None if quality.success is None else str(quality.success).lower(),
        "data_quality.pairs_md5": quality.pairs_md5,
        "data_quality.source": quality.source,
        "generation_run_id": quality.generation_run_id,
        "git_commit": run.data.tags.get("git_commit") or run.data.tags.get("mlflow.source.git.commit"),
        "promote.git_commit": git_commit(),
        "dvc_lock_md5": lock_digest(),
        "promote.policy": POLICY_TEXT.format(tolerance=config.promote.similarity_tolerance),
        "evaluate.conversational_threshold": config.evaluate.conversational_threshold,
    }
    return clean_tags(tags)


def model_card(name: str, version: str, tags: dict[str, str], config: Config) -> str:
    """The version description: what it is, its data, its metrics vs the base, how to load it."""
    datasets = sorted({key.rsplit(".", 1)[0] for key in tags if key.startswith("dataset.") and key.endswith(".dvc_md5")})
    data_lines = [f"- {tags.get(f'{prefix}.path', prefix)}: DVC md5 `{tags[f'{prefix}.dvc_md5']}`" for prefix in datasets]
    quality = {"true": "passed", "false": "FAILED"}.get(tags.get("data_quality.success", ""), "unknown")
    rows = [
        ("% conversational", "metric.pct_conversational", "base.pct_conversational", 1),
        ("similarity to reference", "metric.similarity_mean", "base.similarity_mean", 3),
        ("mean Flesch", "metric.flesch_mean", "base.flesch_mean", 1),
        ("mean words per answer", "metric.answer_words_mean", "base.answer_words_mean", 0),
    ]
    table = "\n".join(f"| {label} | {_fmt(tags.get(mine), d)} | {_fmt(tags.get(theirs), d)} |" for label, mine, theirs, d in rows)
    interval = f"[{_fmt(tags.get('metric.pct_conversational_ci_low'), 1)}, {_fmt(tags.get('metric.pct_conversational_ci_high'), 1)}]"
    card = f"""# {name} v{version}: conversational LoRA adapter for {tags.get('param.base_model_id', 'the base model')}

**What it is.** A LoRA adapter (precision {tags.get('param.precision')}, r={tags.get('param.lora_r')}, \
alpha={tags.get('param.lora_alpha')}, learning rate {tags.get('param.learning_rate')}) fine-tuned on \
{tags.get('param.n_train')} LLM-simulated question/answer pairs in a natural, conversational tone for voice \
agents (tonetune's reproduction of "Fine-tuning on simulated data outperforms prompting for agent tone of \
voice"). It answers with the concise system prompt it was trained with. The base model is referenced, not \
copied (weights sha256 `{str(tags.get('param.base_model_sha256', '-'))[:16]}...`).

**Data.**
{chr(10).join(data_lines) or '- (no dataset tags on the training run)'}
- pairs.parquet md5 `{tags.get('data_quality.pairs_md5', '-')}`, data-quality gate: {quality} \
({tags.get('data_quality.source', '-')}); generation run `{tags.get('generation_run_id', '-')}`

**Metrics vs the base model** (validation set, n = {_fmt(tags.get('metric.n_eval'), 0)}; conversational = \
Flesch >= {tags.get('evaluate.conversational_threshold')}; 95% bootstrap interval {interval}; the base \
answers with the paper's verbose prompt):

| metric | this version | base |
|---|---|---|
{table}

**How to load.**

    import mlflow
    model = mlflow.pyfunc.load_model("models:/{name}@{PRODUCTION}")  # or "models:/{name}/{version}"
    model.predict(["Why is the sky blue?"])

Needs the tonetune package importable and the base model at its recorded path (or
TONETUNE_BASE_MODEL_DIR pointing at a copy with the same weights).

**Lineage.** Training run `{tags.get(RUN_TAG)}` ({tags.get('tonetune.training_run_name')}), code \
`{tags.get('git_commit', '-')}`, dvc.lock md5 `{tags.get('dvc_lock_md5', '-')}`. Audit it with \
`python -m registry lineage models:/{name}/{version}`.

**Promotion policy.** {tags.get('promote.policy')}.
"""
    return redact(card)[:MAX_TAG_CHARS]


# --------------------------------------------------------------------------- registry plumbing


def open_client(config: Config):
    """An MlflowClient on the project's store; a sqlite store that does not exist is an error
    (a lookup must not create an empty mlflow.db)."""
    from pipeline.core.tracking import disable_telemetry, tracking_uri

    uri = tracking_uri(config.tracking)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise TonetuneError(f"no MLflow store at {uri}: run the pipeline first (dvc repro)")
    disable_telemetry()
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def lock_path_for(uri: str) -> Path:
    """Where the promotion lock of a store lives: next to a sqlite file, else in the temp folder."""
    import hashlib
    import tempfile

    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return database.with_name(database.name + ".promote.lock")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tonetune-promote-{digest}.lock"


@contextmanager
def promotion_lock(uri: str):
    """Serialise promotions on one store (see the module docstring for the limits)."""
    if os.environ.get(LOCK_ENV, "").lower() == "off":
        yield None
        return
    from filelock import FileLock, Timeout

    path = lock_path_for(uri)
    try:
        with FileLock(str(path), timeout=LOCK_TIMEOUT_S):
            yield path
    except Timeout:
        raise TonetuneError(f"another promotion has held {path} for {LOCK_TIMEOUT_S} s; try again later") from None


def _not_found(error) -> bool:
    """An MlflowException that means 'no such alias / version / model'."""
    code = str(getattr(error, "error_code", ""))
    return "RESOURCE_DOES_NOT_EXIST" in code or "not found" in str(error).lower() or "INVALID_PARAMETER_VALUE" in code


def version_by_alias(client, name: str, alias: str):
    """The version holding `alias`, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if _not_found(error):
            return None
        raise


def get_version(client, name: str, version: str | int):
    """One model version; a missing one is a one-line error."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if _not_found(error):
            raise TonetuneError(f"{name} has no version {version} (see `python -m registry list`)") from None
        raise


def _quote(text: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def all_versions(client, name: str) -> list:
    """Every version of the registered model, oldest first ([] if the model does not exist)."""
    versions = client.search_model_versions(f"name = '{_quote(name)}'")
    return sorted(versions, key=lambda v: int(v.version))


def versions_for_run(client, name: str, run_id: str) -> list:
    """Versions registered from one training run, oldest first."""
    found = client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{_quote(run_id)}'")
    return sorted(found, key=lambda v: int(v.version))


def read_history(client, name: str) -> list[str]:
    """Versions that were Production, oldest first, consecutive repeats collapsed."""
    from mlflow.exceptions import MlflowException

    try:
        raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    except MlflowException as error:
        if _not_found(error):
            return []
        raise
    history: list[str] = []
    for version in filter(None, raw.split(",")):
        if not history or history[-1] != version:
            history.append(version)
    return history


def _lost_insert_race(error) -> bool:
    """The store's check-then-insert lost to a concurrent writer (a UNIQUE violation): the row
    exists now, so the same upsert retried becomes an update."""
    text = str(error)
    return "UNIQUE constraint failed" in text or "IntegrityError" in text or "duplicate key value" in text


def upsert(write, *args, attempts: int = 3):
    """Call a registry write that is an upsert for MLflow (set a tag or an alias), retrying when
    it lost an insert race to a promotion running elsewhere (seen in CI against `mlflow server`)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return write(*args)
        except MlflowException as error:
            if attempt == attempts - 1 or not _lost_insert_race(error):
                raise
            time.sleep(0.05 * (attempt + 1))


def write_history(client, name: str, history: list[str]) -> None:
    """Store the history tag (the newest HISTORY_LIMIT entries)."""
    upsert(client.set_registered_model_tag, name, HISTORY_TAG, ",".join(history[-HISTORY_LIMIT:]))


def model_uri_of(run) -> str:
    """The adapter pyfunc the train stage logged on this run (tag adapter_model_uri)."""
    return run.data.tags.get("adapter_model_uri") or f"runs:/{run.info.run_id}/adapter"


def register_once(client, name: str, run, tags: dict[str, str]):
    """The version for this training run: an existing one, else a new one. Idempotent, and
    safe against a concurrent registration elsewhere: afterwards the lowest version number for
    the run wins and a duplicate this call created is deleted."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = run.info.run_id
    existing = versions_for_run(client, name, run_id)
    if existing:
        return existing[0], False
    try:
        created = mlflow.register_model(model_uri_of(run), name, tags=tags)
    except MlflowException as error:
        raise TonetuneError(
            f"cannot register the model of run {run_id} ({model_uri_of(run)}): {' '.join(str(error).split())[:300]}"
        ) from None
    canonical = versions_for_run(client, name, run_id)[0]
    if str(canonical.version) != str(created.version):
        client.delete_model_version(name, str(created.version))
        return canonical, False
    return get_version(client, name, created.version), True


def set_legacy_stage(client, name: str, version: str) -> str | None:
    """Move the legacy stage to Production, archiving the old one (deprecated in MLflow but
    still read by some tools). The FutureWarning is expected and silenced; a registry that no
    longer supports stages only costs a note."""
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            client.transition_model_version_stage(name, str(version), LEGACY_STAGE, archive_existing_versions=True)
        except MlflowException as error:
            return f"legacy stage not set ({' '.join(str(error).split())[:120]})"
    return None


def make_production(client, name: str, version: str) -> tuple[str | None, list[str]]:
    """Point `production` at `version`, `previous` at the version it replaces; legacy stage;
    history. Returns (replaced version, notes). Re-reads the alias to verify the result."""
    version = str(version)
    notes = []
    current = version_by_alias(client, name, PRODUCTION)
    replaced = str(current.version) if current is not None else None
    if replaced == version:
        return None, notes
    if replaced is not None:
        upsert(client.set_registered_model_alias, name, PREVIOUS, replaced)
    upsert(client.set_registered_model_alias, name, PRODUCTION, version)
    note = set_legacy_stage(client, name, version)
    if note:
        notes.append(note)
    history = read_history(client, name)
    if replaced is not None and (not history or history[-1] != replaced):
        history.append(replaced)  # production was set by hand or before history existed
    if not history or history[-1] != version:
        history.append(version)
    write_history(client, name, history)
    verify_production(client, name, version)
    return replaced, notes


def verify_production(client, name: str, version: str) -> None:
    """After setting the alias: does it still point where we put it? (A concurrent promotion
    from another machine may have moved it; then say so instead of claiming success.)"""
    now = version_by_alias(client, name, PRODUCTION)
    if now is None or str(now.version) != str(version):
        raise TonetuneError(
            f"{name}: production moved to v{getattr(now, 'version', '-')} while promoting v{version} "
            "(a concurrent promotion); check `python -m registry list`"
        )


def get_run(client, run_id: str):
    """A run of the store; a missing one is a one-line error."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise TonetuneError(f"run {run_id} is not in the tracking store") from None


def now_utc() -> str:
    """A timestamp for tags (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promotion_tags(mode: str, forced: bool, reason: str | None, overridden: list[str]) -> dict[str, str]:
    """How this promotion happened: policy / version / forced, by whose reason, what it overrode."""
    tags = {"promote.mode": mode, "promote.at": now_utc(), "promote.forced": str(forced).lower(), ROLLED_BACK_TAG: "false"}
    if forced:
        tags["promote.force_reason"] = reason or ""
        tags["promote.gates_overridden"] = ",".join(overridden) or "none"
    return clean_tags(tags)


# --------------------------------------------------------------------------- the three operations


@dataclass(frozen=True)
class Outcome:
    """What an operation did, for the CLI: `action` promoted/noop/kept/none-eligible/refused/rolled-back."""

    action: str
    message: str
    version: str | None = None
    exit_code: int = 0


def check_force(force: bool, reason: str | None) -> None:
    """--force needs --reason (it is recorded on the version)."""
    if force and not (reason and reason.strip()):
        raise TonetuneError("--force needs --reason TEXT (the reason is recorded as a tag on the version)")
    if reason and not force:
        raise TonetuneError("--reason is only used with --force")


def incumbent_candidate(production, candidates: list[Candidate]) -> Candidate:
    """The Production version as a policy candidate: its current evaluation when this round
    evaluated the same training run (same conditions), else the metrics recorded on it."""
    run_id = production.tags.get(RUN_TAG) or production.run_id
    same = [c for c in candidates if run_id and c.run_id == run_id]
    return same[0] if same else Candidate.from_version_tags(production.tags, str(production.version))


def gate(candidate: Candidate, quality: DataQuality, incumbent: Candidate | None, floor: float) -> list[str]:
    """The refusals that apply to promoting `candidate` (empty: it may be promoted)."""
    refusals = []
    if quality.success is not True:
        verdict = "FAILED" if quality.success is False else "has no evidence"
        refusals.append(f"data_quality: the data-quality gate {verdict} for its data ({quality.source})")
    if not is_eligible(candidate, floor):
        refusals.append(f"similarity_guard: similarity {candidate.similarity_mean:.3f} is below the floor {floor:.3f}")
    if incumbent is not None and not is_better(candidate, incumbent):
        refusals.append(f"better_than_production: not better than Production {describe(incumbent)}")
    return refusals


def pick_candidate(client, name: str, candidates: list[Candidate], floor: float):
    """(best eligible candidate with a training run, its run, notes about the ones skipped)."""
    from mlflow.exceptions import MlflowException

    rolled_back = {v.run_id for v in all_versions(client, name) if v.tags.get(ROLLED_BACK_TAG) == "true"}
    notes = []
    for candidate in rank(candidates):
        if not is_eligible(candidate, floor):
            notes.append(f"skipped {describe(candidate)}: below the similarity floor {floor:.3f}")
            continue
        if not candidate.run_id:
            notes.append(f"skipped {candidate.model}: no MLflow run recorded with its metrics")
            continue
        if candidate.run_id in rolled_back:
            notes.append(f"skipped {candidate.model}: its version was rolled back (promote it by number to restore it)")
            continue
        try:
            run = client.get_run(candidate.run_id)
        except MlflowException:
            notes.append(f"skipped {candidate.model}: run {candidate.run_id} is not in this tracking store")
            continue
        if "adapter_model_uri" not in run.data.tags and run.data.tags.get("tonetune.stage") != "train":
            notes.append(f"skipped {candidate.model}: run {candidate.run_id} has no logged adapter model")
            continue
        return candidate, run, notes
    return None, None, notes


def promote_best(config: Config, eval_dir: Path = EVAL_DIR, summary_path: Path = DATA_QUALITY_PATH,
                 lock_path: Path | None = None, force: bool = False, reason: str | None = None) -> Outcome:
    """The DVC stage: promote the best adapter of metrics/eval if the gate lets it through."""
    from pipeline.core.dvcmeta import DVC_LOCK
    from pipeline.core.tracking import tracking_uri

    check_force(force, reason)
    name = config.promote.registered_model_name
    base, candidates = load_eval_records(eval_dir)
    floor = similarity_floor(float(base["similarity_mean"]), config.promote.similarity_tolerance)
    client = open_client(config)
    with promotion_lock(tracking_uri(config.tracking)):
        candidate, run, notes = pick_candidate(client, name, candidates, floor)
        if candidate is None and force:
            candidate = next((c for c in rank(candidates) if c.run_id), None)
            run = get_run(client, candidate.run_id) if candidate else None
        if candidate is None:
            # A policy decision, not a failure: like "kept", the stage ends 0 so `dvc repro` and
            # `make demo` complete and say so; production (if any) is left as it was.
            message = "; ".join(["NOT PROMOTED: no adapter is eligible for promotion", *notes])
            return Outcome("none-eligible", message + "\n  production is unchanged; to override the policy: "
                           "python -m registry promote --force --reason TEXT")
        production = version_by_alias(client, name, PRODUCTION)
        if production is not None and (production.tags.get(RUN_TAG) or production.run_id) == run.info.run_id:
            message = f"{name} v{production.version} ({candidate.model}) is already production: nothing to do"
            return Outcome("noop", "\n".join([message, *notes]), str(production.version))
        incumbent = incumbent_candidate(production, candidates) if production is not None else None
        quality = data_quality_verdict(client, run, summary_path, lock_path or DVC_LOCK)
        refusals = gate(candidate, quality, incumbent, floor)
        if refusals and not force:
            if [r for r in refusals if not r.startswith("better_than_production")]:
                return Outcome("refused", f"promotion of {describe(candidate)} refused: " + "; ".join(refusals), exit_code=1)
            return Outcome("kept", f"kept {name} v{production.version}: best candidate {describe(candidate)} is "
                           f"{refusals[0].split(': ', 1)[1]}", str(production.version))
        tags = version_tags(candidate, base, run, quality, config)
        version, created = register_once(client, name, run, tags)
        return finish_promotion(client, config, name, version, created, tags,
                                promotion_tags("policy" if not force else "forced", force, reason,
                                               [r.split(":", 1)[0] for r in refusals]),
                                describe(candidate), notes)


def finish_promotion(client, config: Config, name: str, version, created: bool, tags: dict[str, str],
                     how: dict[str, str], label: str, notes: list[str]) -> Outcome:
    """Write the version's tags and model card, then move the aliases and the legacy stage."""
    number = str(version.version)
    recorded = version.tags or {}
    for key, value in {**tags, **how}.items():
        if recorded.get(key) != value:  # only what changed: one request per tag
            upsert(client.set_model_version_tag, name, number, key, value)
    if tags:
        client.update_model_version(name, number, description=model_card(name, number, {**tags, **how}, config))
    replaced, stage_notes = make_production(client, name, number)
    verb = "registered and promoted" if created else "promoted"
    replaced_text = f"; v{replaced} is now {PREVIOUS}" if replaced else ""
    forced = f" (FORCED: {how.get('promote.force_reason')}; overrode {how.get('promote.gates_overridden')})" \
        if how.get("promote.forced") == "true" else ""
    lines = [f"{verb} {name} v{number}: {label} -> alias {PRODUCTION}{replaced_text}{forced}", *notes, *stage_notes]
    return Outcome("promoted", "\n".join(lines), number)


def promote_version(config: Config, number: str, summary_path: Path = DATA_QUALITY_PATH,
                    lock_path: Path | None = None, force: bool = False, reason: str | None = None) -> Outcome:
    """`registry promote VERSION`: an existing version, under the same gate unless forced."""
    from mlflow.exceptions import MlflowException

    from pipeline.core.dvcmeta import DVC_LOCK
    from pipeline.core.tracking import tracking_uri

    check_force(force, reason)
    name = config.promote.registered_model_name
    client = open_client(config)
    with promotion_lock(tracking_uri(config.tracking)):
        version = get_version(client, name, number)
        production = version_by_alias(client, name, PRODUCTION)
        if production is not None and str(production.version) == str(version.version):
            return Outcome("noop", f"{name} v{version.version} is already production: nothing to do", str(version.version))
        refusals: list[str] = []
        try:
            candidate = Candidate.from_version_tags(version.tags, str(version.version))
        except TonetuneError as error:
            if not force:
                raise
            candidate, refusals = None, [f"metrics: {error}"]
        if candidate is not None:
            quality = DataQuality(
                {"true": True, "false": False}.get(version.tags.get("data_quality.success", "")),
                version.tags.get("data_quality.pairs_md5"), version.tags.get("data_quality.source", "version tags"),
            )
            if quality.success is None and version.run_id:
                try:
                    quality = data_quality_verdict(client, client.get_run(version.run_id), summary_path, lock_path or DVC_LOCK)
                except MlflowException:
                    pass
            base_similarity = _as_float(version.tags.get("base.similarity_mean"))
            floor = similarity_floor(base_similarity, config.promote.similarity_tolerance) if base_similarity == base_similarity else float("-inf")
            incumbent = None
            if production is not None:
                try:
                    incumbent = Candidate.from_version_tags(production.tags, str(production.version))
                except TonetuneError:
                    incumbent = None  # a Production version without metrics tags: nothing to compare
            refusals = gate(candidate, quality, incumbent, floor)
        if refusals and not force:
            return Outcome("refused", f"promotion of {name} v{version.version} refused: " + "; ".join(refusals), exit_code=1)
        how = promotion_tags("version" if not force else "forced", force, reason, [r.split(":", 1)[0] for r in refusals])
        label = describe(candidate) if candidate else f"version {version.version}"
        return finish_promotion(client, config, name, version, False, {}, how, label, [])


def rollback(config: Config) -> Outcome:
    """Move `production` back to `previous`, and `previous` to the one before it (history tag)."""
    from pipeline.core.tracking import tracking_uri

    name = config.promote.registered_model_name
    client = open_client(config)
    with promotion_lock(tracking_uri(config.tracking)):
        current = version_by_alias(client, name, PRODUCTION)
        previous = version_by_alias(client, name, PREVIOUS)
        if current is None:
            raise TonetuneError(f"{name} has no {PRODUCTION} version: nothing to roll back")
        if previous is None:
            raise TonetuneError(f"{name} v{current.version} is {PRODUCTION} and no {PREVIOUS} version is recorded: nothing to roll back to")
        old, new = str(current.version), str(previous.version)
        history = read_history(client, name)
        if history and history[-1] == old:
            history.pop()
        if not history or history[-1] != new:
            history.append(new)  # aliases were moved by hand: trust them
        before = history[-2] if len(history) >= 2 else None
        upsert(client.set_registered_model_alias, name, PRODUCTION, new)
        if before and before != new:
            upsert(client.set_registered_model_alias, name, PREVIOUS, before)
        else:
            client.delete_registered_model_alias(name, PREVIOUS)
        note = set_legacy_stage(client, name, new)
        write_history(client, name, history)
        stamp = now_utc()
        upsert(client.set_model_version_tag, name, old, ROLLED_BACK_TAG, "true")
        upsert(client.set_model_version_tag, name, old, "tonetune.rolled_back_at", stamp)
        upsert(client.set_model_version_tag, name, new, "tonetune.restored_by_rollback_from", old)
        upsert(client.set_model_version_tag, name, new, "tonetune.restored_at", stamp)
        verify_production(client, name, new)
    after = f"; {PREVIOUS} is now v{before}" if before and before != new else f"; no {PREVIOUS} version before it"
    message = f"rolled back {name}: {PRODUCTION} v{old} -> v{new}{after}" + (f"\n{note}" if note else "")
    return Outcome("rolled-back", message, new)


# --------------------------------------------------------------------------- CLI


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `python -m registry.promote` and `python -m registry promote` share."""
    parser.add_argument("--force", action="store_true", help="promote even if the gate refuses (needs --reason)")
    parser.add_argument("--reason", help="why the gate is overridden (recorded as tag promote.force_reason)")
    parser.add_argument("--metrics-dir", type=Path, default=EVAL_DIR, help="per-model metrics JSON files")
    parser.add_argument("--data-quality", type=Path, default=DATA_QUALITY_PATH, help="validate's summary JSON")


def report(outcome: Outcome) -> int:
    """Print an outcome (refusals on stderr) and return its exit code."""
    stream = sys.stderr if outcome.exit_code else sys.stdout
    prefix = "promote: " if outcome.action != "rolled-back" else ""
    print(prefix + outcome.message, file=stream)
    return outcome.exit_code


def run_promote(args: argparse.Namespace) -> int:
    """Promote by policy (no VERSION) or a given version; print what happened."""
    config = load_config()
    version = getattr(args, "version", None)
    if version:
        if not str(version).isdigit():
            raise TonetuneError(f"VERSION must be a version number, got {version!r}")
        outcome = promote_version(config, str(version), args.data_quality, force=args.force, reason=args.reason)
    else:
        outcome = promote_best(config, args.metrics_dir, args.data_quality, force=args.force, reason=args.reason)
    return report(outcome)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m registry.promote",
        description="Stage promote: register the best adapter of metrics/eval and set alias production "
        "(policy: max %% conversational; similarity >= base - promote.similarity_tolerance; ties: fewer "
        "samples, smaller r). Exit 0 promoted or nothing to do, 1 refused by the gate, 2 bad input.",
    )
    add_promote_arguments(parser)
    sys.exit(run_promote(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
