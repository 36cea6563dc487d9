"""The layer rule, checked: `pipeline.core` imports no stage and nothing from `registry`; every
stage (a module or package directly under `pipeline/`) and `registry` import only the core.

import-linter does the checking (contracts in pyproject.toml, also run by `make lint`); this
test runs it and also fails when a new stage is missing from the contract, since a module the
contract does not name is not checked at all.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO_ROOT


def stage_modules() -> set[str]:
    """Every module or package directly under pipeline/, except the core."""
    found = set()
    for path in (REPO_ROOT / "pipeline").iterdir():
        if path.name.startswith(("_", ".")) or path.name == "core":
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            found.add(f"pipeline.{path.stem}")
    return found


def layer_contract() -> dict:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract


def test_every_stage_and_the_registry_are_in_the_layer_contract():
    upper, lower = layer_contract()["layers"]
    named = {name.strip() for name in upper.split("|")}
    assert lower.strip() == "pipeline.core"
    assert named == stage_modules() | {"registry"}, (
        f"pyproject.toml [tool.importlinter] layers must list exactly the stages and registry; "
        f"missing {sorted(stage_modules() | {'registry'} - named)}, stale {sorted(named - stage_modules() - {'registry'})}"
    )


def test_import_contracts_hold():
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter), "--config", "pyproject.toml", "--no-cache"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 1 kept, 0 broken." in result.stdout
