"""The generator client against a real loopback HTTP server, through the real `openai` package:
caching, retries (429 + Retry-After, 5xx, timeouts, malformed bodies, dropped connections),
fatal errors, concurrency and rate limits."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from pipeline.core.llmclient import ChatClient, FatalAPIError, RequestFailed, StepKey
from pipeline.core.responsecache import ResponseCache
from pipeline.generate.__main__ import request_settings
from tests import generate_support
from tests.fakes.openai_server import FakeOpenAIServer, FakeReply, Script
from tests.generate_support import API_KEY, generate_config, openai_backend

embedder = generate_support.embedder  # the session-scoped real MiniLM fixture

MESSAGES = [{"role": "user", "content": "Say hi."}]
STEP = StepKey("s000", "qa", 0)


def complete(server, tmp_path, config, messages_list=(MESSAGES,)):
    """Run client.complete for each message list concurrently; return (results, client)."""
    cache = ResponseCache(tmp_path / "cache.jsonl")
    client = ChatClient(openai_backend(server, config), cache, request_settings(config), config.client, rng_seed=0)

    async def go():
        try:
            return await asyncio.gather(*(client.complete(m, STEP) for m in messages_list), return_exceptions=True)
        finally:
            await client.aclose()

    results = asyncio.run(go())
    cache.close()
    return results, client


def test_happy_path_sends_model_seed_and_key_and_caches_the_reply(tmp_path):
    config = generate_config(temperature=0.7, max_tokens=64, seed=11)
    with FakeOpenAIServer(chat=lambda request: "hello there") as server:
        [reply], client = complete(server, tmp_path, config)
        assert reply.content == "hello there" and reply.input_tokens > 0 and reply.output_tokens > 0
        request = server.requests[0]
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.body["model"] == "fake-model" and request.body["seed"] == 11
        assert request.body["temperature"] == 0.7 and request.body["max_tokens"] == 64
        assert request.body["messages"] == MESSAGES
        # A second run with the same cache file answers from disk: no new call.
        [again], second = complete(server, tmp_path, config)
        assert again == reply and server.chat_calls == 1
        assert second.stats.cache_hits == 1 and second.stats.api_calls == 0


@pytest.mark.parametrize("retry_after, minimum_gap", [
    ("0.6", 0.6),
    ("http-date", 0.9),  # an HTTP date has 1 s resolution: "now + 2 s" is 1-2 s away
])
def test_429_waits_for_retry_after_then_succeeds(tmp_path, retry_after, minimum_gap):
    def first_reply(request):  # the date is written when the server answers, as a real one does
        value = email.utils.formatdate(time.time() + 2, usegmt=True) if retry_after == "http-date" else retry_after
        return FakeReply.rate_limited(value)

    config = generate_config(backoff_base_s=0.01, backoff_max_s=0.02)  # backoff alone would be ~instant
    with FakeOpenAIServer(chat=Script([], then=lambda request: first_reply(request) if request.index == 0
                                      else "finally")) as server:
        [reply], client = complete(server, tmp_path, config)
    assert reply.content == "finally"
    first, second = server.requests
    assert second.received_at - first.received_at >= minimum_gap
    assert client.stats.rate_limited == 1 and client.stats.retries == 1


@pytest.mark.parametrize("failure", [
    FakeReply.error(500, "internal error"),
    FakeReply.error(503, "overloaded"),
    FakeReply.malformed(),
    FakeReply.disconnect(),
    FakeReply.slow(2.0),  # longer than request_timeout_s below
], ids=["500", "503", "malformed-json", "connection-dropped", "timeout"])
def test_transient_failure_is_retried_then_succeeds(tmp_path, failure):
    config = generate_config(request_timeout_s=0.5)
    with FakeOpenAIServer(chat=Script([failure, "recovered"])) as server:
        [reply], client = complete(server, tmp_path, config)
        assert reply.content == "recovered"
        assert server.chat_calls == 2
    assert client.stats.errors == 1 and client.stats.retries == 1 and client.stats.api_calls == 2


def test_retry_budget_runs_out(tmp_path):
    config = generate_config(max_retries=2)
    with FakeOpenAIServer(chat=lambda request: FakeReply.error(500, "still broken")) as server:
        [error], client = complete(server, tmp_path, config)
        assert isinstance(error, RequestFailed)
        assert "gave up after 3 attempts" in str(error) and "still broken" in str(error)
        assert server.chat_calls == 3
    assert client.stats.requests_failed == 1
    assert len(ResponseCache(tmp_path / "cache.jsonl")) == 0  # failures are never cached


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_not_found_errors_stop_everything_at_once(tmp_path, status):
    config = generate_config(concurrency=1, max_retries=5)
    message = f"Incorrect API key provided: {API_KEY}" if status == 401 else "The model `fake-model` does not exist"
    with FakeOpenAIServer(chat=lambda request: FakeReply.error(status, message)) as server:
        many = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
        results, client = complete(server, tmp_path, config, many)
        assert server.chat_calls == 1  # no retry, and nothing queued behind it was sent
    assert all(isinstance(result, FatalAPIError) for result in results)
    text = str(results[0])
    assert f"HTTP {status}" in text and "127.0.0.1" in text
    assert API_KEY not in text  # a server that echoes the key does not get it repeated
    if status != 401:
        assert "does not exist" in text


def test_other_client_errors_fail_only_that_request(tmp_path):
    config = generate_config()
    with FakeOpenAIServer(chat=Script([FakeReply.error(400, "context too long")], then=lambda r: "fine")) as server:
        results, _ = complete(server, tmp_path, generate_config(concurrency=1),
                              [MESSAGES, [{"role": "user", "content": "other"}]])
        assert isinstance(results[0], RequestFailed) and "context too long" in str(results[0])
        assert results[1].content == "fine" and server.chat_calls == 2
    assert config.client.max_retries > 0  # a 400 was not retried although retries were allowed


def test_concurrency_is_bounded(tmp_path):
    config = generate_config(concurrency=3)
    with FakeOpenAIServer(chat=lambda request: "ok", latency_s=0.05) as server:
        many = [[{"role": "user", "content": f"q{i}"}] for i in range(15)]
        results, _ = complete(server, tmp_path, config, many)
        assert all(result.content == "ok" for result in results)
        assert server.max_concurrent == 3


def test_requests_per_minute_limit(tmp_path):
    config = generate_config(concurrency=16, requests_per_minute=1200)  # 20/s, 1 s of burst
    with FakeOpenAIServer(chat=lambda request: "ok") as server:
        many = [[{"role": "user", "content": f"q{i}"}] for i in range(40)]
        started = time.monotonic()
        complete(server, tmp_path, config, many)
        assert time.monotonic() - started >= 0.9  # 20 in the burst, 20 more at 20/s
        assert server.chat_calls == 40


def test_identical_requests_in_flight_are_sent_once(tmp_path):
    with FakeOpenAIServer(chat=lambda request: "shared", latency_s=0.1) as server:
        results, client = complete(server, tmp_path, generate_config(), [MESSAGES, MESSAGES, MESSAGES])
        assert [r.content for r in results] == ["shared"] * 3
        assert server.chat_calls == 1 and client.stats.joined_in_flight == 2


def test_fake_server_route_table_serves_other_endpoints_to_the_real_client():
    """Other endpoints (issue 8: files, fine-tuning jobs) plug into the same server by route."""
    import openai

    def job(request):
        return FakeReply(json_body={"id": request.path_params["job_id"], "object": "fine_tuning.job",
                                    "status": "running", "model": "gpt-4o-mini", "created_at": 1,
                                    "training_file": "file-1", "hyperparameters": {}, "organization_id": "org",
                                    "result_files": [], "seed": 713})

    with FakeOpenAIServer() as server:
        server.route("GET", "/v1/fine_tuning/jobs/{job_id}", job)

        async def go():
            client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
            try:
                return await client.fine_tuning.jobs.retrieve("ftjob-123")
            finally:
                await client.close()

        retrieved = asyncio.run(go())
        assert retrieved.id == "ftjob-123" and retrieved.status == "running"
        assert server.requests[-1].path == "/v1/fine_tuning/jobs/ftjob-123"
        assert server.chat_calls == 0


def test_fake_server_is_quiet_when_a_client_hangs_up_but_reports_its_own_bugs(capfd):
    """A stage that stops on a fatal error closes its in-flight connections; the fake server must
    not print a socketserver traceback after the stage's one-line error (CI saw exactly that)."""
    import socket
    import struct

    def broken(request):
        raise ValueError("a bug in a test behaviour")

    def hang_up(server, body_length):
        with socket.create_connection(("127.0.0.1", server.port)) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               + f"Content-Length: {body_length}\r\n\r\n{{".encode())
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST

    def stderr_within(seconds, until):
        """stderr collected until `until(text)` holds or `seconds` pass (handler threads print late)."""
        text, deadline = "", time.monotonic() + seconds
        while time.monotonic() < deadline and not until(text):
            time.sleep(0.05)
            text += capfd.readouterr().err
        return text

    with FakeOpenAIServer(chat=lambda request: "hello") as server:
        hang_up(server, body_length=1000)  # the server is still reading the body: reset
        assert "Exception occurred" not in stderr_within(1.0, lambda text: "Exception occurred" in text)

    with FakeOpenAIServer(chat=broken) as server:
        hang_up(server, body_length=1)
        assert "ValueError: a bug in a test behaviour" in stderr_within(15.0, lambda text: "ValueError" in text)


