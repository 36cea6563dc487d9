"""Dependency floors (pyproject.toml) and the GPU install (`make setup ALLOW_CUDA=1`), as far as
a CPU machine without the internet can check them.

- every floor is met by the exact pin in requirements.lock, and pip's own resolver accepts the
  floors against this (locked) environment without reaching an index;
- the floors the code needs are there (transformers 5.23: `activation_checkpointing=`;
  bitsandbytes 0.45: 8-bit on Hopper);
- `make setup` refuses CUDA packages on a CPU install and accepts them with ALLOW_CUDA=1, and then
  does not point pip at the local CPU torch wheel. The recipe runs for real, with a stand-in
  `python` that records its arguments and reports installed nvidia-* packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO_ROOT


def floors() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def locked() -> dict[str, Version]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[")[0])] = Version(version.split(";")[0].strip())
    return pins


def test_every_floor_is_met_by_the_lock():
    pins = locked()
    problems = []
    for requirement in floors():
        pin = pins.get(canonical(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name}: not in requirements.lock")
        elif not requirement.specifier.contains(pin, prereleases=True):
            problems.append(f"{requirement}: lock has {pin}")
    assert problems == []


def test_the_floors_the_code_needs():
    by_name = {canonical(r.name): r.specifier for r in floors()}
    # pipeline.train passes activation_checkpointing= to SFTConfig: new in transformers 5.23.0.
    assert not by_name["transformers"].contains("5.22.0") and by_name["transformers"].contains("5.23.0")
    assert not by_name["bitsandbytes"].contains("0.44.1") and by_name["bitsandbytes"].contains("0.45.0")
    for name in ("torch", "trl", "peft", "mlflow", "dvc", "great-expectations", "pydantic"):
        assert any(spec.operator == ">=" for spec in by_name[name]), f"{name} has no floor"


def test_pips_resolver_accepts_the_floors(tmp_path):
    """`pip install --dry-run --no-index`: pip resolves every floor (and what the packages
    themselves require) against what is installed, offline; a floor above the installed pin
    or a conflict between floors fails here."""
    requirements = tmp_path / "floors.txt"
    requirements.write_text("\n".join(str(r) for r in floors()) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--disable-pip-version-check",
         "-r", str(requirements)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install" not in result.stdout, result.stdout  # all satisfied by the locked env


FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "{log}"
case "$*" in
  *"pip list"*) echo "torch 2.13.0"; echo "nvidia-cublas-cu12 12.8.4.1" ;;
esac
exit 0
"""


@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose `python` only logs its arguments and says nvidia-* packages are installed."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "python.log"
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON.format(log=log))
    python.chmod(0o755)
    (tmp_path / "wheels").mkdir()
    return venv, log


def make_setup(venv: Path, allow_cuda: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MAKE")}
    return subprocess.run(
        ["make", "--no-print-directory", "setup", f"VENV={venv}", f"ALLOW_CUDA={allow_cuda}",
         f"WHEELS_DIR={venv.parent / 'wheels'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cpu_setup_refuses_cuda_packages(fake_venv):
    venv, log = fake_venv
    result = make_setup(venv, "0")
    assert result.returncode != 0
    assert "error: CUDA packages (nvidia-*) were installed" in result.stderr
    assert "--find-links" in log.read_text()  # the local CPU torch wheel is offered to pip
    assert not (venv / ".tonetune-installed").exists()


def test_gpu_setup_accepts_cuda_packages(fake_venv):
    venv, log = fake_venv
    result = make_setup(venv, "1")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = log.read_text()
    assert "-m pip install --quiet -r requirements.lock" in calls
    assert "--find-links" not in calls  # the CPU wheel would win over PyPI's CUDA build
    assert "-m pipeline.core.assets" in calls
    assert (venv / ".tonetune-installed").exists()
