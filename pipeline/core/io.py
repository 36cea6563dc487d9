"""Durable file writes: atomic replacement and crash-safe appends, both fsynced.

- `atomic_write_bytes` / `atomic_write_text`: write a temporary file in the same folder, fsync
  it, rename it over the target, fsync the folder. A crash leaves the old file or the new one,
  never half a file (which DVC would happily hash).
- `durable_append_line`: append one line to a JSONL-style log and return only once it is on
  disk (file fsynced; the folder too when the file was just created). A torn last line left by
  an earlier crash is cut off first, so the new line never glues onto half a record.
- `repair_torn_tail`: that cut, on its own (readers call it before appending in bulk).

What this module does not do: decide formats, or keep a handle open between appends (the
response cache keeps its own handle for group commit, and uses `fsync_dir` from here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | Path) -> None:
    """fsync a folder so a new or renamed entry survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically and durably; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_with(path: str | Path, write) -> Path:
    """Atomic replacement for writers that need a file name (e.g. `frame.to_parquet`):
    `write(temporary_path)`, then fsync, rename and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return path


def repair_torn_tail(path: str | Path) -> int:
    """Cut an unterminated last line (a crash mid-append); returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if not size:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        handle.seek(0)
        data = handle.read()
        end = data.rfind(b"\n") + 1
        handle.truncate(end)
        handle.flush()
        os.fsync(handle.fileno())
        return size - end


def durable_append_line(path: str | Path, line: str | bytes) -> None:
    """Append one line (a newline is added) and fsync before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    if not created:
        repair_torn_tail(path)
    blob = line.encode("utf-8") if isinstance(line, str) else line
    with open(path, "ab") as handle:
        handle.write(blob.rstrip(b"\n") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)


def write_json(path: str | Path, record: dict[str, Any], nan_as_null: bool = False) -> Path:
    """The one JSON writer of the stages: `record` indented, atomically and durably (a reader
    such as `split` never sees half a file). Values JSON cannot hold (dates, paths) are written
    as text; `nan_as_null` writes NaN floats as null (strict JSON), at any depth."""
    import math

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [clean(item) for item in value]
        return value

    return atomic_write_text(path, json.dumps(clean(record) if nan_as_null else record, indent=2, default=str) + "\n")


def write_metrics_summary(metrics_dir: str | Path, enabled: bool) -> Path:
    """<metrics_dir>/summary.yaml for an optional stage: whether it ran and how many per-model
    records (`*.json`) it left. Written on every run, so the DVC metrics folder is never empty
    (an empty one makes DVC warn and reads as deleted in a fresh clone); `.yaml` (JSON is YAML)
    so loaders of the per-model `*.json` records skip it."""

    metrics_dir = Path(metrics_dir)
    models = len(list(metrics_dir.glob("*.json"))) if metrics_dir.is_dir() else 0
    metrics_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(metrics_dir / "summary.yaml", json.dumps({"enabled": enabled, "models": models}) + "\n")


def clear_model_outputs(metrics_dir: str | Path, reports_dir: str | Path) -> None:
    """Remove an optional stage's own earlier per-model results (`*.json` metrics, `*.parquet`
    reports), creating both folders, so a model no longer evaluated is not reported."""
    for folder, pattern in ((Path(metrics_dir), "*.json"), (Path(reports_dir), "*.parquet")):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(pattern):
            stale.unlink()

