"""`rubric:` style metrics (pipeline.core.rubric): an LLM's 1-5 score through the judge's client,
against the loopback fake OpenAI server (tests/fakes/openai_server.py).

The fake rater: an answer containing "please" scores 5, "thanks" 4, anything else 2; an answer
containing "GARBLED" always gets prose instead of the asked JSON.
"""

from __future__ import annotations

import json
import math
import threading

import pytest

from pipeline.core import rubric, tone
from pipeline.core.config import JudgeConfig, StyleCriterion, ToneConfig, parse_config
from pipeline.core.errors import ConfigError, TonetuneError
from tests.fakes.openai_server import FakeOpenAIServer, FakeReply, RecordedRequest, Script

KEY_ENV = "TONETUNE_TEST_RUBRIC_KEY"
KEY = "sk-rubric-secret"
METRIC = "rubric:politeness"
RUBRIC = ("Rate how polite this answer is, for {description}. Politeness means saying please and thanks; "
          "a literal brace looks like {{this}}.\n\nAnswer:\n{answer}\n")
ANSWERS = ["Please reset your password, please.", "Thanks, it works now.", "Do it.", "", "Click Save."]
EXPECTED = [5.0, 4.0, 2.0, math.nan, 2.0]


class Rater:
    """The fake rater (see the module docstring); records the sampling parameters it was sent."""

    def __init__(self):
        self.bodies: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> str:
        with self._lock:
            self.bodies.append(request.body)
        prompt = request.messages[1]["content"]
        answer = prompt.split("Answer:\n", 1)[1].split("\n\nReply with", 1)[0]
        if "GARBLED" in answer:
            return "I would call it fairly polite."
        score = 5 if "please" in answer.lower() else 4 if "thanks" in answer.lower() else 2
        return "```json\n" + json.dumps({"reasoning": "counted the courtesies", "score": score}) + "\n```"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A repo-shaped folder holding prompts/formal/rubric_politeness.txt; no scorer kept from an
    earlier test (as a fresh process)."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "prompts" / "formal"
    folder.mkdir(parents=True)
    (folder / "rubric_politeness.txt").write_text(RUBRIC)
    monkeypatch.setenv(KEY_ENV, KEY)
    rubric.forget_scorers()
    yield tmp_path
    rubric.forget_scorers()


def judge(server: FakeOpenAIServer | None, model: str = "fake-rater", **client) -> JudgeConfig:
    return JudgeConfig.model_validate({
        "model": model, "seed": 7, "max_tokens": 64,
        "client": {"base_url": server.base_url if server else "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV,
                   "concurrency": 4, "max_retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                   "prices": {"fake-rater": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
                   "max_cost_usd": 1.0, **client},
    })


def spec(threshold: float = 4) -> ToneConfig:
    return ToneConfig(name="polite", description="a polite support desk", prompts="prompts/formal",
                      on_style=(StyleCriterion(metric=METRIC, direction="higher", threshold=threshold),))


def fresh_metric(settings: JudgeConfig) -> tone.StyleMetric:
    rubric.forget_scorers()  # as the next stage run (a new process) would
    return tone.resolve_metric(METRIC, context=tone.metric_context(spec(), settings))


def scores_of(values) -> list:
    return [None if math.isnan(value) else value for value in values]


def test_scores_are_parsed_asked_at_temperature_0_and_a_rerun_sends_nothing(workspace, monkeypatch, capsys):
    rater = Rater()
    with FakeOpenAIServer(chat=rater) as server:
        settings = judge(server)
        criteria = tone.on_style(spec(), settings).check()
        scores = criteria.score(ANSWERS)
        assert list(scores) == ["rubric_politeness"]
        assert scores_of(scores["rubric_politeness"]) == scores_of(EXPECTED)
        assert criteria.mask(scores).tolist() == [True, True, False, False, False]
        assert server.chat_calls == 4  # one per non-empty answer
        assert {(b["model"], b["temperature"], b["seed"], b["max_tokens"]) for b in rater.bodies} == {
            ("fake-rater", 0.0, 7, 64)}
        prompt = server.requests[0].messages[1]["content"]
        assert "for a polite support desk" in prompt and "{this}" in prompt and prompt.endswith(rubric.FORM)
        assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in server.requests)
        out = capsys.readouterr().out
        assert "rubric:politeness: 4 answer(s) scored by fake-rater: 4 API call(s), 0 cached" in out
        assert KEY not in out and (workspace / rubric.CACHE_PATH).is_file()

        # the next run: every answer from the cache, nothing sent, the same scores, and no key needed
        monkeypatch.delenv(KEY_ENV)
        again = fresh_metric(settings).scores(ANSWERS)
        assert server.chat_calls == 4
        assert scores_of(again) == scores_of(EXPECTED)
        assert "0 API call(s), 4 cached" in capsys.readouterr().out


def test_an_edited_rubric_is_asked_again(workspace):
    with FakeOpenAIServer(chat=Rater()) as server:
        settings = judge(server)
        fresh_metric(settings).scores(ANSWERS[:2])
        (workspace / "prompts/formal/rubric_politeness.txt").write_text("Is it courteous?\n\nAnswer:\n{answer}\n")
        fresh_metric(settings).scores(ANSWERS[:2])
        assert server.chat_calls == 4


