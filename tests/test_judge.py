"""The judge stage against the loopback fake server (tests/judge_fakes.py says how the fake judges).

Three evaluated models on four questions: `base` (BAD answers), `lora-a` (GOOD answers) and
`lora-b` (one GARBLED answer the fake cannot judge, BAD otherwise); question 3 is "tie" (the fake
calls a tie) and question 4 "biased" (the fake always prefers answer A: a position-biased judge).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tests.fakes.openai_server import FakeOpenAIServer, FakeReply
from tests.generate_support import client_params
from tests.judge_fakes import FakeJudge

KEY_ENV = "TONETUNE_TEST_JUDGE_KEY"
QUESTIONS = ["Why is the sky blue?", "What do bees make?", "Is this a tie question?", "Is this a biased question?"]
ANSWERS = {
    "base": [f"A BAD answer number {i}." for i in range(4)],
    "lora-a": [f"A GOOD answer number {i}." for i in range(4)],
    "lora-b": ["GARBLED words"] + [f"Another BAD answer {i}." for i in range(1, 4)],
}
REPEATS = 4
PRICE_IN, PRICE_OUT = 1.0, 2.0


@pytest.fixture
def workspace(tmp_path, monkeypatch, write_params, mlflow_uri):
    """A repo-shaped folder with reports/predictions/<model>.parquet; returns a params writer."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "reports" / "predictions"
    folder.mkdir(parents=True)
    for index, (name, answers) in enumerate(ANSWERS.items()):
        pd.DataFrame({
            "id": [f"q{i}" for i in range(4)], "question": QUESTIONS, "reference": [f"Reference {i}." for i in range(4)],
            "answer": answers, "flesch": [70.0 + index] * 4, "similarity": [0.5 + index / 10] * 4,
        }).to_parquet(folder / f"{name}.parquet")

    def params(server: FakeOpenAIServer | None, client: dict | None = None, **judge):
        return write_params({
            "tracking": {"tracking_uri": mlflow_uri, "artifact_root": str(tmp_path / "mlartifacts")},
            "judge": {"enabled": True, "model": "fake-judge", "repeats": REPEATS, **judge,
                      "client": client_params(
                          "judge", base_url=server.base_url if server else "http://127.0.0.1:9/v1",
                          api_key_env=KEY_ENV, concurrency=4, max_retries=3, backoff_base_s=0.01,
                          backoff_max_s=0.05,
                          prices={"fake-judge": {"input_per_mtok": PRICE_IN, "output_per_mtok": PRICE_OUT}},
                          **(client or {}))},
        })

    return params


def worst_case_usd() -> float:
    """The largest worst case of one judge request here (longest prompt bound + max_tokens)."""
    from pipeline.core.config import JudgeConfig
    from pipeline.core.llmclient import prompt_token_bound
    from pipeline.judge import METRICS, geval_messages, pairwise_messages

    answers = [answer for model in ANSWERS.values() for answer in model]
    prompts = [geval_messages(metric, question, f"Reference {i}.", answer) for metric in METRICS
               for i, question in enumerate(QUESTIONS) for answer in answers]
    prompts += [pairwise_messages(question, first, second) for question in QUESTIONS for first in answers
                for second in answers]
    longest = max(prompt_token_bound(messages) for messages in prompts)
    return longest / 1e6 * PRICE_IN + JudgeConfig().max_tokens / 1e6 * PRICE_OUT


def run_stage(capsys):
    from pipeline.judge import main

    main([])
    return capsys.readouterr().out


def metrics(name: str) -> dict:
    return json.loads(Path(f"metrics/judge/{name}.json").read_text())


