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
the next append starts on a clean line) and skips every other line it cannot use, counting
them: not JSON, not an object, a missing key, or a value of the wrong shape or types (a
response needs a string `content` and integer token counts). `damage_report()` says so in one
line; the run goes on and asks those requests again.

Resume honesty: before a request is sent, `mark_sent(key)` appends a durable intent line
`{"key": ..., "sent": true}`. A key whose intent is on disk but whose response is not was in
flight when a run died: it was (probably) paid for and is paid for again. `was_in_flight(key)`
lets the client count and name those re-paid requests.

What this module does not do: decide what to cache (llmclient.py caches successful responses
only) or ever delete entries (the file is a DVC `persist: true` output).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.io import fsync_dir, repair_torn_tail


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
        self._sent: set[str] = set()  # keys with a durable "sent" intent line
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
            fsync_dir(self.path.parent)
            return
        self.torn_bytes = repair_torn_tail(self.path)
        for line in self.path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.corrupt_lines += 1
                continue
            kind = record_kind(record)
            if kind == "response":
                # First write wins: that is the response the first run actually used.
                self._entries.setdefault(record["key"], record["value"])
            elif kind == "sent":
                self._sent.add(record["key"])
            elif kind == "settled":
                self._sent.discard(record["key"])
            else:
                self.corrupt_lines += 1
        self.in_flight_at_crash = len(self._sent - self._entries.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached response for `key`, or None."""
        return self._entries.get(key)

    def was_in_flight(self, key: str) -> bool:
        """Whether an earlier run sent this request and died before its response was cached."""
        return key in self._sent and key not in self._entries

    def damage_report(self) -> str | None:
        """One line about what loading skipped or cut (None when the file was clean)."""
        if not (self.torn_bytes or self.corrupt_lines):
            return None
        torn = f" and cut a torn last line ({self.torn_bytes} bytes)" if self.torn_bytes else ""
        return (f"cache {self.path}: skipped {self.corrupt_lines} unusable line(s) (not JSON, or not a "
                f"{{key, value}} response of the right shape and types){torn}; those requests will be asked again")

    async def mark_sent(self, key: str) -> None:
        """Durably note that `key` is about to be sent (an intent line), before sending it."""
        if key in self._sent:
            return
        self._sent.add(key)
        line = json.dumps({"key": key, "sent": True}, separators=(",", ":"))
        await self._append(line.encode("utf-8") + b"\n", None, None)

    async def mark_settled(self, key: str) -> None:
        """Note that a sent request failed for good (an error answer, not a lost one), so a
        later run does not count it as re-paid."""
        if key not in self._sent:
            return
        self._sent.discard(key)
        line = json.dumps({"key": key, "sent": False}, separators=(",", ":"))
        await self._append(line.encode("utf-8") + b"\n", None, None)

    async def put(self, key: str, value: dict[str, Any]) -> None:
        """Append a response and return only once it is fsynced (group commit)."""
        line = json.dumps({"key": key, "value": value}, ensure_ascii=False, separators=(",", ":"))
        await self._append(line.encode("utf-8") + b"\n", key, value)

    async def _append(self, blob: bytes, key: str | None, value: dict[str, Any] | None) -> None:
        """Queue a line for the group commit and wait until it is fsynced."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((key, value, blob, future))
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
                if key is not None:
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


def record_kind(record: Any) -> str | None:
    """"response" for {"key": str, "value": {content: str, tokens: int, finish_reason: str|None}},
    "sent" for an intent line {"key": str, "sent": true}, "settled" for {"key": str, "sent": false}
    (that request failed for good), None for anything else."""
    if not isinstance(record, dict) or not isinstance(record.get("key"), str) or not record["key"]:
        return None
    if isinstance(record.get("sent"), bool) and "value" not in record:
        return "sent" if record["sent"] else "settled"
    value = record.get("value")
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        return None
    for name in ("input_tokens", "output_tokens"):
        count = value.get(name, 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return None
    if not isinstance(value.get("finish_reason"), str | None):
        return None
    return "response"
