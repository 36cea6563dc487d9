"""Which commit declared the promotion rule now in params.yaml.

A margin chosen after looking at test results is no margin. So the rule's values (params.yaml
`promote`: the margins, the level, the power target, the degeneration limits) must be committed
before any model answers a test question, and every decision records the commit that declared
them: the oldest commit of the newest unbroken run of commits whose params.yaml holds exactly the
current values. `declared_rule` returns None when the working tree's values are not the ones in
HEAD (an uncommitted change), and the heldout stage then refuses to predict on test.

Reads git only (`git log`, `git show`); no other I/O.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import params_path

DECLARED_KEYS = ("min_style_gain", "content_metric", "content_margin", "alpha", "power", "max_repetition_rate",
                 "min_stopped_pct")


@dataclass(frozen=True)
class Declaration:
    """The commit that declared the current rule, and its committer date (ISO 8601)."""

    commit: str
    date: str


def _git(args: list[str], repo: Path) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def declared_values(params_text: str | None) -> dict[str, Any] | None:
    """The rule's declared values in one params.yaml text (a missing key is None)."""
    if params_text is None:
        return None
    try:
        promote = (yaml.safe_load(params_text) or {}).get("promote") or {}
    except yaml.YAMLError:
        return None
    return {key: promote.get(key) for key in DECLARED_KEYS}


def declared_rule(current: Mapping[str, Any], repo: str | Path = ".", params: str | Path | None = None) -> Declaration | None:
    """The declaring commit of `current` (the rule's values as loaded now), or None when HEAD's
    params file (default: the one in use) does not hold them (uncommitted) or this is not a git
    repository."""
    repo = Path(repo).resolve()
    params = Path(params or params_path()).resolve()
    try:
        relative = "./" + params.relative_to(repo).as_posix()
    except ValueError:
        return None  # the params file is outside the repository: nothing declares it
    wanted = {key: current.get(key) for key in DECLARED_KEYS}
    log = _git(["log", "--first-parent", "--format=%H %cI", "--", relative], repo)
    if not log:
        return None
    declaring = None
    for line in log.splitlines():
        commit, date = line.split(" ", 1)
        if declared_values(_git(["show", f"{commit}:{relative}"], repo)) != wanted:
            break
        declaring = Declaration(commit, date)
    head_values = declared_values(_git(["show", f"HEAD:{relative}"], repo))
    if head_values != wanted:
        return None
    return declaring