def test_judge_scores_repeats_orders_cache_and_cost(workspace, monkeypatch, capsys):
    import mlflow

    monkeypatch.setenv(KEY_ENV, "sk-judge-test")
    faults = [FakeReply.error(500, "the judge is overloaded"), FakeReply.malformed()]
    judge = FakeJudge(faults=faults)
    with FakeOpenAIServer(chat=judge) as server:
        workspace(server)
        out = run_stage(capsys)

        n_models, n_questions = len(ANSWERS), len(QUESTIONS)
        n_geval = n_models * n_questions * 2 * REPEATS
        n_pairs = (n_models - 1) * n_questions * 2
        assert server.chat_calls == n_geval + n_pairs + len(faults)
        # repeats: every G-Eval judgement asked once per seed 0..R-1
        assert sorted(set(judge.geval_seeds)) == list(range(REPEATS))
        assert all(judge.geval_seeds.count(seed) == n_geval // REPEATS for seed in range(REPEATS))
        # both orders: for every model and question, (baseline, model) and (model, baseline)
        for model in ("lora-a", "lora-b"):
            for question, mine, theirs in zip(QUESTIONS, ANSWERS[model], ANSWERS["base"], strict=True):
                assert (question, theirs, mine) in judge.pairs and (question, mine, theirs) in judge.pairs

        base, good, mixed = metrics("base"), metrics("lora-a"), metrics("lora-b")
        for record in (base, good, mixed):
            assert record["repeats"] == REPEATS and record["n_questions"] == n_questions
        assert base["accuracy_mean"] == pytest.approx(2.5) and base["completeness_mean"] == pytest.approx(2.5)
        assert base["accuracy_repeat_std"] == pytest.approx(0.5) and base["accuracy_invalid"] == 0
        assert "pairwise_wins" not in base  # the baseline is not compared with itself
        assert good["accuracy_mean"] == pytest.approx(4.5) and good["completeness_repeat_std"] == pytest.approx(0.5)
        assert (good["pairwise_wins"], good["pairwise_ties"], good["pairwise_losses"],
                good["pairwise_inconsistent"], good["pairwise_invalid"]) == (2, 1, 0, 1, 0)
        assert good["pairwise_win_rate"] == pytest.approx(0.5)
        assert good["pairwise_first_position_rate"] == pytest.approx(4 / 8)
        # the GARBLED answer: its G-Eval replies are not JSON -> invalid, left out of the mean
        assert mixed["accuracy_invalid"] == REPEATS and mixed["accuracy_mean"] == pytest.approx(2.5)
        assert (mixed["pairwise_wins"], mixed["pairwise_ties"], mixed["pairwise_losses"],
                mixed["pairwise_inconsistent"], mixed["pairwise_invalid"]) == (0, 2, 0, 1, 1)
        assert all(isinstance(value, (int, float)) for record in (base, good, mixed) for value in record.values()
                   if value is not None)

        table = pd.read_parquet("reports/judge/lora-a.parquet")
        assert table["pairwise"].tolist() == ["win", "win", "tie", "inconsistent"]
        assert table["pairwise_baseline_first"].tolist()[3] == "baseline"
        assert table["pairwise_model_first"].tolist()[3] == "model"
        assert [list(s) for s in table["accuracy_scores"]] == [[5, 4, 5, 4]] * 4

        status = json.loads(Path("reports/judge/status.json").read_text())
        assert status["status"] == "judged" and status["api_calls"] == n_geval + n_pairs + len(faults)
        assert status["retries"] == len(faults) and status["cache_hits"] == 0
        billed = judge.billed_input / 1e6 * PRICE_IN + judge.billed_output / 1e6 * PRICE_OUT
        assert sum(metrics(m)["judge_cost_usd"] for m in ANSWERS) == pytest.approx(billed, rel=1e-9) and billed > 0
        # The stage's estimate also keeps the full reservation of the malformed 200 (a reply that
        # reported no usage: it may have been billed): one worst case above what the fake billed.
        assert billed < status["cost_usd"] <= billed + worst_case_usd()
        assert "lora-a: accuracy 4.50 (+/- 0.50)" in out and "2 wins, 1 ties, 0 losses, 1 position-inconsistent" in out

        # MLflow: one child run per model, evaluated by mlflow.genai.evaluate with our scorers
        child = mlflow.search_runs(filter_string="tags.model = 'lora-a'", search_all_experiments=True)
        assert len(child) == 1
        assert child["metrics.accuracy/mean"][0] == pytest.approx(4.5)
        assert child["metrics.flesch/mean"][0] == pytest.approx(71.0)
        assert child["metrics.judge_pairwise_wins"][0] == 2

        # a re-run is served from the cache: no call, nothing paid, the same numbers
        calls = server.chat_calls
        workspace(server)
        run_stage(capsys)
        assert server.chat_calls == calls
        again = json.loads(Path("reports/judge/status.json").read_text())
        assert again["api_calls"] == 0 and again["cache_hits"] == n_geval + n_pairs and again["cost_usd"] == 0
        assert metrics("lora-a") == good and metrics("lora-b") == mixed


def test_not_run_by_default_writes_a_status_in_no_time(tmp_path, monkeypatch, write_params, capsys):
    monkeypatch.chdir(tmp_path)
    write_params()
    (tmp_path / "metrics" / "judge").mkdir(parents=True)
    (tmp_path / "metrics" / "judge" / "old.json").write_text("{}")
    out = run_stage(capsys)
    assert "judge: not run" in out
    assert json.loads((tmp_path / "reports/judge/status.json").read_text())["status"] == "not_run"
    # no stale judge columns; only the summary that keeps the DVC metrics folder from being empty
    assert [p.name for p in (tmp_path / "metrics" / "judge").iterdir()] == ["summary.yaml"]
    assert json.loads((tmp_path / "metrics" / "judge" / "summary.yaml").read_text()) == {"enabled": False, "models": 0}
    # the DVC persist output is a folder holding the (empty) cache file: DVC warns about an empty
    # file output on every run, not about a folder that holds one
    assert [p.name for p in (tmp_path / "data" / "cache" / "judge").iterdir()] == ["responses.jsonl"]


def test_replies_cached_at_the_old_path_are_moved_not_dropped(tmp_path, monkeypatch, write_params, capsys):
    monkeypatch.chdir(tmp_path)
    write_params()
    legacy = tmp_path / "data" / "cache" / "judge_responses.jsonl"
    legacy.parent.mkdir(parents=True)
    paid = b'{"key": "k1", "value": {"content": "paid for"}}\n'
    legacy.write_bytes(paid)
    out = run_stage(capsys)
    assert "judge: moved the cached replies from data/cache/judge_responses.jsonl to data/cache/judge/responses.jsonl" in out
    assert (tmp_path / "data" / "cache" / "judge" / "responses.jsonl").read_bytes() == paid and not legacy.exists()


def test_missing_key_or_baseline_fails_before_any_call(workspace, monkeypatch, capsys):
    from pipeline.judge import main

    judge = FakeJudge()
    with FakeOpenAIServer(chat=judge) as server:
        workspace(server)
        monkeypatch.delenv(KEY_ENV, raising=False)
        with pytest.raises(SystemExit) as exit_info:
            main([])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"error: environment variable {KEY_ENV} is not set (judge.client.api_key_env): export the judge "
            "endpoint's key; nothing was sent")

        monkeypatch.setenv(KEY_ENV, "sk-judge-test")
        workspace(server, baseline="nobody")
        with pytest.raises(SystemExit):
            main([])
        assert "judge.baseline = 'nobody': no reports/predictions/nobody.parquet" in capsys.readouterr().err
        assert server.chat_calls == 0
    assert not Path("metrics/judge").exists()


