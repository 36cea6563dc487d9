"""The alignment-tax scorer: log-likelihood multiple choice, checked where the answer is known.

- By hand: the batched, padded scorer gives the log-likelihood computed one sequence at a time.
- A model that is uniform over the vocabulary (final norm zeroed: every logit 0) gives every
  token log-prob -log V exactly, so a choice's summed score is -n log V: the shortest choice
  always wins by sum, and every choice ties by per-token mean (the first is picked).
- The stage end to end on the tiny model + one adapter, from a local ARC-style dataset.
"""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest

from pipeline.alignment import Item, choice_logprobs, context_text, score_items

ITEMS = [
    Item("q1", "Which gas do plants take in?", ("carbon dioxide", "a kind of oxygen", "helium gas in large amounts"), 0),
    Item("q2", "What is frozen water called?", ("steam that rises from a kettle", "ice"), 1),
    Item("q3", "How many legs has a spider?", ("eight", "six legs and two antennae", "ten legs or more", "four legs"), 0),
]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_batched_scores_match_a_hand_computed_log_likelihood(tiny):
    import torch

    model, tokenizer = tiny
    scores = choice_logprobs(model, tokenizer, ITEMS, batch_size=3)  # batches mix items and lengths
    for item, choices in zip(ITEMS, scores, strict=True):
        context = tokenizer(context_text(item.question), add_special_tokens=False)["input_ids"]
        for choice, (total, count) in zip(item.choices, choices, strict=True):
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([context + continuation])).logits[0]
            logprobs = torch.log_softmax(logits, dim=-1)
            expected = sum(logprobs[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))
            assert count == len(continuation)
            assert total == pytest.approx(expected, abs=1e-4)


def test_a_uniform_model_picks_the_shortest_choice_by_sum_and_ties_by_mean(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # hidden state 0 -> every logit 0 -> uniform
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    scores = choice_logprobs(model, tokenizer, ITEMS, batch_size=4)
    vocab = model.config.vocab_size
    for choices in scores:
        for total, count in choices:
            assert total == pytest.approx(-count * math.log(vocab), rel=1e-6)
    frame, record = score_items(ITEMS, scores)
    lengths = [[count for _, count in choices] for choices in scores]
    shortest = [row.index(min(row)) for row in lengths]
    assert frame["predicted_sum"].tolist() == shortest
    assert shortest == [item.answer for item in ITEMS]  # the fixture's answers are the shortest
    assert record["accuracy_sum"] == 1.0
    assert frame["predicted_mean"].tolist() == [0, 0, 0]  # all tie: the first choice
    assert record["accuracy_mean"] == pytest.approx(2 / 3)


def test_stage_scores_base_and_adapter_from_a_local_dataset(tiny_llama_dir, tmp_path, monkeypatch, write_params,
                                                            mlflow_uri, capsys):
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.alignment import main

    monkeypatch.chdir(tmp_path)
    dataset_dir = tmp_path / "arc_local"
    dataset_dir.mkdir()
    pd.DataFrame({
        "id": [item.id for item in ITEMS], "question": [item.question for item in ITEMS],
        "choices": [{"text": list(item.choices), "label": [chr(65 + i) for i in range(len(item.choices))]} for item in ITEMS],
        "answerKey": [chr(65 + item.answer) for item in ITEMS],
    }).to_parquet(dataset_dir / "test.parquet")

    name = "lora-fp32-r4-lr0.001-n10"
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adapter_dir = tmp_path / "models" / "adapters" / name
    peft_model.save_pretrained(adapter_dir)
    mlflow.set_experiment("tonetune")
    with mlflow.start_run(run_name=name) as training_run:
        pass
    (adapter_dir / "tonetune_adapter.json").write_text(json.dumps({"mlflow_run_id": training_run.info.run_id}))
    (tmp_path / "models" / "adapters" / "lora-fp32-r8-lr0.001-n10").mkdir()  # not in the grid: skipped
    (tmp_path / "models" / "base").symlink_to(tiny_llama_dir)

    params = {"tracking": {"tracking_uri": mlflow_uri, "artifact_root": str(tmp_path / "mlartifacts")},
              "train": {"grid": {"precision": ["fp32"], "lora_r": [4], "learning_rate": [0.001], "n_train": [10]}}}
    write_params(params)
    main([])
    assert json.loads((tmp_path / "reports/alignment/status.json").read_text())["status"] == "not_run"
    assert [p.name for p in (tmp_path / "metrics/alignment").iterdir()] == ["summary.yaml"]  # never empty for DVC
    assert json.loads((tmp_path / "metrics/alignment/summary.yaml").read_text()) == {"enabled": False, "models": 0}

    write_params({**params, "alignment": {"enabled": True, "dataset": str(dataset_dir), "dataset_config": None,
                                          "split": "test", "limit": None, "score": "mean", "batch_size": 5}})
    main([])
    out = capsys.readouterr().out
    base_record = json.loads((tmp_path / "metrics/alignment/base.json").read_text())
    adapter_record = json.loads((tmp_path / f"metrics/alignment/{name}.json").read_text())
    assert sorted(p.name for p in (tmp_path / "metrics/alignment").iterdir()) == ["base.json", f"{name}.json", "summary.yaml"]
    assert json.loads((tmp_path / "metrics/alignment/summary.yaml").read_text()) == {"enabled": True, "models": 2}
    for record in (base_record, adapter_record):
        assert record["n_questions"] == len(ITEMS) and record["accuracy"] == record["accuracy_mean"]
    assert adapter_record["tax"] == pytest.approx(base_record["accuracy"] - adapter_record["accuracy"])
    assert "tax" not in base_record

    # the adapter really changed the scores (it was applied) and the base was restored after it
    base_table = pd.read_parquet(tmp_path / "reports/alignment/base.parquet")
    adapter_table = pd.read_parquet(tmp_path / f"reports/alignment/{name}.parquet")
    assert any(abs(a - b) > 1e-3 for x, y in zip(base_table["logprob_sum"], adapter_table["logprob_sum"], strict=True)
               for a, b in zip(x, y, strict=True))
    assert f"alignment: {name}: accuracy" in out

    metrics = mlflow.get_run(training_run.info.run_id).data.metrics
    assert metrics["alignment_accuracy"] == pytest.approx(adapter_record["accuracy"])
    stage_run = mlflow.search_runs(filter_string="tags.stage = 'alignment'")
    assert stage_run[f"metrics.{name}.tax"][0] == pytest.approx(adapter_record["tax"])


def test_unloadable_dataset_fails_in_one_line(tmp_path, monkeypatch, write_params):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    write_params({"alignment": {"enabled": True, "dataset": str(tmp_path / "no_such_dataset")}})
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipeline.alignment"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: alignment.dataset {tmp_path / 'no_such_dataset'}")
