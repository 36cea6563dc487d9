"""The job ledger `data/openai/jobs.jsonl`: what exists remotely, recorded the moment it exists.

Owns: the append-only JSONL of file ids, job ids and their updates, MLflow run ids and notes
(fsynced per record through pipeline.core.io), the queries over it, and the cross-process lock
around check-then-create. Does not own: talking to the API, or deciding what to create (jobs.py).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from pipeline.core.io import durable_append_line
from pipeline.openai.spec import LEDGER_PATH


class JobLedger:
    """Append-only JSONL of what exists remotely (files, jobs, MLflow runs), fsynced per record.

    Records: {"kind": "file", endpoint, sha256, file_id, ...}, {"kind": "file_gone", ...},
    {"kind": "job", endpoint, identity, job_id, ...}, {"kind": "job_update", endpoint, job_id,
    status, fine_tuned_model, ...}, {"kind": "job_superseded", ...} (--new-job) and
    {"kind": "run", endpoint, identity, mlflow_run_id}, {"kind": "degraded", endpoint, route}
    (the provider does not serve an optional route) and {"kind": "eval_repaid", ...} (evaluation
    requests sent again after a crash). A torn last line (a crash mid-write) is ignored and cut
    off before the next append. `lock()` serialises the check-then-create steps of concurrent
    processes on one machine (filelock)."""

    def __init__(self, path: Path = LEDGER_PATH):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it before returning (the id is then safe from a crash)."""
        durable_append_line(self.path, json.dumps({"at": datetime.now(UTC).isoformat(timespec="seconds"), **record},
                                                  sort_keys=True))

    def lock(self) -> FileLock:
        """A cross-process lock beside the ledger (filelock): held, or waited for, never skipped."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.path.with_suffix(".lock")))

    def file_id(self, endpoint: str, sha256: str) -> str | None:
        """The newest recorded upload of a file with this content at this endpoint, unless gone."""
        found = None
        for record in self.records():
            if record.get("endpoint") != endpoint or record.get("sha256") != sha256:
                continue
            if record.get("kind") == "file":
                found = record.get("file_id")
            elif record.get("kind") == "file_gone" and record.get("file_id") == found:
                found = None
        return found

    def job(self, endpoint: str, identity: str) -> dict[str, Any] | None:
        """The current job of an identity at this endpoint, with its later updates merged in."""
        current: dict[str, Any] | None = None
        for record in self.records():
            if record.get("endpoint") != endpoint:
                continue
            kind = record.get("kind")
            if kind == "job" and record.get("identity") == identity:
                current = dict(record)
            elif kind == "job_update" and current and record.get("job_id") == current.get("job_id"):
                current.update({k: v for k, v in record.items() if k not in ("kind", "at")})
            elif kind == "job_superseded" and current and record.get("job_id") == current.get("job_id"):
                current = None
        return current

    def known_job_ids(self, endpoint: str, identity: str) -> set[str]:
        return {r["job_id"] for r in self.records()
                if r.get("kind") == "job" and r.get("endpoint") == endpoint and r.get("identity") == identity}

    def run_id(self, endpoint: str, identity: str) -> str | None:
        found = None
        for record in self.records():
            if record.get("kind") == "run" and record.get("endpoint") == endpoint and record.get("identity") == identity:
                found = record.get("mlflow_run_id")
        return found