def test_an_unpriced_judge_model_is_refused_before_any_request(workspace, monkeypatch, capsys):
    """The issue's case: a judge model missing from the prices made 48 paid calls and printed
    "cost n/a". Now: one line, nothing sent, unless allow_unpriced says so on purpose."""
    from pipeline.judge import main

    monkeypatch.setenv(KEY_ENV, "sk-judge-test")
    judge = FakeJudge()
    with FakeOpenAIServer(chat=judge) as server:
        workspace(server, model="mystery-judge", client={"max_cost_usd": None})
        with pytest.raises(SystemExit) as exit_info:
            main([])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert "'mystery-judge' has no price in judge.client.prices" in err
        assert "judge.client.allow_unpriced: true" in err and "nothing was sent" in err
        assert server.chat_calls == 0 and server.requests == []
        # The default cap needs a price too: refused the same way, naming the cap.
        workspace(server, model="mystery-judge", client={"allow_unpriced": True})
        with pytest.raises(SystemExit):
            main([])
        assert "judge.client.max_cost_usd is $5 but 'mystery-judge' has no price" in capsys.readouterr().err
        assert server.chat_calls == 0 and server.requests == []
    assert not Path("metrics/judge").exists()


def test_the_judge_stops_at_its_cap_in_one_line_and_a_higher_cap_continues(workspace, monkeypatch, capsys):
    from pipeline.judge import main

    monkeypatch.setenv(KEY_ENV, "sk-judge-test")
    judge = FakeJudge()
    cap = 8 * worst_case_usd()  # about half of the whole run (~$0.03), 4 worst cases in flight fit
    with FakeOpenAIServer(chat=judge) as server:
        workspace(server, client={"max_cost_usd": cap})
        with pytest.raises(SystemExit) as exit_info:
            main([])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1
        assert "cost cap $" in err and "judge.client.max_cost_usd" in err
        first_calls = server.chat_calls
        assert 0 < first_calls < len(ANSWERS) * len(QUESTIONS) * 2 * REPEATS
        billed = judge.billed_input / 1e6 * PRICE_IN + judge.billed_output / 1e6 * PRICE_OUT
        assert billed <= cap  # what the fake billed stayed under the cap
        assert not Path("reports/judge/status.json").exists()
        # A higher cap goes on from the cache: nothing asked twice.
        bodies = [request.raw_body for request in server.requests]
        workspace(server, client={"max_cost_usd": 100.0})
        run_stage(capsys)
        assert not set(bodies) & {request.raw_body for request in server.requests[first_calls:]}
    status = json.loads(Path("reports/judge/status.json").read_text())
    assert status["cache_hits"] == first_calls


def test_parsers_accept_the_form_and_reject_the_rest():
    from pipeline.judge import combine, parse_score, parse_winner, verdict_for_model

    assert parse_score('Sure: {"steps": "x", "score": 4} done') == (4, "x")
    assert parse_score('{"steps": "x", "score": "5"}')[0] == 5
    assert parse_score('{"score": 6}')[0] is None and parse_score('{"score": true}')[0] is None
    assert parse_score("four")[0] is None
    assert parse_winner('{"winner": "B"}') == "B" and parse_winner('{"winner": "both"}') is None
    assert verdict_for_model("B", "baseline_first") == "model" and verdict_for_model("B", "model_first") == "baseline"
    assert combine("model", "model") == "win" and combine("baseline", "model") == "inconsistent"
    assert combine("tie", "tie") == "tie" and combine("tie", "invalid") == "invalid"
