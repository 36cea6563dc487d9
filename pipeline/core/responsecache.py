"""Durable, append-only cache of generator responses: a paid answer is never paid for twice.

Each response is one JSON line `{"key": ..., "value": {...}}` in a JSONL file, keyed by the
SHA-256 of everything that determines the answer (backend, model, messages, temperature,
max tokens, seed; see `cache_key`). A response is written, flushed and fsynced BEFORE the
engine is allowed to use it, so after a crash (SIGKILL included) every response that
influenced a decision is on disk, and a re-run replays it instead of calling the API again.

fsync costs ~6 ms on these disks, which at 300 responses/s would eat the event loop. Writes
are therefore group-committed: responses that arrive while an fsync is running are written
together by the next one, in a worker thread. Each caller still waits for the fsync that
covers its own line, so the guarantee above is per response.

A SIGKILL can tear the last line. Loading drops an unterminated tail (truncating the file so
the next append starts on a clean line) and skips any other unreadable line, counting both.

What this module does not do: decide what to cache (client.py caches successful responses
only) or ever delete entries (the file is a DVC `persist: true` output).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_key(identity: dict[str, Any]) -> str:
    """SHA-256 of a request's identity, serialised canonically (sorted keys, no spaces)."""
    blob = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """The JSONL response cache at `path`, loaded in full at start, appended to durably."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.torn_bytes = 0
        self.corrupt_lines = 0
        self._entries: dict[str, dict[str, Any]] = {}
        self._queue: list[tuple[str, dict[str, Any], bytes, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._load()
        self.loaded = len(self._entries)
        self._handle = open(self.path, "ab")  # noqa: SIM115 (kept open for the whole run)

    def _load(self) -> None:
        """Read every complete line; truncate a torn tail left by a crash mid-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self.path.touch()
            _fsync_dir(self.path.parent)
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.torn_bytes = len(data) - end
            with open(self.path, "r+b") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key, value = record["key"], record["value"]
            except (ValueError, KeyError, TypeError):
                self.corrupt_lines += 1
                continue
            # First write wins: that is the response the first run actually used.
            self._entries.setdefault(key, value)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached response for `key`, or None."""
        return self._entries.get(key)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        """Append a response and return only once it is fsynced (group commit)."""
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False, separators=(",", ":"))
        future = asyncio.get_running_loop().create_future()
        self._queue.append((key, value, line.encode("utf-8") + b"\n", future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_queue())
        await asyncio.shield(future)

    async def _flush_queue(self) -> None:
        """Write and fsync everything queued, batch after batch, until the queue is empty."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write, b"".join(line for _, _, line, _ in batch))
            except BaseException as error:  # disk full, or the run is being cancelled
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error if isinstance(error, Exception) else OSError(str(error)))
                if not isinstance(error, Exception):
                    raise
                continue
            for key, value, _, future in batch:
                self._entries.setdefault(key, value)
                if not future.done():
                    future.set_result(None)

    def put_sync(self, key: str, value: dict[str, Any]) -> None:
        """Synchronous durable append (for callers outside an event loop)."""
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False, separators=(",", ":"))
        self._write(line.encode("utf-8") + b"\n")
        self._entries.setdefault(key, value)

    def _write(self, blob: bytes) -> None:
        """Append bytes, flush Python's buffer, then fsync so they survive a crash."""
        self._handle.write(blob)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        """Close the append handle (every put has already been fsynced)."""
        if not self._handle.closed:
            self._handle.close()


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so a newly created file's name survives a crash (POSIX only)."""
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
