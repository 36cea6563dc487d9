"""The documentation builds and its links resolve.

- docs/ builds with `mkdocs build --strict` (what `make docs` runs): mkdocs.yml turns every
  link problem into a warning (a missing page, a link out of docs/, a missing anchor) and
  --strict fails the build on any warning;
- every relative link in README.md (GitHub renders it, MkDocs never sees it) points at a file
  that exists and, with `#anchor`, at a heading of that file.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose(markdown: str) -> str:
    """The text outside code: fenced and indented blocks and code spans removed."""
    markdown = FENCE.sub("", markdown)
    markdown = "\n".join(line for line in markdown.splitlines() if not line.startswith("    "))
    return CODE_SPAN.sub("", markdown)


def anchors(path: Path) -> set[str]:
    return {github_slug(heading) for heading in HEADING.findall(FENCE.sub("", path.read_text()))}


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading #{anchor} in {file_part}")
    return problems


def test_the_docs_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO_ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_relative_link_in_the_readme_resolves():
    assert broken_links(REPO_ROOT / "README.md") == []


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## A section, with `code`\n")
    page.write_text("# Page\n\n[ok](other.md#a-section-with-code) [self](#page) [web](https://example.org)\n"
                    "`[in code](nowhere.md)`\n\n    [indented code](nowhere.md)\n\n"
                    "[gone](missing.md) [bad anchor](other.md#nope)\n")
    assert broken_links(page) == ["missing.md: no such file", "other.md#nope: no heading #nope in other.md"]