def test_a_request_in_flight_at_a_crash_is_counted_and_named_as_repaid(tmp_path):
    config = generate_config()
    with FakeOpenAIServer(chat=lambda request: "hello there") as server:
        cache = ResponseCache(tmp_path / "cache.jsonl")

        class SameIdentity:  # only to compute the key the OpenAI backend's requests get
            def cache_identity(self, step):
                return "openai"

        key = ChatClient(SameIdentity(), cache, request_settings(config), config.client).key(MESSAGES, STEP)
        asyncio.run(cache.mark_sent(key))  # sent, then the process died before the answer was cached
        cache.close()
        [reply], client = complete(server, tmp_path, config)
        assert reply.content == "hello there" and server.chat_calls == 1
        assert client.stats.repaid == 1 and client.repaid_steps == [STEP]
        [_], again = complete(server, tmp_path, config)  # answered now: nothing re-paid
        assert again.stats.repaid == 0 and again.stats.cache_hits == 1


def test_the_budget_reserves_each_attempts_worst_case_before_sending(tmp_path):
    from pipeline.core.llmclient import Budget, BudgetExhausted, prompt_token_bound

    config = generate_config(concurrency=1, max_tokens=50)
    other = [{"role": "user", "content": "Say bye."}]
    worst = (prompt_token_bound(MESSAGES) + 50) / 1e6  # $1 per M tokens in and out
    with FakeOpenAIServer(chat=lambda request: "hello there") as server:
        cache = ResponseCache(tmp_path / "cache.jsonl")
        # Room for the first worst case, not for a second one after the first reply's real cost
        # (5 tokens): checked against the spend alone, as before, the second would have been sent.
        budget = Budget(cap_usd=worst + 2 / 1e6, input_per_mtok=1.0, output_per_mtok=1.0)
        client = ChatClient(openai_backend(server, config), cache, request_settings(config), config.client,
                            budget=budget)

        async def go():
            try:
                first = await client.complete(MESSAGES, STEP)  # $0 spent: its worst case fits
                with pytest.raises(BudgetExhausted, match=r"cost cap \$[0-9.e-]+ reached"):
                    await client.complete(other, STEP)
                return first
            finally:
                await client.aclose()

        first = asyncio.run(go())
        cache.close()
        assert first.content == "hello there"
        assert server.chat_calls == 1 and client.stats.refused_by_budget == 1
    # Settled at the reply's reported usage, nothing left reserved.
    assert budget.paid_usd == pytest.approx((first.input_tokens + first.output_tokens) / 1e6)
    assert budget.reserved_usd == 0 and budget.spent <= budget.cap_usd
    assert Budget(None, 1.0, 1.0).reserve(1e9) is True  # no cap
    assert Budget(1.0).reserve(None) is True  # unpriced: nothing to compare


