"""Registry operations on the MLflow store: register, aliases, legacy stage, tags, lock, history.

Owns every write promotion and rollback make to the model registry, each check-then-act and
idempotent: `register_once` (one training run -> one version, duplicates from a concurrent
registration elsewhere deleted), `make_production` (aliases `production`/`previous`, the legacy
stage, the history tag that rollback pops), tag and alias writes (retried when they lose an
insert race: pipeline.core.tracking.retry_lost_insert_race), `promotion_lock` (a filelock per
store) and the lookups they need.
Does not own: opening the store (pipeline.core.tracking.open_client), deciding anything
(registry/policy.py), the evidence or the card (registry/evidence.py, registry/card.py).

Concurrency: the file lock serialises promotions that share a store: next to the sqlite file for
a local store, in the system temp folder (keyed by the server URI) for a server. Processes on
different machines share no lock; for them registration de-duplicates afterwards (the lowest
version number for a run wins) and the alias is re-read after it is set (`verify_production`).
Two such processes promoting *different* runs at the same instant end with one Production
version (the last writer's), but `previous` may skip the other one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError
from pipeline.core.tracking import not_found, retry_lost_insert_race
from registry.evidence import clean_tags

PRODUCTION, PREVIOUS = "production", "previous"
LEGACY_STAGE = "Production"
HISTORY_LIMIT = 100
LOCK_ENV = "TONETUNE_PROMOTE_LOCK"  # "off": skip the file lock (tests of the lock-free path)
LOCK_TIMEOUT_S = 300


# --------------------------------------------------------------------------- the lock


def lock_path_for(uri: str) -> Path:
    """Where the promotion lock of a store lives: next to a sqlite file, else in the temp folder."""
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


# --------------------------------------------------------------------------- lookups


def version_by_alias(client, name: str, alias: str):
    """The version holding `alias`, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if not_found(error):
            return None
        raise


def get_version(client, name: str, version: str | int):
    """One model version; a missing one is a one-line error."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if not_found(error):
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


def rolled_back_runs(client, name: str) -> set[str]:
    """Training runs whose version was rolled back (the stage does not pick them again)."""
    return {v.run_id for v in all_versions(client, name) if v.tags.get(Tags.ROLLED_BACK) == "true"}


def read_history(client, name: str) -> list[str]:
    """Versions that were Production, oldest first, consecutive repeats collapsed."""
    from mlflow.exceptions import MlflowException

    try:
        raw = client.get_registered_model(name).tags.get(Tags.PRODUCTION_HISTORY, "")
    except MlflowException as error:
        if not_found(error):
            return []
        raise
    history: list[str] = []
    for version in filter(None, raw.split(",")):
        if not history or history[-1] != version:
            history.append(version)
    return history


def model_uri_of(run) -> str:
    """The adapter pyfunc the train stage logged on this run (tag adapter_model_uri)."""
    return run.data.tags.get(Tags.ADAPTER_MODEL_URI) or f"runs:/{run.info.run_id}/adapter"


def has_model(run) -> bool:
    """Did the train stage log an adapter model on this run?"""
    return Tags.ADAPTER_MODEL_URI in run.data.tags or Tags.stage_of(run.data.tags) == "train"


# --------------------------------------------------------------------------- writes


def set_tags(client, name: str, number: str, tags: dict[str, str], recorded: dict[str, str] | None = None) -> None:
    """Write the version tags that differ from what it records (one request per changed tag)."""
    recorded = recorded or {}
    for key, value in tags.items():
        if recorded.get(key) != value:
            retry_lost_insert_race(client.set_model_version_tag, name, number, key, value)


def set_run_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Write tags on a tracking run (the decision on the finalist's training run), in one request."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def write_history(client, name: str, history: list[str]) -> None:
    """Store the history tag (the newest HISTORY_LIMIT entries)."""
    retry_lost_insert_race(client.set_registered_model_tag, name, Tags.PRODUCTION_HISTORY, ",".join(history[-HISTORY_LIMIT:]))


def register_once(client, name: str, run, tags: dict[str, str]):
    """The version for this training run: an existing one, else a new one. Idempotent, and
    safe against a concurrent registration elsewhere: afterwards the lowest version number for
    the run wins and a duplicate this call created is deleted. Returns (version, created)."""
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
        retry_lost_insert_race(client.set_registered_model_alias, name, PREVIOUS, replaced)
    retry_lost_insert_race(client.set_registered_model_alias, name, PRODUCTION, version)
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


def roll_back(client, name: str) -> tuple[str, str, str | None, str | None]:
    """Move `production` to `previous` and `previous` one further back (history tag); tag the
    rolled-back version. Returns (old, new, new previous or None, legacy-stage note)."""
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
    retry_lost_insert_race(client.set_registered_model_alias, name, PRODUCTION, new)
    if before and before != new:
        retry_lost_insert_race(client.set_registered_model_alias, name, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    note = set_legacy_stage(client, name, new)
    write_history(client, name, history)
    stamp = now_utc()
    set_tags(client, name, old, {Tags.ROLLED_BACK: "true", Tags.ROLLED_BACK_AT: stamp})
    set_tags(client, name, new, {Tags.RESTORED_FROM: old, Tags.RESTORED_AT: stamp})
    verify_production(client, name, new)
    return old, new, before if before and before != new else None, note


def verify_production(client, name: str, version: str) -> None:
    """After setting the alias: does it still point where we put it? (A concurrent promotion
    from another machine may have moved it; then say so instead of claiming success.)"""
    now = version_by_alias(client, name, PRODUCTION)
    if now is None or str(now.version) != str(version):
        raise TonetuneError(
            f"{name}: production moved to v{getattr(now, 'version', '-')} while promoting v{version} "
            "(a concurrent promotion); check `python -m registry list`"
        )


def now_utc() -> str:
    """A timestamp for tags (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def promotion_tags(mode: str, forced: bool, reason: str | None, overridden: list[str]) -> dict[str, str]:
    """How this promotion happened: policy / version / forced, by whose reason, and (forced) the
    refusals it overrode: their names (`promote.gates_overridden`) and the full lines
    (`promote.overrides`, which the model card quotes)."""
    tags = {Tags.PROMOTE_MODE: mode, Tags.PROMOTE_AT: now_utc(), Tags.PROMOTE_FORCED: str(forced).lower(),
            Tags.ROLLED_BACK: "false"}
    if forced:
        tags[Tags.PROMOTE_FORCE_REASON] = reason or ""
        tags[Tags.PROMOTE_OVERRIDDEN] = ",".join(line.split(":", 1)[0].split(" ", 1)[0] for line in overridden) or "none"
        tags[Tags.PROMOTE_OVERRIDES] = "\n".join(overridden) or "none"
    return clean_tags(tags)
