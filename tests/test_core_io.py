"""pipeline.core.io: atomic replacement and durable appends (real files, no mocks)."""

from __future__ import annotations

import json

from pipeline.core.io import atomic_write_bytes, atomic_write_text, durable_append_line, repair_torn_tail


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "out.json"
    atomic_write_text(path, "first\n")
    atomic_write_bytes(path, b"second\n")
    assert path.read_bytes() == b"second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_durable_append_cuts_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    durable_append_line(path, json.dumps({"n": 1}))
    with open(path, "ab") as handle:
        handle.write(b'{"n": 2, "half')  # a crash mid-append
    durable_append_line(path, json.dumps({"n": 3}))
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 3]
    assert repair_torn_tail(path) == 0 and repair_torn_tail(tmp_path / "missing") == 0