def _no_usage(request):
    """A 200 whose body has no `usage` (some gateways): the budget keeps the full reservation."""
    from tests.fakes.openai_server import chat_completion_body

    body = chat_completion_body(request, "no usage here")
    del body["usage"]
    return FakeReply(json_body=body)


def test_a_reply_without_usage_keeps_its_full_reservation_even_from_the_cache(tmp_path):
    from pipeline.core.llmclient import Budget, prompt_token_bound

    config = generate_config(max_tokens=40)
    worst = (prompt_token_bound(MESSAGES) + 40) / 1e6
    with FakeOpenAIServer(chat=_no_usage) as server:
        budget = Budget(cap_usd=10.0, input_per_mtok=1.0, output_per_mtok=1.0)
        cache = ResponseCache(tmp_path / "cache.jsonl")
        client = ChatClient(openai_backend(server, config), cache, request_settings(config), config.client,
                            budget=budget)

        async def go():
            try:
                return await client.complete(MESSAGES, STEP)
            finally:
                await client.aclose()

        assert asyncio.run(go()).content == "no usage here"
        cache.close()
        assert budget.paid_usd == pytest.approx(worst) and budget.unreported_usage == 1
        # A later run answered from the cache counts the same worst case towards its cap.
        [_], again = complete(server, tmp_path, config)
        assert server.chat_calls == 1 and again.budget.cached_usd == 0  # no budget given: unpriced
    cache = ResponseCache(tmp_path / "cache.jsonl")
    priced = Budget(cap_usd=10.0, input_per_mtok=1.0, output_per_mtok=1.0)
    client = ChatClient(openai_backend(server, config), cache, request_settings(config), config.client, budget=priced)
    asyncio.run(client.complete(MESSAGES, STEP))
    cache.close()
    assert priced.cached_usd == pytest.approx(worst)


