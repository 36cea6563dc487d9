"""Every command the project tells a user to run exists.

A renamed stage or module leaves its old name behind in error messages and docs (after evaluate
was split into predict and score, promote's own error still said `dvc repro evaluate`). This
scans what users read for three kinds of command and checks each against the project itself:

- `dvc repro <stage> ...`: a stage of dvc.yaml; `<stage>@<key>` needs a matrix/foreach stage
  (the key itself is not checked: it depends on the params in force);
- `python -m <module>`: a module of this repository (a package needs `__main__.py`) or,
  for any other top-level name, one the venv can import;
- `make <target>`: a rule of the Makefile. Prose such as "make it simpler" is left alone: a
  `make` counts as a command in backticks, at the start of a line, or after `&&`, `;`, `|`, `$`;
- and `python bench/<script>.py`-style paths: the file exists.

Where: the string constants of the project's Python code (ast: messages, errors, docstrings),
README.md, docs/**/*.md, BENCHMARKS.md, the Makefile, dvc.yaml, MLproject, params.yaml,
profiles/*.yaml and .ci/run.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

PYTHON_DIRS = ("pipeline", "registry", "scripts", "bench")  # tests/ hold fixtures, not advice
TEXT_FILES = ("README.md", "BENCHMARKS.md", "Makefile", "dvc.yaml", "MLproject", "params.yaml", ".ci/run")
TEXT_GLOBS = ("docs/**/*.md", "profiles/*.yaml")
LOCAL_PACKAGES = ("pipeline", "registry", "scripts", "bench", "tests")

# `dvc repro` and what follows on the same line, up to a character that ends a command.
DVC_REPRO = re.compile(r"\bdvc repro\b([^`\n#;&|)\"'\]]*)")
STAGE_TOKEN = re.compile(r"^[A-Za-z_][\w.@:/-]*$")
PYTHON_M = re.compile(r"(?:\bpython[\d.]*|\$\(PY\)|\$PY)\s+-m\s+([A-Za-z_][\w.]*)")
PYTHON_SCRIPT = re.compile(r"\bpython[\d.]*\s+((?:bench|scripts|tests|pipeline|registry)/[\w/.-]+\.py)\b")
MAKE = re.compile(r"(?:^|`|&&|\|\||;|\||\$)[ \t]*make[ \t]+([A-Za-z][\w-]*)", re.MULTILINE)


@dataclass(frozen=True)
class Finding:
    where: str
    command: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: `{self.command}`: {self.problem}"


# ------------------------------------------------------------------------------- the project
@functools.cache
def dvc_stages() -> tuple[frozenset[str], frozenset[str]]:
    """(every stage name, the matrix/foreach stages whose `name@key` instances exist)."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    grouped = {name for name, spec in stages.items() if "matrix" in spec or "foreach" in spec}
    return frozenset(stages), frozenset(grouped)


@functools.cache
def make_targets() -> frozenset[str]:
    targets = set()
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.%-][A-Za-z0-9_.%\s-]*?)\s*:(?![=:])", line)
        if match and not line.startswith((".", "\t")):
            targets.update(match.group(1).split())
    return frozenset(targets)


def phony_targets() -> list[str]:
    names = []
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        if line.startswith(".PHONY:"):
            names += line.split(":", 1)[1].split()
    return names


def module_problem(module: str) -> str | None:
    parts = module.rstrip(".").split(".")
    if parts[0] in LOCAL_PACKAGES:
        base = REPO_ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file():
            return None
        if (base / "__main__.py").is_file():
            return None
        if base.is_dir():
            return f"package {'.'.join(parts)} has no __main__.py"
        return f"no module {'.'.join(parts)} in the repository"
    if importlib.util.find_spec(parts[0]) is None:
        return f"no module {parts[0]} importable in the venv"
    return None


