"""Fast unit tests of the generate package: reply parsing, prompt versioning, the durable cache,
Retry-After parsing, backoff, token buckets and the replay recordings (no network, no model)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import pytest

from pipeline.core.llmclient import StepKey, TokenBucket, backoff_delay, parse_retry_after
from pipeline.core.responsecache import ResponseCache, cache_key
from pipeline.generate import prompts
from tests.generate_support import write_recordings

GOOD = {"question": "Why is the sky blue?", "answer": "Air scatters blue light more than red light."}


@pytest.mark.parametrize("reply", [
    json.dumps(GOOD),
    "  \n" + json.dumps(GOOD) + "\n\n",
    "```json\n" + json.dumps(GOOD) + "\n```",
    "```\n" + json.dumps(GOOD, indent=2) + "\n```\n",
    "Here is the pair:\n" + json.dumps(GOOD) + "\nI hope this helps!",
    json.dumps(GOOD) + " {\"extra\": 1}",
    "```json\n" + json.dumps({**GOOD, "note": "ignored"}) + "\n``` trailing words",
])
def test_parse_qa_reply_tolerates_fences_whitespace_and_trailing_text(reply):
    assert prompts.parse_qa_reply(reply) == (GOOD["question"], GOOD["answer"])


@pytest.mark.parametrize("reply, problem", [
    ("", "empty"),
    (None, "empty"),
    ("Sure! The question is why the sky is blue.", "no JSON object"),
    ('{"question": "Why?", "answer": ', "invalid JSON"),
    ('{"question": "Why is the sky blue?"}', "'answer'"),
    ('{"question": "", "answer": "x"}', "'question'"),
    ('{"question": 3, "answer": "x"}', "'question'"),
    ('{"question": "Tell me about the sky.", "answer": "It is blue."}', "ending with '\\?'"),
    ("```json\n[1, 2]\n```", "no JSON object"),
])
def test_parse_qa_reply_rejects_malformed_replies(reply, problem):
    with pytest.raises(prompts.MalformedReply, match=problem):
        prompts.parse_qa_reply(reply)


def test_qa_retry_messages_carry_the_bad_reply_and_a_correction():
    first = prompts.qa_messages("Moon", "The Moon orbits the Earth.")
    retry = prompts.qa_messages("Moon", "The Moon orbits the Earth.", [("nope", "no JSON object in the reply")])
    assert retry[: len(first)] == first
    assert retry[-2] == {"role": "assistant", "content": "nope"}
    assert "no JSON object" in retry[-1]["content"]


def test_prompt_version_is_a_hash_of_every_template():
    assert len(prompts.PROMPT_VERSION) == 12
    text = prompts.prompts_text()
    assert prompts.PROMPT_VERSION in text
    for template in (prompts.QA_USER, prompts.REPHRASE_USER, prompts.SIMPLIFY_USER):
        assert template in text


def test_clean_rephrasing_strips_quotes_and_whitespace():
    assert prompts.clean_rephrasing('  "Well, it is blue."\n') == "Well, it is blue."
    assert prompts.clean_rephrasing(None) == ""


# --------------------------------------------------------------------------- cache


def test_cache_key_depends_on_every_sampling_parameter():
    base = {"backend": "openai", "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 1.0, "max_tokens": 10, "seed": 0}
    keys = {cache_key(base)}
    for field, value in [("model", "n"), ("temperature", 0.5), ("max_tokens", 11), ("seed", 1),
                         ("messages", [{"role": "user", "content": "hi!"}]), ("backend", "replay")]:
        keys.add(cache_key({**base, field: value}))
    assert len(keys) == 7
    assert cache_key(dict(reversed(base.items()))) == cache_key(base)  # canonical


def test_cache_survives_a_torn_last_line_and_appends_cleanly(tmp_path):
    path = tmp_path / "cache" / "responses.jsonl"
    cache = ResponseCache(path)

    async def fill():
        await asyncio.gather(*(cache.put(f"k{i}", {"content": f"reply {i}"}) for i in range(5)))

    asyncio.run(fill())
    cache.close()
    with open(path, "ab") as handle:  # what a SIGKILL in the middle of a write leaves
        handle.write(b'{"key": "k5", "value": {"content": "half a rep')
    reopened = ResponseCache(path)
    assert len(reopened) == 5 and reopened.torn_bytes > 0
    assert reopened.get("k3") == {"content": "reply 3"}
    reopened.put_sync("k6", {"content": "after the crash"})
    reopened.close()
    lines = path.read_bytes().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 6
    assert ResponseCache(path).get("k6") == {"content": "after the crash"}


def test_cache_put_is_on_disk_before_it_returns(tmp_path):
    path = tmp_path / "responses.jsonl"
    cache = ResponseCache(path)

    async def put_and_read():
        await cache.put("k", {"content": "paid for"})
        return path.read_text()  # no close, no flush by us: put already fsynced

    assert '"paid for"' in asyncio.run(put_and_read())


def test_cache_skips_a_corrupt_middle_line_and_keeps_the_first_write(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text('{"key": "a", "value": {"content": "1"}}\nGARBAGE\n{"key": "a", "value": {"content": "2"}}\n')
    cache = ResponseCache(path)
    assert cache.corrupt_lines == 1 and cache.get("a") == {"content": "1"}


# --------------------------------------------------------------------------- retry timing


def test_parse_retry_after_seconds_ms_and_http_date():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= parse_retry_after({"retry-after": date}, now=now) <= 31
    assert parse_retry_after({"retry-after": email.utils.formatdate(now - 60, usegmt=True)}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_backoff_is_full_jitter_capped_and_retry_after_is_a_floor():
    import random

    rng = random.Random(0)
    delays = [backoff_delay(attempt, 1.0, 8.0, None, rng) for attempt in range(10) for _ in range(50)]
    assert 0 <= min(delays) and max(delays) <= 8.0
    assert len({round(d, 6) for d in delays}) > 400  # jittered, not a fixed ladder
    assert all(3.0 <= backoff_delay(a, 1.0, 8.0, 3.0, rng) <= 4.0 for a in range(10))


def test_token_bucket_limits_the_rate():
    async def take(n):
        bucket = TokenBucket(rate_per_s=20, capacity=1)
        started = time.monotonic()
        for _ in range(n):
            await bucket.acquire(1)
        return time.monotonic() - started

    elapsed = asyncio.run(take(11))
    assert 0.45 <= elapsed < 2.0  # 10 refills at 20/s = 0.5 s


# --------------------------------------------------------------------------- replay


def _record(source_id, **extra):
    record = {"source_id": source_id, "title": "T", "question": "Why is it so?", "factual_answer": "Because.",
              "rephrasings": ["Well, because."]}
    record.update(extra)
    return record


def test_replay_answers_by_source_step_and_attempt_not_by_prompt(tmp_path):
    from pipeline.core.llmclient import RequestFailed
    from pipeline.generate.replay import MISSING_QA_REPLY, load_recordings, recorded_reply

    recordings = load_recordings(write_recordings(tmp_path / "rec", [
        _record("a", rephrasings=["hard one", "simpler", "simplest"]),
        _record("b", qa_replies=["not json", '{"question": "Q?", "answer": "A."}']),
    ]))
    a, b = recordings["a"], recordings["b"]
    assert prompts.parse_qa_reply(recorded_reply(a, StepKey("a", "qa", 0))) == ("Why is it so?", "Because.")
    assert recorded_reply(a, StepKey("a", "rephrase", 0)) == "hard one"
    assert recorded_reply(a, StepKey("a", "simplify", 2)) == "simplest"
    with pytest.raises(RequestFailed, match="simplify #3"):
        recorded_reply(a, StepKey("a", "simplify", 3))
    assert recorded_reply(b, StepKey("b", "qa", 0)) == "not json"
    assert recorded_reply(b, StepKey("b", "qa", 2)) == MISSING_QA_REPLY


def test_replay_fences_a_fixed_subset_of_passages(tmp_path):
    from pipeline.generate.replay import is_fenced, load_recordings, recorded_reply

    ids = [f"id{i}" for i in range(40)]
    recordings = load_recordings(write_recordings(tmp_path / "rec", [_record(i) for i in ids]))
    fenced = [i for i in ids if recorded_reply(recordings[i], StepKey(i, "qa", 0)).startswith("```json")]
    assert 0 < len(fenced) < len(ids)
    assert fenced == [i for i in ids if is_fenced(i)]


@pytest.mark.parametrize("bad, message", [
    ({"source_id": "x", "title": "T", "question": "Q?", "factual_answer": "A"}, "missing key 'rephrasings'"),
    (_record("x", rephrasings=[]), "non-empty list"),
    (_record("x", rephrasing=["typo"]), "unknown key"),
    (_record("x", question=""), "'question' must be a non-empty string"),
    (_record("x", qa_replies="nope"), "'qa_replies' must be a list"),
])
def test_replay_loader_names_file_line_and_problem(tmp_path, bad, message):
    from pipeline.core.errors import TonetuneError
    from pipeline.generate.replay import load_recordings

    directory = write_recordings(tmp_path / "rec", [_record("ok"), bad])
    with pytest.raises(TonetuneError, match=rf"part-1.jsonl:2: .*{message}"):
        load_recordings(directory)


def test_replay_check_reports_duplicates_unknown_ids_and_gaps(tmp_path, capsys, write_params):
    from pipeline.generate.replay import main
    from tests.generate_support import topic_sections, write_sections

    write_params({})
    sections = write_sections(tmp_path / "sections.parquet", topic_sections(3))
    directory = write_recordings(tmp_path / "rec", [
        _record("s000", title="Cats", rephrasings=["Yes, they do nap a lot."]),
        _record("s001", title="Volcanoes", rephrasings=[
            "The geological circumstances necessitating volcanic eruptions are considerably complicated."]),
        _record("nope", title="X"),
    ])
    write_recordings(directory, [_record("s000", title="Cats")], name="part-2.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--dir", str(directory), "--sections", str(sections)])
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert "duplicate source_id 's000'" in out.out
    assert "'nope' is not in" in out.out
    assert "no simpler one follows" in out.out  # s001 fails Flesch with nothing after it
    assert "passes_at_attempt_1: 2" in out.out  # s000 and nope
    assert "3 problem(s)" in out.err