class FaultyTonetune:
    """tonetune_behaviour with faults mixed in by arrival order: 500s, 429s, timeouts, dropped
    connections and replies without usage, on fixed positions (so every run sees the same mix)."""

    def __init__(self, latency_s: float):
        import threading

        self.latency_s = latency_s
        self.count = 0
        self.billed_usd = 0.0  # what the server would bill at $1000 per M tokens (usage it reported)
        self.unbilled_replies = 0
        self._lock = threading.Lock()

    def __call__(self, request):
        from tests.fakes.openai_server import _usage, tonetune_behaviour

        with self._lock:
            self.count += 1
            position = self.count
        if position % 11 == 3:
            return FakeReply.error(500, "upstream overloaded", delay_s=self.latency_s)
        if position % 13 == 5:
            return FakeReply.rate_limited("0.05")
        if position % 17 == 7:
            return FakeReply.slow(1.0)  # past the 0.5 s timeout below
        if position % 19 == 2:
            return FakeReply.disconnect()
        if position % 7 == 4:
            with self._lock:
                self.unbilled_replies += 1
            reply = _no_usage(request)
            reply.delay_s = self.latency_s
            return reply
        content = tonetune_behaviour(request)
        usage = _usage(request, content)
        with self._lock:
            self.billed_usd += (usage["prompt_tokens"] + usage["completion_tokens"]) / 1000
        return FakeReply.chat(content, delay_s=self.latency_s)


def test_with_8_in_flight_and_faults_the_spend_stops_at_or_below_the_cap(tmp_path, embedder):
    """The issue's case: concurrency 8, faults on, high prices. Checked before each request, the
    old cap let the requests in flight pass it ($1.81 for a $0.50 cap); reserved, it holds."""
    from pipeline.core.llmclient import Budget
    from pipeline.generate.__main__ import run_engine
    from tests.generate_support import topic_sections

    cap = 15.0  # 8 worst cases in flight (~$1 each: a ~900-byte prompt + 60 tokens at $1000/M) fit
    config = generate_config(concurrency=8, max_tokens=60, request_timeout_s=0.5, max_retries=4,
                             prices={"fake-model": {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}},
                             max_cost_usd=cap, allow_unpriced=False)
    behaviour = FaultyTonetune(latency_s=0.15)
    with FakeOpenAIServer(chat=behaviour) as server:
        budget = Budget.for_model(config.client, config.model, "generate.client")
        cache = ResponseCache(tmp_path / "cache.jsonl")
        result = asyncio.run(run_engine(config, openai_backend(server, config), cache, embedder, topic_sections(40),
                                        show_progress=False, budget=budget))
        cache.close()
        # 8 in flight: the cap did not buy its safety by sending one at a time (a timed-out request
        # still occupies the server after the client gave up on it, so the server may see one more).
        assert server.max_concurrent >= 8
    assert result.stop_reason == "budget_exhausted" and result.stats.refused_by_budget > 0
    assert result.stats.errors > 0 and budget.unreported_usage > 0  # the faults happened
    assert budget.spent <= cap and budget.reserved_usd == pytest.approx(0, abs=1e-9)
    # The estimate covers what the server billed (reported usage), and the replies it did not report.
    assert budget.spent >= behaviour.billed_usd
