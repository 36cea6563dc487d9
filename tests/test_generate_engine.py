"""The paper's steps end to end through the engine, the real client and a loopback server:
simplification limits, faithfulness and dedup decisions, malformed JSON, API errors, the
target stop, source-order determinism, and the replay backend through the same path.
Embeddings are the real packaged MiniLM (session fixture)."""

from __future__ import annotations

import json
import random
import re
import threading

import numpy as np

from pipeline.core.responsecache import ResponseCache
from pipeline.core.textmetrics import flesch_reading_ease
from pipeline.generate.engine import Section
from tests import generate_support
from tests.fakes.openai_server import (
    FakeOpenAIServer,
    FakeReply,
    RecordedRequest,
    tonetune_behaviour,
    tonetune_step,
)
from tests.generate_support import (
    generate_config,
    openai_backend,
    run,
    topic_sections,
    write_recordings,
)

HARD = ("Volcanic eruptions constitute extraordinarily complicated geological phenomena characterized "
        "by the extrusion of incandescent magmatic materials originating from considerable subterranean depths.")

embedder = generate_support.embedder  # the session-scoped real MiniLM fixture


def step_and_title(request: RecordedRequest) -> tuple[str, str]:
    """Which step a request is, and for which section title (from tonetune_behaviour's question)."""
    user = request.messages[1]["content"]
    step = tonetune_step(request)
    if step == "qa":
        return "qa", re.search(r'article "(.*?)":', user).group(1)
    return step, re.search(r"What should I know about (.*?)\?", user).group(1)


class Generator:
    """tonetune_behaviour with per-(title, step) overrides: a list of replies played in order."""

    def __init__(self, overrides: dict[tuple[str, str], list] | None = None, latency=None):
        self.overrides = {key: list(value) for key, value in (overrides or {}).items()}
        self.latency = latency  # callable(title, step) -> seconds
        self.lock = threading.Lock()

    def __call__(self, request: RecordedRequest):
        step, title = step_and_title(request)
        reply = None
        with self.lock:
            queue = self.overrides.get((title, step))
            if queue:
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
        reply = reply if reply is not None else tonetune_behaviour(request)
        if self.latency is not None:
            delay = self.latency(title, step)
            return FakeReply(content=reply, delay_s=delay) if isinstance(reply, str) else reply
        return reply


def calls_for(server, title: str, step: str) -> int:
    return sum(step_and_title(request) == (step, title) for request in server.requests)


def generate(tmp_path, embedder, sections, behaviour, name="run", **overrides):
    config = generate_config(**overrides)
    with FakeOpenAIServer(chat=behaviour) as server:
        cache = ResponseCache(tmp_path / f"{name}.jsonl")
        try:
            result = run(config, openai_backend(server, config), cache, embedder, sections)
        finally:
            cache.close()
    by_title = {candidate.title: candidate for candidate in result.ledger}
    return result, by_title, server


def test_simplification_is_asked_at_most_three_times(tmp_path, embedder):
    simple = "Jazz is music from New Orleans. You make it up as you go."
    behaviour = Generator({
        ("Volcanoes", "rephrase"): [HARD], ("Volcanoes", "simplify"): [HARD],
        ("Jazz", "rephrase"): [HARD], ("Jazz", "simplify"): [HARD, simple],
    })
    result, by_title, server = generate(tmp_path, embedder, topic_sections(3), behaviour)
    volcanoes, jazz, cats = by_title["Volcanoes"], by_title["Jazz"], by_title["Cats"]
    assert calls_for(server, "Volcanoes", "simplify") == 3 and calls_for(server, "Volcanoes", "rephrase") == 1
    assert volcanoes.reason == "flesch_after_retries" and len(volcanoes.flesch_attempts) == 4
    assert max(volcanoes.flesch_attempts) < 75
    assert jazz.reason == "accepted" and len(jazz.flesch_attempts) == 3 and jazz.answer == simple
    assert jazz.flesch_attempts[-1] == flesch_reading_ease(simple) >= 75
    assert calls_for(server, "Jazz", "simplify") == 2
    assert cats.reason == "accepted" and cats.flesch_attempts[0] >= 75 and calls_for(server, "Cats", "simplify") == 0
    # A rejected candidate still records its nearest earlier-accepted question (here: Cats').
    vectors = embedder.encode([volcanoes.question, cats.question])
    assert volcanoes.nearest_id == cats.id
    assert abs(volcanoes.nearest_similarity - float(vectors[0] @ vectors[1])) < 1e-5


