"""`source.corpus: files`: a folder of Markdown, HTML and text split into sections by a parser
(markdown-it-py, the standard library's html.parser), the same cleaning as Wikipedia, and lineage
that covers the files."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from pipeline import source
from pipeline.core.config import SourceConfig, parse_config
from pipeline.core.errors import TonetuneError
from tests.conftest import REPO_ROOT

LONG = "Every sentence here is padding that makes the section long enough to keep. " * 6


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text(
        f"Intro before any heading. {LONG}\n\n# Reset your password\n\nOpen **Settings** and pick "
        f"[reset](https://x.invalid). {LONG}\n\n- first step\n- second step\n\n## Short\n\nToo short.\n\n"
        f"## Code\n\n```\nnotes --reset\n```\n\n{LONG}\n")
    (folder / "page.html").write_text(
        f"<html><head><style>p {{color: red}}</style></head><body><nav>Menu</nav><h1>Sharing &amp; links</h1>"
        f"<p>Share a note. {LONG}</p><script>var x = 1;</script><h2>Permissions</h2><p>{LONG}</p></body></html>")
    (folder / "plain.txt").write_text(f"A plain text file. {LONG}")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "nested.md").write_text(f"# Nested\n\n{LONG}")
    (folder / ".hidden.md").write_text(f"# Hidden\n\n{LONG}")


def test_markdown_is_split_at_headings_into_plain_text():
    sections = source.markdown_sections(
        "Lead text.\n\n# One\n\nSome **bold** and `code`\nover two lines.\n\n- a\n- b\n\n## Two\n\n```\nx = 1\n```\n", "doc")
    assert sections == [("doc", "Lead text."), ("One", "Some bold and code over two lines.\n\na\n\nb"),
                        ("Two", "x = 1")]


def test_html_is_split_at_headings_and_skips_scripts_and_navigation():
    sections = source.html_sections(
        "<nav>Home</nav><h1>Title &amp; more</h1><p>One  <b>two</b>\nthree.</p><script>no()</script>"
        "<h2>Next</h2><ul><li>a</li><li>b</li></ul><footer>foot</footer>", "page")
    assert sections == [("page", ""), ("Title & more", "One two three."), ("Next", "a\n\nb")]


def test_files_corpus_keeps_long_sections_with_their_file(tmp_path):
    folder = tmp_path / "docs"
    write_corpus(folder)
    config = SourceConfig(corpus="files", files_dir=str(folder), min_chars=300)
    raw = source.load_raw_corpus(config)
    sections = source.clean_sections(raw, config.min_chars, config.seed)
    by_title = dict(zip(sections["title"], sections["source_path"], strict=True))
    assert by_title == {"guide": "guide.md", "Reset your password": "guide.md", "Code": "guide.md",
                        "Sharing & links": "page.html", "Permissions": "page.html", "plain": "plain.txt"}
    # "Short" is under min_chars; "*" does not look into sub/; hidden files are left out
    reset = sections.set_index("title").loc["Reset your password", "text"]
    assert reset.startswith("Open Settings and pick reset.") and "**" not in reset and "first step" in reset
    assert all(len(text) >= 300 for text in sections["text"])


def test_the_pattern_selects_files_inside_the_folder(tmp_path):
    folder = tmp_path / "docs"
    write_corpus(folder)
    config = SourceConfig(corpus="files", files_dir=str(folder), files_pattern="**/*.md", min_chars=300)
    assert set(source.load_raw_corpus(config)["source_path"]) == {"guide.md", "sub/nested.md"}


def test_corpus_version_changes_with_any_file(tmp_path):
    from pipeline.core.assets import corpus_version

    folder = tmp_path / "docs"
    write_corpus(folder)
    config = SourceConfig(corpus="files", files_dir=str(folder), min_chars=300)
    before = corpus_version(config)
    assert before.startswith(f"files:{folder} pattern=* 3 files sha256:")
    (folder / "plain.txt").write_text("changed")
    assert corpus_version(config) != before


@pytest.mark.parametrize(("overrides", "message"), [
    ({"corpus": "files", "files_dir": " "}, "source.files_dir must name a folder"),
])
def test_a_files_corpus_needs_a_folder(overrides, message):
    with pytest.raises(Exception, match=message):
        parse_config({"source": overrides})


def test_missing_folder_or_no_matching_file_is_one_line(tmp_path):
    with pytest.raises(TonetuneError, match="not a folder"):
        source.load_raw_corpus(SourceConfig(corpus="files", files_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TonetuneError, match=r"no file matches '\*\.md'"):
        source.load_raw_corpus(SourceConfig(corpus="files", files_dir=str(tmp_path / "empty"), files_pattern="*.md"))


def test_the_source_stage_depends_on_the_folder():
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["source"]
    assert "${source.files_dir}" in stage["deps"]
    assert (REPO_ROOT / parse_config(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())).source.files_dir).is_dir()


def test_stage_writes_sections_with_their_files(tmp_path, write_params):
    folder = tmp_path / "docs"
    write_corpus(folder)
    write_params({"source": {"corpus": "files", "files_dir": str(folder), "files_pattern": "*", "min_chars": 300}})
    output = tmp_path / "sections.parquet"
    done = subprocess.run([sys.executable, "-m", "pipeline.source", "--output", str(output)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frame = pd.read_parquet(output)
    assert list(frame.columns) == ["id", "title", "text", "source_path"] and len(frame) == 6
    assert "files:" in done.stdout and "sha256:" in done.stdout
