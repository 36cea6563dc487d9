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
from tests.fakes.openai_server import FakeOpenAIServer, FakeReply, Script
from tests.generate_support import API_KEY, generate_config, openai_backend

MESSAGES = [{"role": "user", "content": "Say hi."}]
STEP = StepKey("s000", "qa", 0)


def complete(server, tmp_path, config, messages_list=(MESSAGES,)):
    """Run client.complete for each message list concurrently; return (results, client)."""
    cache = ResponseCache(tmp_path / "cache.jsonl")
    client = ChatClient(openai_backend(server, config), cache, request_settings(config), config, rng_seed=0)

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
    assert config.max_retries > 0  # a 400 was not retried although retries were allowed


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
