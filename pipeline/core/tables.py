"""Reading and writing the pipeline's parquet tables with one-line errors and atomic writes.

Every stage reads a table another stage wrote; a missing file, a file pyarrow cannot parse or a
missing column must fail with one line naming the file (before any model loads), and a write
must never leave half a file behind after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import TonetuneError

if TYPE_CHECKING:
    import pandas as pd


def read_table(path: str | Path, required_columns: Iterable[str], missing_file_hint: str = "") -> pd.DataFrame:
    """Read a parquet table and check it has `required_columns`; any problem is a one-line
    TonetuneError naming the file (`missing_file_hint` says which stage makes it)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise TonetuneError(f"{path} not found" + (f": {missing_file_hint}" if missing_file_hint else ""))
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise TonetuneError(f"{path}: cannot read parquet: {' '.join(str(error).split())[:200]}") from None
    missing = [column for column in required_columns if column not in frame.columns]
    if missing:
        raise TonetuneError(f"{path}: missing column(s) {missing}; it has {list(frame.columns)}")
    return frame


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a parquet table atomically (temp file + rename), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(temporary, index=False)
    temporary.replace(path)
