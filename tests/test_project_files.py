"""The project's own files agree with each other: dvc.yaml and params.yaml.

DVC refuses to run a stage that declares a param params.yaml lacks, and only says so when it
reaches that stage (in the demo: after ten minutes of data generation), so check it here.
"""

from __future__ import annotations

import yaml

from tests.conftest import REPO_ROOT


def _has_key(mapping: dict, dotted: str) -> bool:
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_param_a_stage_declares_is_in_params_yaml():
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    missing = [
        f"{stage}: {key}"
        for stage, definition in stages.items()
        for key in definition.get("params", [])
        if isinstance(key, str) and not _has_key(params, key)
    ]
    assert missing == []


# Profiles (profiles/*.yaml) composed over params.yaml and checked with real DVC: tests/test_profiles.py.


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in (REPO_ROOT / "README.md").read_text()
