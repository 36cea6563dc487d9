"""`dvc exp show --csv` leads with the headline metrics (per model: % conversational, similarity),
checked with the real dvc in a scratch git repo holding the repo's dvc.yaml and params.yaml."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.headline import HEADLINE_KEYS, headline, main
from tests.conftest import REPO_ROOT

DVC = Path(sys.executable).with_name("dvc")
RECORDS = [
    {"model": "lora-bf16-r32-lr0.0003-n150", "kind": "lora", "pct_conversational": 81.0, "similarity_mean": 0.572,
     "flesch_mean": 70.1, "n_eval": 100},
    {"model": "base", "kind": "base", "pct_conversational": 28.0, "similarity_mean": 0.591, "flesch_mean": 45.2,
     "n_eval": 100},
]


def test_headline_keeps_two_numbers_per_model_base_first(tmp_path):
    assert headline(RECORDS) == {"base": {"pct_conversational": 28.0, "similarity_mean": 0.591},
                                 "lora-bf16-r32-lr0.0003-n150": {"pct_conversational": 81.0, "similarity_mean": 0.572}}
    for record in RECORDS:
        (tmp_path / "eval").mkdir(exist_ok=True)
        (tmp_path / "eval" / f"{record['model']}.json").write_text(json.dumps(record))
    main(["--eval-dir", str(tmp_path / "eval"), "--output", str(tmp_path / "headline.json")])
    assert json.loads((tmp_path / "headline.json").read_text()) == headline(RECORDS)
    with pytest.raises(SystemExit):
        main(["--eval-dir", str(tmp_path / "nothing"), "--output", str(tmp_path / "x.json")])


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_dvc_exp_show_leads_with_the_headline_columns(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    git(repo, "init", "-q")
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True, capture_output=True)
    metrics = repo / "metrics"
    # What the pipeline leaves: the data-quality and split counters, one record per model, the
    # summaries of the optional stages, and the headline.
    for name, record in {"data_quality.json": {"success": True, "rows": 150, "checks_passed": 9},
                         "splits.json": {"train_largest_rows": 150}}.items():
        (metrics / name).parent.mkdir(parents=True, exist_ok=True)
        (metrics / name).write_text(json.dumps(record))
    for record in RECORDS:
        (metrics / "eval").mkdir(exist_ok=True)
        (metrics / "eval" / f"{record['model']}.json").write_text(json.dumps(record))
    for optional in ("openai", "judge", "alignment"):
        (metrics / optional).mkdir()
        (metrics / optional / "summary.yaml").write_text('{"enabled": false, "models": 0}\n')
    (metrics / "headline.json").write_text(json.dumps(headline(RECORDS)))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "metrics")

    shown = subprocess.run([str(DVC), "exp", "show", "--csv", "--no-pager"], cwd=repo, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    header = next(csv.reader(io.StringIO(shown.stdout)))
    first = header.index("parent") + 1  # Experiment, rev, typ, Created, parent, then the metrics
    expected = [f"{model}.{key}" for model in headline(RECORDS) for key in HEADLINE_KEYS]
    assert header[first:first + len(expected)] == expected, header[:first + 8]
    assert header.index("success") >= first + len(expected)  # the data-quality counters come after
