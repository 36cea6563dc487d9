"""The worked example tone (profiles/support.yaml) through the data stages, offline: its own help
pages (corpora/support) -> source -> generate against the local OpenAI-compatible test server, with
its own prompts and a three-criterion gate (one of them a function in tones/) -> validate.

What it shows: the tone's prompt files are what the generator is sent, its gate decides (an answer
that does not address the reader is sent back), the prompt versions and the tone are recorded, and
the data-quality gate checks the tone's criteria under their own names. Then predict -> score ->
heldout -> report with the same tone on a tiny model and random adapters: metric names, the tone's prompts
and the AND rule per answer. The whole DAG, train and promote included, under a real `dvc repro`:
tests/test_support_tone_dag.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline.core.config import deep_merge
from pipeline.core.prompts import prompt_version
from tests import generate_support, test_evaluate
from tests.conftest import REPO_ROOT
from tests.fakes.openai_server import FakeOpenAIServer, RecordedRequest
from tests.generate_support import API_KEY, KEY_ENV, client_params
from tests.test_evaluate import commit_all

embedder = generate_support.embedder  # the session-scoped real MiniLM fixture
chatty_llama_dir = test_evaluate.chatty_llama_dir  # a tiny model that answers (module-scoped fixture)
stage_dir = test_evaluate.stage_dir  # a working directory laid out like the repo, with two adapters
SUPPORT = yaml.safe_load((REPO_ROOT / "profiles" / "support.yaml").read_text())


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", " ".join(text.split()))
    return match.group(1) if match else text.strip()


def support_generator(request: RecordedRequest) -> str:
    """A deterministic stand-in for the generator LLM, reading the support prompts: the question names
    the page, the answer is its first sentence; the first rephrasing forgets the reader (it fails the
    `second_person` criterion), the simplification addresses them."""
    messages = request.messages
    if messages[0]["content"].startswith("You write question and answer pairs for a support assistant"):
        user = messages[1]["content"]
        title = re.search(r'help page "(.*?)":', user).group(1)
        section = user.split("\n\n")[1]
        return json.dumps({"question": f"What should I know about {title}?", "answer": _first_sentence(section)})
    facts = re.search(r"^Answer: (.*)$", messages[1]["content"], re.MULTILINE).group(1)
    if len(messages) <= 2:
        return f"The service states: {facts}"
    return f"You should know this. {facts}"


@pytest.fixture
def support_project(tmp_path, monkeypatch, write_params, mlflow_uri):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(KEY_ENV, API_KEY)

    def configure(base_url: str):
        overlay = deep_merge(SUPPORT, {
            "tone": {"prompts": str(REPO_ROOT / "prompts" / "support")},
            "source": {"files_dir": str(REPO_ROOT / "corpora" / "support")},
            "generate": {"model": "fake-model", "target_pairs": 50, "client": client_params(
                "generate", base_url=base_url, api_key_env=KEY_ENV, concurrency=2, max_retries=1,
                backoff_base_s=0.01, backoff_max_s=0.05,
                prices={"fake-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}})},
            "tracking": {"artifact_root": str(tmp_path / "mlartifacts"), "experiment": "support-tone"},
        })
        write_params(overlay)
        return tmp_path

    return configure


def test_the_support_tone_generates_and_validates_under_its_own_names(support_project, embedder):
    import mlflow

    from pipeline import source, validate
    from pipeline.generate.__main__ import main as generate

    with FakeOpenAIServer(chat=support_generator) as server:
        root = support_project(server.base_url)
        source.main(["--output", "sections.parquet"])
        sections = pd.read_parquet(root / "sections.parquet")
        assert set(sections["source_path"]) == {"accounts.md", "billing.md", "sharing.html"}  # README.txt: too short
        generate(["--sections", "sections.parquet", "--output-dir", "out", "--cache", "cache.jsonl", "--no-progress"])
        requests = list(server.requests)

    concise = (REPO_ROOT / "prompts/support/generate_rephrase_system.txt").read_text().strip()
    sent_systems = {r.messages[0]["content"] for r in requests}
    assert concise.replace("{description}", SUPPORT["tone"]["description"]) in sent_systems
    simplify = [r for r in requests if len(r.messages) > 2 and r.messages[0]["content"].startswith("You rewrite")]
    feedback = [r.messages[-1]["content"] for r in simplify]  # the failed criteria, named, sent back
    assert any("tones.support:second_person 0.0 < 0.03" in text for text in feedback)

    pairs = pd.read_parquet(root / "out" / "pairs.parquet")
    from tones.support import second_person

    assert len(pairs) >= 3 and all(second_person(answer) >= 0.03 for answer in pairs["answer"])
    assert pairs["answer"].str.startswith("You should know this.").any()  # accepted after the feedback
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["tone"] == "support_formal" and manifest["source_corpus"].startswith("files:")
    assert manifest["prompts"]["rephrase_system"] == prompt_version(
        (REPO_ROOT / "prompts/support/generate_rephrase_system.txt").read_text()[:-1])
    run = mlflow.MlflowClient().get_run(manifest["mlflow_run_id"])
    assert run.data.tags["tone"] == "support_formal"
    assert run.data.tags["prompt.rephrase_user.uri"] == "prompts:/tonetune-support_formal-rephrase_user/1"

    validate.main(["--pairs", "out/pairs.parquet", "--docs-dir", "dq", "--summary", "dq.json"])
    details = json.loads((root / "dq" / "summary.json").read_text())
    assert {"answer_fk_grade", "answer_words", "answer_second_person"} <= set(details["checks"])
    assert "answer_flesch" not in details["checks"] and details["success"] is True


def test_the_support_tone_is_scored_and_decided_under_its_own_names(stage_dir, write_params, capsys):
    """predict -> score -> heldout with the support tone (tiny model, two random adapters): the base
    gets the tone's verbose prompt, every metric is named after the tone (never "conversational"),
    and the test-set decision reads the tone's on-style rule."""
    from pipeline import heldout, predict, score

    tone = {**SUPPORT["tone"], "prompts": str(REPO_ROOT / "prompts" / "support")}
    write_params({"tone": tone, "evaluate": {"max_new_tokens": 6, "batch_size": 4, "bootstrap_samples": 200,
                                            "limit": 4},
                  "train": {"grid": {"precision": ["bf16", "int8"], "lora_r": [4], "learning_rate": [0.001],
                                     "n_train": [10]}}})
    pd.DataFrame({"id": ["t0", "t1", "t2"], "question": ["How do I reset my password?", "Can I get a refund?",
                                                         "Who can see my notes?"],
                  "answer": ["You use the reset link.", "You can within 14 days.", "You decide who sees them."],
                  "factual_answer": ["A reset link is e-mailed.", "Yearly plans: 14 days.", "Only shared people."]}
                 ).to_parquet("data/splits/test.parquet")
    predict.main([])
    score.main(["--no-mlflow"])
    verbose = (REPO_ROOT / "prompts/support/system_verbose.txt").read_text()[:-1].format(description=tone["description"])
    assert json.loads(Path("reports/predictions/base.json").read_text())["system_prompt_version"] == \
        prompt_version(verbose)
    record = json.loads(Path("metrics/eval/base.json").read_text())
    assert {"pct_support_formal", "pct_support_formal_ci_low", "fk_grade_mean", "words_median",
            "second_person_mean"} <= set(record)
    assert not [key for key in record if "conversational" in key or key.startswith("flesch")]
    scores = pd.read_parquet("reports/scores/base.parquet")
    assert {"fk_grade", "words", "second_person"} <= set(scores.columns) and "flesch" not in scores.columns
    assert "% support formal" in capsys.readouterr().out

    commit_all(stage_dir, "declare the rule")
    heldout.main([])
    decision = json.loads(Path("reports/heldout/decision.json").read_text())
    table = pd.read_parquet(f"reports/heldout/{decision['finalist']}.parquet")
    assert {"fk_grade", "words", "second_person", "on_style"} <= set(table.columns)
    rule = [table["fk_grade"] <= 10, table["words"] <= 60, table["second_person"] >= 0.03]
    assert table["on_style"].tolist() == (rule[0] & rule[1] & rule[2]).tolist()  # AND, per answer

    from pipeline import report

    report.main(["--no-mlflow"])
    results = Path("reports/results.md").read_text()
    assert "% support formal responses" in results and "Mean Flesch-Kincaid grade" in results
    tables = results.split("## Figures")[0].split("## Base vs best")[1]
    assert "conversational" not in tables
    assert "flesch_kincaid_grade <= 10 AND words_per_answer <= 60 AND tones.support:second_person >= 0.03" in results
