"""Files in and out of the generate stage: sections to read; pairs, ledger and manifest to write.

Every output is written atomically (a temporary file in the same folder, fsynced, then
renamed over the target), so a crash leaves either the previous version or the new one, never
half a file that DVC would happily hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import TonetuneError
from pipeline.core.io import atomic_write_text, atomic_write_with
from pipeline.core.tables import read_table
from pipeline.generate.engine import Candidate, Section

if TYPE_CHECKING:
    import pandas as pd

SECTION_COLUMNS = ("id", "title", "text")
PAIR_COLUMNS = ("id", "source_id", "title", "question", "answer", "factual_answer", "flesch", "faithfulness",
                "attempts", "nearest_similarity", "position")


def read_sections(path: Path) -> list[Section]:
    """Sections in generation order; a missing, malformed or empty file is a one-line error."""

    if not path.exists():
        raise TonetuneError(f"sections file not found: {path} (run the source stage first: `dvc repro source`)")
    frame = read_table(path, SECTION_COLUMNS)
    frame = frame[frame["text"].fillna("").astype(str).str.strip() != ""]
    if frame.empty:
        raise TonetuneError(f"{path}: no sections to generate from (the source is empty)")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise TonetuneError(f"{path}: duplicate section id {duplicated.iloc[0]!r}")
    return [
        Section(position, str(row.id), str(row.title), str(row.text))
        for position, row in enumerate(frame.itertuples(index=False))
    ]


def pairs_frame(pairs: list[Candidate]) -> pd.DataFrame:
    """The accepted pairs as a table with fixed columns and types (also when empty)."""
    import pandas as pd

    frame = pd.DataFrame([pair.pair_record() for pair in pairs], columns=list(PAIR_COLUMNS))
    return frame.astype({"flesch": "float64", "faithfulness": "float64", "nearest_similarity": "float64",
                         "attempts": "int64", "position": "int64"})


def write_pairs(pairs: list[Candidate], path: Path) -> None:
    frame = pairs_frame(pairs)
    atomic_write_with(path, lambda temporary: frame.to_parquet(temporary, index=False))


def write_ledger(ledger: list[Candidate], path: Path) -> None:
    lines = "".join(json.dumps(c.ledger_record(), ensure_ascii=False) + "\n" for c in ledger)
    atomic_write_text(path, lines)


def write_manifest(manifest: dict[str, Any], path: Path) -> None:
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)