def test_max_simplify_attempts_is_a_param(tmp_path, embedder):
    behaviour = Generator({("Volcanoes", "rephrase"): [HARD], ("Volcanoes", "simplify"): [HARD]})
    _, by_title, server = generate(tmp_path, embedder, topic_sections(2), behaviour, max_simplify_attempts=1)
    assert calls_for(server, "Volcanoes", "simplify") == 1
    assert len(by_title["Volcanoes"].flesch_attempts) == 2


def test_faithfulness_and_dedup_decisions(tmp_path, embedder):
    sections = topic_sections(4) + [
        Section(4, "s004", "The cat", "Cats are small pets that like to nap in the sun all day long."),
        Section(5, "s005", "Tea drinks", "Tea is a drink made from leaves."),
    ]
    unrelated = "My uncle has a red bike. He rides it to the park on Sunday."
    behaviour = Generator({("Bread", "rephrase"): [unrelated]})
    result, by_title, _ = generate(tmp_path, embedder, sections, behaviour, faithfulness_threshold=0.6,
                                   dedup_threshold=0.8)
    bread = by_title["Bread"]
    assert bread.reason == "unfaithful" and bread.faithfulness < 0.6
    assert all(c.faithfulness is not None for c in result.ledger)  # recorded for every candidate
    assert by_title["Cats"].faithfulness >= 0.6
    # "What should I know about The cat?" repeats "... about Cats?" from earlier in source order.
    duplicate = by_title["The cat"]
    assert duplicate.reason == f"duplicate_of:{by_title['Cats'].id}"
    assert duplicate.nearest_similarity > 0.8 and duplicate.nearest_id == by_title["Cats"].id
    assert by_title["Tea drinks"].reason == "accepted"
    # Recomputed independently: no two accepted questions above the threshold.
    vectors = embedder.encode([pair.question for pair in result.pairs])
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, 0)
    assert similarity.max() <= 0.8
    assert [pair.title for pair in result.pairs] == ["Cats", "Volcanoes", "Jazz", "Tea drinks"]