# ------------------------------------------------------------------------------- the checks
def find_problems(text: str, where: str) -> list[Finding]:
    stages, grouped = dvc_stages()
    targets = make_targets()
    findings = []
    for match in DVC_REPRO.finditer(text):
        command = match.group(0).rstrip(" .,:")
        for token in match.group(1).split():
            if token.startswith("-") or "=" in token:
                continue
            token = token.rstrip(".,:")
            if not STAGE_TOKEN.match(token):
                break
            stage = token.removeprefix("dvc.yaml:")
            name, at, _key = stage.partition("@")
            if at and name not in grouped:
                findings.append(Finding(where, command, f"{name} is not a matrix/foreach stage of dvc.yaml"))
            elif not at and name not in stages:
                findings.append(Finding(where, command, f"no stage {name!r} in dvc.yaml"))
    for match in PYTHON_M.finditer(text):
        problem = module_problem(match.group(1))
        if problem:
            findings.append(Finding(where, match.group(0), problem))
    for match in PYTHON_SCRIPT.finditer(text):
        if not (REPO_ROOT / match.group(1)).is_file():
            findings.append(Finding(where, match.group(0), f"no file {match.group(1)}"))
    for match in MAKE.finditer(text):
        if match.group(1) not in targets:
            findings.append(Finding(where, match.group(0).strip(" `&|;$"), f"no target {match.group(1)!r} in the Makefile"))
    return findings


def python_strings(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    strings = []
    in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstrings:
            strings.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):  # f-strings: their literal parts, joined
            literal = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            strings.append((node.lineno, literal))
    return strings


def python_files() -> list[Path]:
    this = Path(__file__).resolve()
    return [path for folder in PYTHON_DIRS for path in sorted((REPO_ROOT / folder).rglob("*.py"))
            if path.resolve() != this and ".venv" not in path.parts]


def text_files() -> list[Path]:
    paths = [REPO_ROOT / name for name in TEXT_FILES if (REPO_ROOT / name).is_file()]
    for pattern in TEXT_GLOBS:
        paths += sorted(REPO_ROOT.glob(pattern))
    return paths


# ------------------------------------------------------------------------------- the tests
def test_the_checker_catches_stale_commands():
    """The scanner itself: the stale names this test was written for are reported."""
    stale = ("run `dvc repro evaluate` first", "python -m pipeline.evaluate --limit 3",
             "then `make clean-outputs`", "dvc repro split nosuchstage", "dvc repro source@x",
             "python -m pipeline.openai.nosuch", "python bench/nosuch.py")
    for text in stale:
        assert find_problems(text, "example"), text
    fine = ("run `dvc repro predict` first", "dvc repro train@bf16-32-0.0003-150",
            "dvc repro split base_model   # the grid's inputs", "python -m registry summary",
            "python -m pipeline.openai --collect", ".venv/bin/python -m pytest tests -q",
            "make setup ALLOW_CUDA=1 && make gpu-check", "the loss, make it simpler",
            "(run dvc repro, or dvc add it)", "python bench/gpu_check.py --tiny")
    for text in fine:
        assert find_problems(text, "example") == [], text


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_commands_in_python_strings_exist(path):
    findings = [finding for lineno, text in python_strings(path)
                for finding in find_problems(text, f"{path.relative_to(REPO_ROOT)}:{lineno}")]
    assert not findings, "\n".join(map(str, findings))


@pytest.mark.parametrize("path", text_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_commands_in_docs_and_config_exist(path):
    text = path.read_text()
    findings = []
    for finding in find_problems(text, str(path.relative_to(REPO_ROOT))):
        offset = text.find(finding.command)
        line = text.count("\n", 0, offset) + 1 if offset >= 0 else "?"
        findings.append(Finding(f"{finding.where}:{line}", finding.command, finding.problem))
    assert not findings, "\n".join(map(str, findings))


def test_every_phony_target_has_a_rule():
    targets = make_targets()
    assert [name for name in phony_targets() if name not in targets] == []


def test_the_readme_commands_are_checked():
    """README.md is scanned and holds the two commands of the quick start."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert MAKE.search(readme) and "make demo" in readme and "make test" in readme