def test_a_cap_below_one_request_refuses_before_the_first_in_one_line(workspace):
    with FakeOpenAIServer(chat=Rater()) as server:
        metric = fresh_metric(judge(server, max_cost_usd=1e-7))
        with pytest.raises(TonetuneError) as error:
            metric.scores(ANSWERS)
        text = str(error.value)
        assert "\n" not in text and "cost cap $1e-07 reached (judge.client.max_cost_usd)" in text
        assert "4 of 4 'rubric:politeness' requests to fake-rater not sent" in text
        assert server.chat_calls == 0 and server.requests == []


def test_an_unpriced_model_is_refused_before_any_request(workspace):
    with FakeOpenAIServer(chat=Rater()) as server:
        for client, message in (({"max_cost_usd": None}, "'mystery' has no price in judge.client.prices"),
                                ({}, "judge.client.max_cost_usd is $1 but 'mystery' has no price")):
            with pytest.raises(TonetuneError) as error:
                fresh_metric(judge(server, model="mystery", **client))
            assert str(error.value).startswith(f"tone metric {METRIC!r}: ") and message in str(error.value)
            assert "\n" not in str(error.value)
        # allow_unpriced without a cap: it runs, with no cost estimate
        scores = fresh_metric(judge(server, model="mystery", max_cost_usd=None, allow_unpriced=True)).scores(ANSWERS[:1])
        assert scores.tolist() == [5.0]
        assert server.chat_calls == 1


def test_a_malformed_body_is_retried_and_prose_is_corrected_then_fails_in_one_line(workspace):
    rater = Rater()
    with FakeOpenAIServer(chat=Script([FakeReply.malformed(), FakeReply.error(500, "overloaded")], then=rater)) as server:
        scores = fresh_metric(judge(server)).scores(ANSWERS[:1])
        assert scores.tolist() == [5.0] and server.chat_calls == 3  # two failed attempts retried by the client

    with FakeOpenAIServer(chat=Script(["Very polite, I'd say five."], then=rater)) as server:
        assert fresh_metric(judge(server)).scores(["Thanks a lot."]).tolist() == [4.0]
        assert server.chat_calls == 2  # the prose, then the correction turn's JSON
        correction = server.requests[1].messages
        assert correction[-2] == {"role": "assistant", "content": "Very polite, I'd say five."}
        assert correction[-1]["content"].startswith("That was not the JSON object asked for (no JSON object)")

    with FakeOpenAIServer(chat=rater) as server:
        metric = fresh_metric(judge(server))
        with pytest.raises(TonetuneError) as error:
            metric.scores(["Fine.", "GARBLED reply please"])
        text = str(error.value)
        assert "\n" not in text and "reply about answer 1 is not the asked JSON after 3 attempts (no JSON object)" in text
        assert server.chat_calls == 1 + rubric.MAX_REPLY_ATTEMPTS


def test_a_missing_key_fails_in_one_line_and_never_shows_up(workspace, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV)
    with FakeOpenAIServer(chat=Rater()) as server:
        with pytest.raises(TonetuneError) as error:
            fresh_metric(judge(server)).scores(ANSWERS)
        assert str(error.value) == (
            f"environment variable {KEY_ENV} is not set (judge.client.api_key_env): tone metric 'rubric:politeness' "
            f"asks fake-rater about 4 answer(s) not in the cache {rubric.CACHE_PATH}: export the judge endpoint's "
            "key; nothing was sent")
        assert server.chat_calls == 0


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "rubric file prompts/formal/rubric_politeness.txt not found"),
    ("no_answer", "no {answer}: a rubric needs {answer}"),
    ("unknown", "unknown placeholder(s) {question}"),
    ("no_judge", "needs the judge's model and client (params judge)"),
])
def test_a_bad_rubric_is_one_line_before_any_request(workspace, setup, message):
    path = workspace / "prompts/formal/rubric_politeness.txt"
    if setup == "missing":
        path.unlink()
    elif setup == "no_answer":
        path.write_text("Is it polite?\n")
    elif setup == "unknown":
        path.write_text("{question} {answer}\n")
    with FakeOpenAIServer(chat=Rater()) as server:
        settings = None if setup == "no_judge" else judge(server)
        with pytest.raises(TonetuneError) as error:
            tone.on_style(spec(), settings).check()
        assert message in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(TonetuneError, match="rubric"):
            tone.resolve_metric(METRIC, context=tone.metric_context(spec(), settings))
        assert server.chat_calls == 0


def test_the_params_take_a_rubric_on_style_only():
    config = parse_config({"tone": {"name": "polite", "on_style": [{"metric": METRIC, "threshold": 4}]}})
    assert config.tone.on_style[0].metric == METRIC and tone.metric_column(METRIC) == "rubric_politeness"
    with pytest.raises(ConfigError, match=r"tone.gate: 'rubric:politeness': an LLM rubric is an on-style metric only"):
        parse_config({"tone": {"gate": [{"metric": METRIC, "threshold": 4}]}})
    with pytest.raises(ConfigError, match="must be one of"):
        parse_config({"tone": {"on_style": [{"metric": "rubric:Bad-Name", "threshold": 4}]}})


def test_a_rubric_scored_from_inside_an_event_loop_runs_in_a_thread_of_its_own(workspace):
    """A caller already inside asyncio (asyncio.run cannot nest) still gets its scores."""
    import asyncio

    with FakeOpenAIServer(chat=Rater()) as server:
        metric = fresh_metric(judge(server))

        async def caller():
            return metric.scores(ANSWERS[:3])

        assert asyncio.run(caller()).tolist() == EXPECTED[:3]
        assert server.chat_calls == 3