def test_malformed_json_is_retried_with_a_correction_then_rejected(tmp_path, embedder):
    fenced = "```json\n" + json.dumps({"question": "What should I know about Jazz?", "answer": "It swings."}) + "\n```"
    behaviour = Generator({
        ("Cats", "qa"): ["Sure! Here you go: question: why? answer: because."],
        ("Jazz", "qa"): ["{not json", fenced + "\nHope that helps."],
    })
    _, by_title, server = generate(tmp_path, embedder, topic_sections(3), behaviour, max_json_attempts=3)
    cats, jazz = by_title["Cats"], by_title["Jazz"]
    assert cats.reason == "bad_json" and cats.qa_attempts == 3 and calls_for(server, "Cats", "qa") == 3
    assert "no JSON object" in cats.error
    last_request = [r for r in server.requests if step_and_title(r) == ("qa", "Cats")][-1]
    assert [m["role"] for m in last_request.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert jazz.reason == "accepted" and jazz.qa_attempts == 2 and jazz.factual_answer == "It swings."


def test_api_error_after_retries_goes_to_the_ledger_and_the_run_goes_on(tmp_path, embedder):
    behaviour = Generator({("Volcanoes", "rephrase"): [FakeReply.error(502, "bad gateway")]})
    result, by_title, server = generate(tmp_path, embedder, topic_sections(3), behaviour, max_retries=2)
    volcanoes = by_title["Volcanoes"]
    assert volcanoes.reason == "api_error" and "bad gateway" in volcanoes.error
    assert calls_for(server, "Volcanoes", "rephrase") == 3
    assert [pair.title for pair in result.pairs] == ["Cats", "Jazz"]
    assert result.stats.requests_failed == 1


def test_stops_exactly_at_the_target(tmp_path, embedder):
    result, _, server = generate(tmp_path, embedder, topic_sections(40), Generator(), target_pairs=5,
                                 concurrency=2)
    assert len(result.pairs) == 5 and result.stop_reason == "target_reached"
    assert [pair.title for pair in result.pairs] == [title for title, _ in topic_sections_titles(5)]
    # Launching stopped near the target: one block of sections at most, not all 40.
    assert server.chat_calls <= 2 * 16 + 8


def topic_sections_titles(n):
    return [(s.title, s) for s in topic_sections(n)]


def test_results_do_not_depend_on_timing(tmp_path, embedder):
    """Two runs with different random latencies (and the earlier twin deliberately slow, so it
    finishes after the later one) give identical pairs and ledgers."""
    sections = topic_sections(20) + [Section(20, "s020", "Cats!", "Cats nap in the sun a lot, every single day.")]
    sections[0], sections[20] = (Section(0, "s020", "Cats!", sections[20].text),
                                 Section(20, "s000", "Cats", sections[0].text))

    def latency(seed):
        rng = random.Random(seed)
        lock = threading.Lock()

        def pick(title, step):
            with lock:
                return 0.3 if title == "Cats!" else rng.uniform(0, 0.05)
        return pick

    outcomes = []
    for seed in (1, 2):
        result, by_title, server = generate(tmp_path, embedder, sections, Generator(latency=latency(seed)),
                                            name=f"timing{seed}", concurrency=8)
        outcomes.append(([c.ledger_record() for c in result.ledger], [p.pair_record() for p in result.pairs]))
        # The slow earlier twin wins: decisions follow source order, not completion order.
        assert by_title["Cats!"].reason == "accepted"
        assert by_title["Cats"].reason == f"duplicate_of:{by_title['Cats!'].id}"
    assert outcomes[0] == outcomes[1]


def test_replay_backend_runs_through_the_same_engine(tmp_path, embedder):
    from pipeline.generate.replay import ReplayBackend, load_recordings

    def record(section_id, title, question, answer, rephrasings, **extra):
        return {"source_id": section_id, "title": title, "question": question, "factual_answer": answer,
                "rephrasings": rephrasings, **extra}

    sections = topic_sections(6)
    directory = write_recordings(tmp_path / "rec", [
        record("s000", "Cats", "Why do cats nap in the sun?", "Cats nap in the sun because it keeps them warm.",
               ["They nap in the sun to stay warm."]),
        record("s001", "Volcanoes", "Where does lava come from?",
               "Lava is molten rock that rises from deep below the surface.",
               [HARD, "It is melted rock. It comes up from deep down."]),
        record("s002", "Jazz", "Where was jazz born?", "Jazz was born in New Orleans.",
               ["Jazz was born in New Orleans, so it is a southern sound."], qa_replies=["oops", "```json\n{\"question\": \"Where was jazz "
                                                                     "born?\", \"answer\": \"Jazz was born in New Orleans.\"}\n```"]),
        record("s003", "Bread", "How is bread made?", "Bread is made from flour, water and yeast.",
               [HARD, HARD, HARD, HARD]),
        # s004 (Chess) has no recording
        record("s005", "Rain", "Why do cats like to nap in the sun?", "To stay warm.", ["To keep warm, really."]),
    ])
    config = generate_config(backend="replay", replay_dir=str(directory))
    cache = ResponseCache(tmp_path / "replay-cache.jsonl")
    result = run(config, ReplayBackend(load_recordings(directory)), cache, embedder, sections)
    cache.close()
    reasons = {c.source_id: c.reason for c in result.ledger}
    assert reasons["s000"] == "accepted"
    assert reasons["s001"] == "accepted" and len(result.ledger[1].flesch_attempts) == 2
    assert reasons["s002"] == "accepted" and result.ledger[2].qa_attempts == 2
    assert reasons["s003"] == "flesch_after_retries" and len(result.ledger[3].flesch_attempts) == 4
    assert reasons["s004"] == "not_recorded" and result.ledger[4].requests == 0
    assert reasons["s005"] == f"duplicate_of:{result.ledger[0].id}"
    # qa + rephrase (+ simplify) per recorded section: 2 + 3 + (2 qa + 1) + (1 + 1 + 3) + 2
    assert result.stats.api_calls == 2 + 3 + 3 + 5 + 2
