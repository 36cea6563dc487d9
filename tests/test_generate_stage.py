"""`python -m pipeline.generate` as users run it: outputs, manifest and the MLflow run, bad
input (missing key, 401, missing or empty sections), secrets never leaking, and a SIGKILL in
the middle of a run followed by a resume that pays again only for what was in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import CLIENT_KEYS
from tests import generate_support
from tests.conftest import REPO_ROOT
from tests.fakes.openai_server import FakeOpenAIServer, FakeReply, tonetune_behaviour, tonetune_step
from tests.generate_support import (
    API_KEY,
    KEY_ENV,
    client_params,
    topic_sections,
    write_recordings,
    write_sections,
)

embedder = generate_support.embedder  # the session-scoped real MiniLM fixture


@pytest.fixture
def stage(tmp_path, monkeypatch, write_params, mlflow_uri):
    """A scratch project: sections, params (tiny, fast), outputs and MLflow all under tmp_path."""
    monkeypatch.chdir(tmp_path)
    write_sections(tmp_path / "sections.parquet", topic_sections(12))

    def configure(**generate):
        """generate.* keys; the client's (concurrency, prices, max_cost_usd, ...) go to generate.client."""
        settings = {"target_pairs": 100, "model": "fake-model"}
        client = {"concurrency": 4, "max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                  "request_timeout_s": 5, "api_key_env": KEY_ENV,
                  "prices": {"fake-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}}
        for key, value in generate.items():
            (client if key in CLIENT_KEYS else settings)[key] = value
        settings["client"] = client_params("generate", **client)
        write_params({"generate": settings, "tracking": {"artifact_root": str(tmp_path / "mlartifacts"),
                                                         "experiment": "generate-tests"}})
        return tmp_path

    return configure


def cli(output="out", cache="cache.jsonl", sections="sections.parquet", extra=()):
    from pipeline.generate.__main__ import main

    main(["--sections", sections, "--output-dir", output, "--cache", cache, "--no-progress", *extra])


def recordings(directory: Path) -> Path:
    """Hand-written recordings for the first 4 topics (s003 missing: not_recorded)."""
    return write_recordings(directory, [
        {"source_id": "s000", "title": "Cats", "question": "Why do cats nap in the sun?",
         "factual_answer": "Cats nap in the sun because the warmth saves them energy.",
         "rephrasings": ["They nap in the sun to stay warm. It saves them energy."]},
        {"source_id": "s001", "title": "Volcanoes", "question": "What comes out of a volcano?",
         "factual_answer": "Volcanoes release molten rock, ash and gases from deep underground.",
         "rephrasings": ["Volcanic eruptions discharge incandescent molten magma, pyroclastic ash and "
                         "sulfurous gases originating from subterranean reservoirs.",
                         "Hot melted rock comes out. So do ash and gas from deep down."]},
        {"source_id": "s002", "title": "Jazz", "question": "Where did jazz begin?",
         "factual_answer": "Jazz began in New Orleans.", "rephrasings": ["Jazz got its start in New Orleans, you know."],
         "qa_replies": ["Sure, here it is: Where did jazz begin? In New Orleans."]},
    ])


def test_replay_run_writes_pairs_ledger_manifest_and_one_mlflow_run(stage, embedder):
    from mlflow.tracking import MlflowClient

    root = stage(backend="replay", replay_dir="rec", max_json_attempts=1)
    recordings(root / "rec")
    cli()
    pairs = pd.read_parquet(root / "out" / "pairs.parquet")
    assert list(pairs.columns)[:9] == ["id", "source_id", "title", "question", "answer", "factual_answer",
                                       "flesch", "faithfulness", "attempts"]
    assert pairs["source_id"].tolist() == ["s000", "s001"]
    assert pairs["attempts"].tolist() == [1, 2] and (pairs["flesch"] >= 75).all()
    ledger = [json.loads(line) for line in (root / "out" / "ledger.jsonl").read_text().splitlines()]
    assert [entry["reason"] for entry in ledger] == ["accepted", "accepted", "bad_json"] + ["not_recorded"] * 9
    assert len(ledger[1]["flesch_attempts"]) == 2 and ledger[1]["flesch_attempts"][0] < 75
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    for key in ("mlflow_run_id", "prompt_version", "model", "backend", "thresholds", "seed", "source_corpus",
                "sections_md5", "counts", "created_at"):
        assert key in manifest
    assert manifest["counts"]["accepted"] == 2 and manifest["counts"]["rejected_bad_json"] == 1

    client = MlflowClient()
    experiment = client.get_experiment_by_name("generate-tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == manifest["mlflow_run_id"]
    assert run.data.params["prompt_version"] == manifest["prompt_version"]
    assert run.data.params["backend"] == "replay" and run.data.params["gate"] == "flesch_reading_ease >= 75"
    metrics = run.data.metrics
    assert metrics["accepted"] == 2 and metrics["rejected_bad_json"] == 1 and metrics["not_recorded"] == 9
    assert metrics["acceptance_rate"] == pytest.approx(2 / 3) and metrics["api_calls"] == 6
    assert metrics["estimated_cost_usd"] == 0 and metrics["live_cost_estimate_usd"] > 0
    for name in ("wall_time_s", "calls_per_s", "input_tokens", "output_tokens", "cache_hits"):
        assert name in metrics
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id, "generate")}
    assert artifacts == {"generate/ledger.jsonl", "generate/manifest.json", "generate/prompts.txt"}

    # A second run is answered from the cache alone and gives the same dataset.
    cli(output="again")
    again = pd.read_parquet(root / "again" / "pairs.parquet")
    pd.testing.assert_frame_equal(pairs, again)
    [latest, _] = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert latest.data.metrics["api_calls"] == 0 and latest.data.metrics["cache_hits"] == 6


def test_missing_api_key_is_one_line_naming_the_variable_before_any_call(stage, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with FakeOpenAIServer(chat=tonetune_behaviour) as server:
        stage(backend="openai", base_url=server.base_url)
        with pytest.raises(SystemExit) as exit_info:
            cli()
        assert server.chat_calls == 0
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and KEY_ENV in err


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_missing_or_empty_sections_is_a_one_line_error(stage, capsys, problem):
    root = stage(backend="replay", replay_dir="rec")
    recordings(root / "rec")
    if problem == "empty":
        write_sections(root / "empty.parquet", [])
    with pytest.raises(SystemExit):
        cli(sections="nowhere.parquet" if problem == "missing" else "empty.parquet")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert ("sections file not found: nowhere.parquet" in err) if problem == "missing" else ("empty" in err)


def test_401_stops_the_run_at_once_with_the_servers_message(stage, monkeypatch, capsys, embedder):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    refuse = lambda request: FakeReply.error(401, "Invalid credentials for this project.")  # noqa: E731
    with FakeOpenAIServer(chat=refuse, latency_s=0.05) as server:
        root = stage(backend="openai", base_url=server.base_url, concurrency=4, max_retries=5)
        with pytest.raises(SystemExit):
            cli()
        assert server.chat_calls <= 4  # the requests already in flight, no retry storm
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "HTTP 401" in err and "Invalid credentials for this project." in err
    assert not (root / "out" / "pairs.parquet").exists()


def test_the_api_key_never_reaches_mlflow_outputs_cache_or_logs(stage, monkeypatch, capfd, embedder):
    monkeypatch.setenv(KEY_ENV, API_KEY)

    def behaviour(request):  # one failure whose message echoes the key, as some servers do
        if request.index == 0:
            return FakeReply.error(500, f"upstream rejected key {API_KEY}")
        return tonetune_behaviour(request)

    with FakeOpenAIServer(chat=behaviour) as server:
        root = stage(backend="openai", base_url=server.base_url)
        cli()
        assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in server.requests)
    captured = capfd.readouterr()
    assert "pairs accepted" in captured.out
    leaks = [str(path) for path in root.rglob("*") if path.is_file() and API_KEY.encode() in path.read_bytes()]
    assert leaks == []  # mlflow.db, mlartifacts/, out/, cache.jsonl, params
    assert API_KEY not in captured.out and API_KEY not in captured.err
    assert (root / "mlflow.db").exists() and any((root / "mlartifacts").rglob("manifest.json"))


def test_kill_9_mid_run_then_resume_repays_only_in_flight_and_matches_an_uninterrupted_run(
    stage, monkeypatch, tmp_path, embedder
):
    """SIGKILL a generation subprocess while requests are in flight; the resumed run must
    (a) re-pay at most `concurrency` requests (the server counts), (b)+(c) produce exactly the
    dataset of an uninterrupted run with the same seed.

    The longest test of the generate suite because it is real: a fresh interpreter imports torch
    and loads MiniLM before it can be killed mid-run, then two complete runs log to MLflow.
    Measured 13 s at load average ~5 on the shared 2-core machine, 46-65 s at load 10-13."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    concurrency = 4
    write_sections(tmp_path / "sections.parquet", topic_sections(40))
    with FakeOpenAIServer(chat=tonetune_behaviour, latency_s=0.1) as server:
        root = stage(backend="openai", base_url=server.base_url, concurrency=concurrency)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.generate", "--sections", "sections.parquet", "--output-dir", "killed",
             "--cache", "cache.jsonl", "--no-progress"],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 240
        while server.chat_calls < 30 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()
        paid_before_kill = server.chat_calls
        lines = [json.loads(line) for line in (root / "cache.jsonl").read_bytes().splitlines()
                 if line.endswith(b"}")]  # a torn last line is possible after SIGKILL
        cached_after_kill = sum("value" in line for line in lines)
        in_flight_at_kill = {line["key"] for line in lines if line.get("sent")} - {
            line["key"] for line in lines if "value" in line}
        assert paid_before_kill - concurrency <= cached_after_kill <= paid_before_kill
        assert not (root / "killed" / "pairs.parquet").exists()

        cli(output="resumed")
        paid_to_resume = server.chat_calls - paid_before_kill

    with FakeOpenAIServer(chat=tonetune_behaviour) as reference_server:
        stage(backend="openai", base_url=reference_server.base_url, concurrency=concurrency)
        cli(output="reference", cache="reference-cache.jsonl")
        paid_uninterrupted = reference_server.chat_calls

    repaid = paid_before_kill + paid_to_resume - paid_uninterrupted
    assert 0 <= repaid <= concurrency
    # The ledger names exactly the requests whose "sent" line was on disk without an answer: a
    # superset of those the server saw twice (one may have died before reaching the server).
    resumed_ledger = [json.loads(line) for line in (root / "resumed" / "ledger.jsonl").read_text().splitlines()]
    named = sum(len(entry["repaid_requests"]) for entry in resumed_ledger)
    assert repaid <= named == len(in_flight_at_kill) <= concurrency
    resumed = pd.read_parquet(root / "resumed" / "pairs.parquet")
    reference = pd.read_parquet(root / "reference" / "pairs.parquet")
    assert len(reference) >= 30  # most of the 40 sections are accepted
    pd.testing.assert_frame_equal(resumed, reference)
    reference_ledger = [json.loads(line) for line in (root / "reference" / "ledger.jsonl").read_text().splitlines()]
    assert all(entry["repaid_requests"] == [] for entry in reference_ledger)
    assert [{**entry, "repaid_requests": []} for entry in resumed_ledger] == reference_ledger
    steps = {tonetune_step(request) for request in server.requests}
    assert steps == {"qa", "rephrase", "simplify"}  # the run exercised every step


# --------------------------------------------------------------------------- money (issue 14)


@pytest.mark.parametrize("settings, expected", [
    ({}, "'mystery-model' has no price in generate.client.prices"),
    ({"max_cost_usd": 5, "allow_unpriced": True},
     "generate.client.max_cost_usd is $5 but 'mystery-model' has no price"),
], ids=["unpriced", "cap-without-price"])
def test_an_unpriced_model_is_refused_before_any_request(stage, monkeypatch, capsys, settings, expected):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with FakeOpenAIServer(chat=tonetune_behaviour) as server:
        stage(backend="openai", base_url=server.base_url, model="mystery-model", **settings)
        with pytest.raises(SystemExit) as exit_info:
            cli()
        assert server.chat_calls == 0 and server.requests == []
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and expected in err


def test_allow_unpriced_spends_on_purpose_and_says_the_cost_is_unknown(stage, monkeypatch, capsys, embedder):
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with FakeOpenAIServer(chat=tonetune_behaviour) as server:
        stage(backend="openai", base_url=server.base_url, model="mystery-model", allow_unpriced=True, target_pairs=2)
        cli()
        assert server.chat_calls > 0
    err = capsys.readouterr().err
    assert "generate: no price for 'mystery-model' in generate.client.prices (allow_unpriced): cost not estimated" in err


def _answer_costs(cache_path: Path) -> list[float]:
    """USD of each cached answer at the test's prices ($1000 per M tokens in and out)."""
    lines = [json.loads(line) for line in cache_path.read_text().splitlines()]
    return [(line["value"]["input_tokens"] + line["value"]["output_tokens"]) / 1000 for line in lines if "value" in line]


def test_the_budget_stops_at_the_cap_keeps_everything_and_a_higher_cap_continues(stage, monkeypatch, capsys, embedder):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv(KEY_ENV, API_KEY)
    cap, concurrency = 2.0, 2
    prices = {"fake-model": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}}
    with FakeOpenAIServer(chat=tonetune_behaviour) as server:
        # max_tokens 100: a request's worst case (~$0.72: a ~620-byte prompt bound + 100 tokens)
        # fits the cap twice, so both slots are used.
        root = stage(backend="openai", base_url=server.base_url, concurrency=concurrency, prices=prices,
                     max_cost_usd=cap, max_tokens=100)
        cli(output="capped")
        first_bodies = {request.raw_body for request in server.requests}
        first_calls = server.chat_calls
        err = capsys.readouterr().err

        manifest = json.loads((root / "capped" / "manifest.json").read_text())
        ledger = [json.loads(line) for line in (root / "capped" / "ledger.jsonl").read_text().splitlines()]
        capped = pd.read_parquet(root / "capped" / "pairs.parquet")
        assert manifest["stop_reason"] == "budget_exhausted" and manifest["max_cost_usd"] == cap
        assert ledger[-1]["reason"] == "budget_exhausted" and "cost cap $2 reached" in ledger[-1]["error"]
        assert all(entry["reason"] != "budget_exhausted" for entry in ledger[:-1])
        assert 0 < len(ledger) < 12 and list(capped["id"]) == [e["id"] for e in ledger if e["reason"] == "accepted"]
        [line] = [line for line in err.splitlines() if "cost cap" in line]
        assert line.startswith("generate: stopped at the cost cap: $") and "generate.client.max_cost_usd $2;" in line
        run = MlflowClient().get_run(manifest["mlflow_run_id"])
        assert run.data.tags["stop_reason"] == "budget_exhausted" and run.data.metrics["stopped_by_budget"] == 1
        spent = run.data.metrics["dataset_cost_usd"]
        # Reserved before each request: the requests in flight cannot take the estimate past the cap.
        assert spent <= cap
        assert spent == pytest.approx(sum(_answer_costs(root / "cache.jsonl")))  # every paid answer was kept

        # A higher cap continues from the cache: nothing asked twice, the first run's pairs kept.
        stage(backend="openai", base_url=server.base_url, concurrency=concurrency, prices=prices, max_cost_usd=100.0,
              max_tokens=100)
        cli(output="continued")
        again = [r.raw_body for r in server.requests if r.path == "/v1/chat/completions"][first_calls:]
        assert again and not first_bodies & set(again)
    manifest = json.loads((root / "continued" / "manifest.json").read_text())
    assert manifest["stop_reason"] == "sources_exhausted"
    assert manifest["calls"]["cache_hits"] == first_calls and manifest["calls"]["repaid"] == 0
    continued = pd.read_parquet(root / "continued" / "pairs.parquet")
    assert list(continued["id"][: len(capped)]) == list(capped["id"]) and len(continued) > len(capped)


def test_a_wrong_shape_cache_line_is_skipped_and_the_stage_goes_on(stage, capsys, embedder):
    root = stage(backend="replay", replay_dir="rec")
    recordings(root / "rec")
    (root / "cache.jsonl").write_text('{"key": "abc", "value": "oops"}\n')
    cli()
    err = capsys.readouterr().err
    assert ("generate: cache cache.jsonl: skipped 1 unusable line(s) (not JSON, or not a {key, value} response of "
            "the right shape and types); those requests will be asked again") in err
    assert len(pd.read_parquet(root / "out" / "pairs.parquet")) == 2
