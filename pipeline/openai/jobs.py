"""The job lifecycle: files uploaded once, a job created once per identity, followed to its end.

Owns: `ensure_file` (recorded, found remotely by name, or uploaded), `ensure_job` (recorded,
adopted by its identity metadata, or created after the budget check; never created twice),
`follow_job` (polling with backoff, events into MLflow), `record_results` (checkpoints, the
result file) and `cancel_job`. Each id is appended to the ledger the moment it exists.
Does not own: the HTTP calls (api.py), the ledger format (ledger.py), evaluation, stage wiring.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.config import OpenAIConfig
from pipeline.core.errors import TonetuneError
from pipeline.core.io import atomic_write_bytes
from pipeline.openai.api import TERMINAL, FineTuningAPI, RemoteNotFound, retrying
from pipeline.openai.ledger import JobLedger
from pipeline.openai.spec import JobSpec, sha256_hex
from pipeline.openai.tracking import RunLog


class JobFailed(TonetuneError):
    """The fine-tuning job ended failed or cancelled (the message is the API's)."""


def ensure_file(api: FineTuningAPI, ledger: JobLedger, data: bytes, role: str) -> str:
    """The file id of `data` at this endpoint: recorded, found remotely by name, or uploaded now."""
    sha = sha256_hex(data)
    filename = f"tonetune-{role}-{sha[:16]}.jsonl"
    recorded = ledger.file_id(api.endpoint, sha)
    if recorded:
        try:
            api.retrieve_file(recorded)  # None (not checked) when the provider does not serve it
            return recorded
        except RemoteNotFound:  # deleted remotely: record that, upload again
            ledger.append({"kind": "file_gone", "endpoint": api.endpoint, "sha256": sha, "file_id": recorded})
    existing = api.find_file(filename, len(data))
    if existing:
        print(f"openai: {role} file {existing} found at {api.host} (uploaded before; not uploading again)", flush=True)
        ledger.append({"kind": "file", "endpoint": api.endpoint, "sha256": sha, "file_id": existing,
                       "filename": filename, "bytes": len(data), "found_remotely": True})
        return existing
    what = f"files.create({filename})"
    uploaded = retrying(what, lambda: api.call(what, api.upload, filename, data), api.config,
                        check_first=lambda: api.find_file(filename, len(data)))
    file_id = uploaded if isinstance(uploaded, str) else uploaded.id
    ledger.append({"kind": "file", "endpoint": api.endpoint, "sha256": sha, "file_id": file_id,
                   "filename": filename, "bytes": len(data)})
    print(f"openai: uploaded {role} file {filename} ({len(data)} bytes) as {file_id}", flush=True)
    return file_id


def ensure_job(api: FineTuningAPI, ledger: JobLedger, spec: JobSpec, files: Callable[[], tuple[str, str | None]],
               metadata: dict[str, str], new_job: bool, before_create: Callable[[], Any] = lambda: None):
    """(job, created): the identity's recorded job, a remote job tagged with it, or a new one.

    `before_create()` (the budget check) and then `files()` (upload or find the training and
    validation files) are only called when a job has to be created. With `new_job` the recorded
    job is superseded and a new one created. When the provider does not list jobs, a creation
    whose reply was lost is not sent again (it may have happened: it would be paid twice)."""
    identity = spec.identity
    recorded = ledger.job(api.endpoint, identity)
    if recorded and new_job:
        ledger.append({"kind": "job_superseded", "endpoint": api.endpoint, "identity": identity,
                       "job_id": recorded["job_id"]})
        recorded = None
    if recorded:
        try:
            return api.retrieve_job(recorded["job_id"]), False
        except RemoteNotFound:
            raise TonetuneError(
                f"job {recorded['job_id']} (recorded in {ledger.path}) does not exist at {api.host}: "
                "pass --new-job to create a new one (paid)"
            ) from None
    known = ledger.known_job_ids(api.endpoint, identity)
    if new_job:  # every job that exists now is an old one; only a job made by our own attempt counts
        known |= {job.id for job in api.find_jobs(identity)}

    def adoptable():
        """A job with this identity not known yet: made by an attempt whose reply never arrived
        (or, without --new-job, by another machine). Running or finished beats failed."""
        jobs = [job for job in api.find_jobs(identity) if job.id not in known]
        jobs = [job for job in jobs if job.status not in ("failed", "cancelled")] or jobs
        return jobs[0] if jobs else None

    found = None if new_job else adoptable()
    if found is not None:
        print(f"openai: job {found.id} for this training set already exists at {api.host} "
              f"({found.status}); following it instead of creating another", flush=True)
        ledger.append({"kind": "job", "endpoint": api.endpoint, "identity": identity, "job_id": found.id,
                       "base_model": spec.base_model, "found_remotely": True})
        return found, False
    before_create()
    training_file, validation_file = files()

    def created_after_all():
        found = adoptable()
        if found is None and not api.lists_jobs:
            raise TonetuneError(
                f"fine_tuning.jobs.create: the reply was lost and {api.host} does not list jobs, so whether the job "
                "was created cannot be checked: not sending it again (it could be paid twice); look at the "
                "provider's jobs, then re-run (--new-job to create one)")
        return found

    job = retrying("fine_tuning.jobs.create",
                   lambda: api.call("fine_tuning.jobs.create", api.create_job, spec, training_file, validation_file,
                                    metadata),
                   api.config, check_first=created_after_all)
    ledger.append({"kind": "job", "endpoint": api.endpoint, "identity": identity, "job_id": job.id,
                   "base_model": spec.base_model, "training_file": training_file, "validation_file": validation_file})
    print(f"openai: created fine-tuning job {job.id} ({spec.base_model}, {spec.n_epochs} epochs, batch "
          f"{spec.batch_size}, lr multiplier {spec.learning_rate_multiplier:g}, seed {spec.seed})", flush=True)
    return job, True


def follow_job(api: FineTuningAPI, job, run_log: RunLog, config: OpenAIConfig,
               sleep: Callable[[float], None] = time.sleep):
    """Poll until the job ends, streaming new events into the run; returns the final job.

    The interval starts at poll_interval_s and doubles after each poll that brought no news (no
    status change, no event), up to poll_max_interval_s. Transient API errors are retried at
    the same pace, up to max_retries in a row (`retrying`); a 404 for the job is final."""
    seen: set[str] = set()
    interval = config.poll_interval_s
    first = True
    status = None
    while True:
        def poll(current=job, fresh=first):
            polled = current if fresh else api.retrieve_job(current.id)
            return polled, api.new_events(polled.id, seen)

        job, events = retrying(f"polling {job.id}", poll, config, wait_s=interval, sleep=sleep)
        news = bool(events) or job.status != status
        if job.status != status:
            print(f"openai: job {job.id}: {job.status}", flush=True)
            run_log.tags({"openai.status": job.status})
            status = job.status
        log_events(events, run_log, quiet=first and len(events) > 5)
        first = False
        if job.status in TERMINAL:
            return job
        interval = config.poll_interval_s if news else min(config.poll_max_interval_s, interval * 2)
        sleep(interval)


def log_events(events: list, run_log: RunLog, quiet: bool = False) -> None:
    """Metrics events -> step metrics; message events -> printed (only the last few on a resume)."""
    rows = [(int(event.data["step"]), event.data) for event in events
            if event.type == "metrics" and isinstance(event.data, dict) and "step" in event.data]
    run_log.steps(rows)
    messages = [event for event in events if event.type != "metrics"]
    for event in messages[-3:] if quiet else messages:
        print(f"openai:   [{event.level}] {event.message}", flush=True)
    if rows:
        step, data = rows[-1]
        total = data.get("total_steps")
        print(f"openai:   step {step}{f'/{total}' if total else ''}: train_loss {data.get('train_loss')}", flush=True)


def record_results(api: FineTuningAPI, job, run_log: RunLog, out_dir: Path) -> dict[str, Any]:
    """Checkpoint metrics and the result file (step_metrics.csv) into the run; a summary dict."""
    import mlflow

    checkpoints = api.checkpoints(job.id)
    run_log.steps((checkpoint.step_number, checkpoint.metrics.model_dump(exclude_none=True))
                  for checkpoint in checkpoints)
    run_log.tags({f"openai.checkpoint.step_{c.step_number}": c.fine_tuned_model_checkpoint for c in checkpoints})
    for file_id in job.result_files or []:
        content = api.result_file(file_id)
        if content is None:  # the provider does not serve file contents
            continue
        path = atomic_write_bytes(out_dir / "step_metrics.csv", content)
        mlflow.log_artifact(str(path), artifact_path="openai")
        run_log.steps(_csv_rows(content))
    summary = {"trained_tokens": job.trained_tokens, "checkpoints": len(checkpoints)}
    if job.trained_tokens is not None:
        mlflow.log_metric("trained_tokens", job.trained_tokens)
    if job.finished_at and job.created_at:
        mlflow.log_metric("job_wall_time_s", job.finished_at - job.created_at)
    return summary


def _csv_rows(content: bytes) -> list[tuple[int, dict[str, float]]]:
    """(step, {column: value}) rows of step_metrics.csv; empty cells skipped."""
    import csv
    import io  # noqa: I001 (the standard library's, not pipeline.core.io)

    rows = []
    for row in csv.DictReader(io.StringIO(content.decode("utf-8", errors="replace"))):
        try:
            step = int(float(row.pop("step")))
        except (KeyError, TypeError, ValueError):
            continue
        values = {}
        for key, value in row.items():
            with contextlib.suppress(TypeError, ValueError):
                values[key] = float(value)
        rows.append((step, values))
    return rows
