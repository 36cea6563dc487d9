"""Profiles compose: `python -m pipeline.core.config apply <name>` deep-merges profiles/<name>.yaml
over the demo params.yaml, and real DVC accepts the result for every stage.

DVC refuses a stage that declares a param the params file lacks (MissingParamsError) only when
it reaches that stage, after the earlier (paid) stages ran; `dvc status` does not say so (it
reports params as "new" while there is no dvc.lock). The check DVC itself makes is
`ParamsDependency.get_hash()` (what `dvc repro`/`dvc commit` call to record a stage's params),
so the test calls it for every param dependency of every stage, in a temporary git repository
holding dvc.yaml, the code and the composed params.yaml; then it runs `dvc repro --dry` there
over placeholder data deps (a dry run hashes deps, so missing data would stop it at the first
stage that needs some) and expects every stage to be walked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import APPLIED_PROFILE_MARKER, deep_merge, load_config
from tests.conftest import REPO_ROOT

PROFILES = sorted(path.stem for path in (REPO_ROOT / "profiles").glob("*.yaml"))


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("TONETUNE_PARAMS", None)
    return env


def apply(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.core.config", "apply", *args],
        cwd=project, env=_env(), capture_output=True, text=True, timeout=120,
    )


def make_project(tmp_path: Path) -> Path:
    """A git repository with what DVC reads: dvc.yaml, the demo params, profiles and the code."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(REPO_ROOT / name, project / name)
    for name in ("profiles", "pipeline", "registry"):
        shutil.copytree(REPO_ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, env=_env(), check=True)
    return project


def dvc_param_problems(project: Path) -> tuple[list[str], dict[str, str]]:
    """Every stage DVC resolves from dvc.yaml + params.yaml, and the MissingParamsError message
    of each stage whose declared params the file lacks."""
    from dvc.dependency.param import MissingParamsError, ParamsDependency
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        stages = list(repo.index.stages)
        problems = {}
        for stage in stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    try:
                        dep.get_hash()
                    except MissingParamsError as error:
                        problems[stage.name] = str(error)
        return [stage.name for stage in stages], problems


def placeholder_data_deps(project: Path) -> int:
    """A stand-in file (or folder) for every data dep no stage has produced yet, so that
    `dvc repro --dry`, which hashes deps, gets past the first stage that needs data."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    made = 0
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                path = Path(dep.fs_path)
                if isinstance(dep, ParamsDependency) or path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")
                made += 1
    return made


def dvc_repro_dry(project: Path) -> subprocess.CompletedProcess:
    subprocess.run(["git", "add", "-A"], cwd=project, check=True, capture_output=True)
    return subprocess.run([sys.executable, "-m", "dvc", "repro", "--dry"], cwd=project, env=_env(),
                          capture_output=True, text=True, timeout=600)


def grid_size(params: dict) -> int:
    grid = params["train"]["grid"]
    return len(grid["precision"]) * len(grid["lora_r"]) * len(grid["learning_rate"]) * len(grid["n_train"])


def test_there_is_a_paper_profile():
    assert "paper" in PROFILES


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_is_an_overlay(profile):
    """A profile lists only what differs from the demo (a key equal to the demo is noise that
    hides the real differences and goes stale when the demo changes)."""
    demo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    overlay = yaml.safe_load((REPO_ROOT / "profiles" / f"{profile}.yaml").read_text())

    def same(node, base, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                yield from same(value, base[key], f"{prefix}{key}.")
            elif key in base and base[key] == value:
                yield f"{prefix}{key}"

    assert list(same(overlay, demo)) == []


@pytest.mark.parametrize("profile", PROFILES)
def test_applied_profile_is_accepted_by_dvc_for_every_stage(profile, tmp_path):
    project = make_project(tmp_path)
    demo = yaml.safe_load((project / "params.yaml").read_text())

    checked = apply(project, profile, "--check")
    assert checked.returncode == 0, checked.stderr
    assert (project / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()

    applied = apply(project, profile)
    assert applied.returncode == 0, applied.stderr
    text = (project / "params.yaml").read_text()
    assert text.startswith(f"{APPLIED_PROFILE_MARKER}{profile} ")
    composed = yaml.safe_load(text)
    overlay = yaml.safe_load((project / "profiles" / f"{profile}.yaml").read_text())
    assert composed == deep_merge(demo, overlay)
    load_config(project / "params.yaml")  # validates with pipeline.core.config

    stages, problems = dvc_param_problems(project)
    assert problems == {}
    n_train_stages = sum(name.startswith("train@") for name in stages)
    assert n_train_stages == grid_size(composed)
    assert {"validate", "split", "predict", "score", "report", "promote", "judge", "alignment"} <= set(stages)

    # The same through DVC's command line: `dvc repro --dry` walks every stage (data deps are
    # placeholders; nothing runs) without MissingParamsError.
    assert placeholder_data_deps(project) > 0
    dry = dvc_repro_dry(project)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert dry.stdout.count("Running stage") == len(stages)

    # Applying again over a composed file would compose a profile over a profile: refused.
    again = apply(project, profile)
    assert again.returncode == 2
    assert again.stderr.startswith("error: params.yaml already holds profile") and again.stderr.count("\n") == 1


def test_paper_profile_is_the_72_point_grid(tmp_path):
    project = make_project(tmp_path)
    assert apply(project, "paper").returncode == 0
    config = load_config(project / "params.yaml")
    assert grid_size(config.model_dump()) == 72
    assert config.train.target_modules == ["q_proj", "k_proj", "v_proj"]  # kept from the demo
    assert config.promote.registered_model_name  # a section the profile does not list


def test_dvc_check_detects_a_param_the_file_lacks(tmp_path):
    """The check above can fail: a params file without a section and a key that stages declare
    (what `cp profiles/paper.yaml params.yaml`, the old README advice, produced) is refused."""
    project = make_project(tmp_path)
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["validate"], params["train"]["sampling"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages, problems = dvc_param_problems(project)
    assert "Parameters 'validate' are missing" in problems["validate"]
    train_stages = [name for name in stages if name.startswith("train@")]
    assert train_stages and all("train.sampling" in problems[name] for name in train_stages)
    assert "split" not in problems
    placeholder_data_deps(project)
    dry = dvc_repro_dry(project)
    assert dry.returncode != 0 and "Parameters 'validate' are missing from 'params.yaml'" in dry.stderr
    # ... and `apply --check` refuses such a base without touching anything.
    (project / "params.yaml").write_text("source:\n  min_chars: 700\n")
    result = apply(project, "paper", "--check")
    assert result.returncode == 2
    assert "dvc.yaml declares params the result lacks" in result.stderr
    assert "validate: validate" in result.stderr


@pytest.mark.parametrize(
    ("overlay", "fragment"),
    [("train:\n  epochz: 5\n", "unknown key 'train.epochz'"), ("- a\n", "expected a mapping")],
)
def test_bad_profile_fails_in_one_line_and_writes_nothing(tmp_path, overlay, fragment):
    project = make_project(tmp_path)
    (project / "profiles" / "broken.yaml").write_text(overlay)
    before = (project / "params.yaml").read_text()
    result = apply(project, "broken")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert (project / "params.yaml").read_text() == before


def test_unknown_profile_names_the_known_ones(tmp_path):
    result = apply(REPO_ROOT, "papr", "--check")
    assert result.returncode == 2
    assert "profiles/papr.yaml: no such profile" in result.stderr and "paper" in result.stderr
