"""scripts/store_demo_evidence.py: a real demo's test-set evidence, stored with the machine facts
the run itself recorded (never a CPU typed by hand), or refused in one line before anything is
written."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from scripts.store_demo_evidence import SCORE_COLUMNS, EvidenceError, store

FINALIST = "lora-fp32-r32-lr0.0003-n150"
NUMERICS = {"torch": "2.13.0+cpu", "torch_threads": 2, "cpu": "AMD EPYC", "cpu_avx512_bf16": False,
            "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.fixture
def workspace(tmp_path):
    """A git checkout with what a finished demo leaves in reports/heldout and metrics/."""
    root = tmp_path / "demo"
    heldout = root / "reports/heldout"
    heldout.mkdir(parents=True)
    (root / "metrics").mkdir()
    for offset, model in enumerate(("base", FINALIST)):
        frame = pd.DataFrame({"id": ["t-1", "t-2"], "question": ["q1", "q2"], "answer": ["a1", "a2"],
                              "on_style": [True, bool(offset)], "similarity": [0.5, 0.123456789],
                              "content_similarity": [0.7, 0.6], "repetition_rate": [0.0, 0.01], "stopped": [True, True]})
        frame.to_parquet(heldout / f"{model}.parquet")
        (heldout / f"{model}.json").write_text(json.dumps({"model": model, "numerics": NUMERICS}))
    (heldout / "decision.json").write_text(json.dumps({"finalist": FINALIST, "finalist_reason": "the only one",
                                                       "n_test": 2, "test_md5": "abc"}))
    (root / "metrics/promotion.json").write_text(json.dumps({"decision": 0, "n_test": 2}))
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "demo"]):
        subprocess.run(["git", "-C", str(root), *command], check=True)
    return root


def test_the_stored_record_carries_the_runs_own_machine_facts_and_scores(workspace, tmp_path):
    out = store(workspace, "epyc_fp32_avx2-test", out_root=tmp_path / "stored")
    record = json.loads((out / "decision.json").read_text())
    assert record["numerics"] == NUMERICS and "cpu" not in record
    assert record["kernel_path"] == "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2"
    assert record["finalist"] == FINALIST and record["promotion"] == {"decision": 0, "n_test": 2}
    assert len(record["commit"]) >= 7
    finalist = pd.read_csv(out / "finalist.csv", dtype={"id": str})
    assert list(finalist.columns) == SCORE_COLUMNS and finalist["similarity"].tolist() == [0.5, 0.12345679]
    assert pd.read_csv(out / "base.csv")["on_style"].tolist() == [True, False] and finalist["on_style"].all()


def test_differing_or_missing_machine_facts_and_an_existing_folder_are_refused_before_writing(workspace, tmp_path):
    stored = tmp_path / "stored"
    finalist_record = workspace / "reports/heldout" / f"{FINALIST}.json"
    finalist_record.write_text(json.dumps({"numerics": {**NUMERICS, "torch_threads": 4}}))
    with pytest.raises(EvidenceError, match="different machine facts \\(torch_threads\\)"):
        store(workspace, "x", out_root=stored)
    finalist_record.write_text(json.dumps({"model": FINALIST}))
    with pytest.raises(EvidenceError, match="no `numerics` record"):
        store(workspace, "x", out_root=stored)
    assert not stored.exists()
    finalist_record.write_text(json.dumps({"numerics": NUMERICS}))
    store(workspace, "x", out_root=stored)
    with pytest.raises(EvidenceError, match="exists: stored evidence is not overwritten"):
        store(workspace, "x", out_root=stored)
