"""The paper's data pipeline (section 2.2) for many sections at once, decided in source order.

Per section (`generate_candidate`, concurrent across sections):

  (a) ask for one interesting question and its answer as JSON; a reply that cannot be parsed
      (fences, whitespace and trailing text are tolerated) is answered with a correction, up to
      `max_json_attempts` tries in all, then the candidate is rejected as `bad_json`;
  (b) ask for the answer rephrased in a conversational tone, same meaning;
  (c) accept the rephrasing if it passes the tone's gate (`tone.gate`, all criteria; the paper's:
      Flesch reading ease >= 75), else ask for a simpler one, at most `max_simplify_attempts`
      times, then reject `flesch_after_retries` (the reason keeps its name whatever the gate).
  An API failure that survives the client's retries rejects the candidate as `api_error`.

Then, strictly in source order (`Engine._commit`, one block of sections at a time):

  faithfulness: cosine(factual answer, conversational answer) must reach
      `faithfulness_threshold`, else `unfaithful` (recorded for every candidate that has both);
  (d) dedup: a question with cosine > `dedup_threshold` to any accepted question is rejected as
      `duplicate_of:<id of that pair>`.

Why source order: requests finish in whatever order the network decides, but which of two
similar questions is kept must not depend on that, or two runs (or a run and its resume after a
crash) would produce different datasets. Sections are grouped in fixed blocks of BLOCK_SIZE
positions; a block is committed when all its sections are done and every earlier block is
committed (a reorder buffer), and its texts are embedded in one batch (the same batch every
run, so even floating-point rounding cannot differ). Blocks are launched ahead, up to about
`WINDOW_PER_SLOT` x `concurrency` sections (at least three blocks), and launching stops once the accepted pairs plus
the sections still in flight could reach `target_pairs`; the run then commits in order and
stops exactly at the target or when the sources run out.

Budget (`generate.client.max_cost_usd`): the client reserves each attempt's worst case before
sending it and refuses one that would pass the cap (`BudgetExhausted`). The first section, in source order, that needed a refused
request is recorded in the ledger as `budget_exhausted` and the run stops there
(`stop_reason` "budget_exhausted"): everything before it is committed as usual; answers that
arrived for later sections stay in the cache, so a re-run with a higher cap continues from
exactly that section without paying for anything twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.llmclient import (
    BudgetExhausted,
    CallStats,
    ChatClient,
    FatalAPIError,
    RequestFailed,
    StepKey,
)
from pipeline.core.textmetrics import NearDuplicateIndex, flesch_reading_ease
from pipeline.core.tone import Criteria
from pipeline.generate import prompts

if TYPE_CHECKING:
    from pipeline.core.config import GenerateConfig

BLOCK_SIZE = 16
DEFAULT_GATE = Criteria.flesch_at_least(75.0)  # the paper's (and the default tone's) gate
WINDOW_PER_SLOT = 4
REASONS = ("accepted", "bad_json", "flesch_after_retries", "unfaithful", "duplicate", "api_error", "not_recorded",
           "budget_exhausted")
NOT_CANDIDATES = ("not_recorded", "budget_exhausted")  # nothing was decided about these sections


@dataclass(frozen=True)
class Section:
    """One source text, at its position in generation order."""

    position: int
    source_id: str
    title: str
    text: str


@dataclass
class Candidate:
    """Everything that happened to one section; becomes a ledger line (and maybe a pair)."""

    position: int
    source_id: str
    title: str
    reason: str | None = None  # None while undecided
    id: str | None = None  # set when accepted
    question: str | None = None
    factual_answer: str | None = None
    answer: str | None = None  # the last conversational rephrasing
    flesch_attempts: list[float] = field(default_factory=list)
    faithfulness: float | None = None
    nearest_similarity: float | None = None  # cosine of the question to the nearest accepted one
    nearest_id: str | None = None
    qa_attempts: int = 0
    requests: int = 0  # chat requests this candidate needed (cache hits included)
    error: str | None = None
    repaid_requests: list[str] = field(default_factory=list)  # "step/attempt" sent again after a crash

    @property
    def flesch(self) -> float | None:
        return self.flesch_attempts[-1] if self.flesch_attempts else None

    def ledger_record(self) -> dict[str, Any]:
        return {
            "position": self.position, "source_id": self.source_id, "title": self.title,
            "reason": self.reason, "id": self.id, "question": self.question,
            "factual_answer": self.factual_answer, "answer": self.answer,
            "flesch_attempts": [round(score, 4) for score in self.flesch_attempts],
            "faithfulness": _round(self.faithfulness), "nearest_similarity": _round(self.nearest_similarity),
            "nearest_id": self.nearest_id, "qa_attempts": self.qa_attempts, "requests": self.requests,
            "error": self.error, "repaid_requests": self.repaid_requests,
        }

    def pair_record(self) -> dict[str, Any]:
        return {
            "id": self.id, "source_id": self.source_id, "title": self.title, "question": self.question,
            "answer": self.answer, "factual_answer": self.factual_answer, "flesch": self.flesch,
            "faithfulness": self.faithfulness, "attempts": len(self.flesch_attempts),
            "nearest_similarity": self.nearest_similarity, "position": self.position,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def pair_id(source_id: str, question: str) -> str:
    """Stable id of a pair: a hash of its section and question (same data, same id)."""
    return hashlib.sha256(f"{source_id}\x1f{question}".encode()).hexdigest()[:16]


def reason_group(reason: str) -> str:
    """`duplicate_of:<id>` counts as `duplicate`; the other reasons are their own group."""
    return "duplicate" if reason.startswith("duplicate_of:") else reason


# --------------------------------------------------------------------------- one section


async def ask_question(client: ChatClient, section: Section, candidate: Candidate, max_attempts: int,
                       texts: prompts.GenerationPrompts = prompts.DEFAULT) -> bool:
    """Step (a): a parsed (question, answer), retrying malformed replies with a correction."""
    bad_replies: list[tuple[str, str]] = []
    for attempt in range(max_attempts):
        candidate.qa_attempts = attempt + 1
        candidate.requests += 1
        messages = texts.qa_messages(section.title, section.text, bad_replies)
        reply = await client.complete(messages, StepKey(section.source_id, "qa", attempt))
        try:
            candidate.question, candidate.factual_answer = prompts.parse_qa_reply(reply.content)
            candidate.error = None
            return True
        except prompts.MalformedReply as problem:
            # Some APIs refuse an empty assistant turn: replay it as a visible placeholder.
            bad_replies.append((reply.content or "(empty reply)", str(problem)))
            candidate.error = f"qa reply {attempt + 1}: {problem}"
    return False


def gate_failures(answer: str, gate: Criteria) -> tuple[float, list[str]]:
    """(Flesch reading ease, the gate criteria the answer fails); an empty answer fails them all."""
    flesch = flesch_reading_ease(answer) if answer else 0.0
    if not answer:
        return flesch, [f"{c.metric}: empty answer" for c in gate.criteria]
    scores = {"flesch": flesch} if gate.columns == ("flesch",) else {
        column: float(values[0]) for column, values in gate.score([answer]).items()}
    return flesch, gate.failures(scores)


async def rephrase_until_simple(client: ChatClient, section: Section, candidate: Candidate, config: GenerateConfig,
                                gate: Criteria | None = None,
                                texts: prompts.GenerationPrompts = prompts.DEFAULT) -> bool:
    """Steps (b) and (c): a rephrasing in the tone that passes the gate (default: Flesch >= 75),
    or give up. Each attempt's Flesch reading ease is recorded whatever the gate measures."""
    gate = gate or DEFAULT_GATE
    candidate.requests += 1
    messages = texts.rephrase_messages(candidate.question, candidate.factual_answer)
    reply = await client.complete(messages, StepKey(section.source_id, "rephrase", 0))
    tried: list[tuple[str, float, list[str]]] = []
    for simplification in range(1, config.max_simplify_attempts + 2):
        candidate.answer = prompts.clean_rephrasing(reply.content)
        score, failed = gate_failures(candidate.answer, gate)
        candidate.flesch_attempts.append(score)
        if not failed:
            return True
        if simplification > config.max_simplify_attempts:
            return False
        tried.append((candidate.answer or "(empty reply)", score, failed))
        candidate.requests += 1
        messages = texts.simplify_messages(candidate.question, candidate.factual_answer, tried,
                                             gate.criteria[0].threshold)
        reply = await client.complete(messages, StepKey(section.source_id, "simplify", simplification))
    return False  # pragma: no cover (the loop always returns)


async def generate_candidate(client: ChatClient, section: Section, config: GenerateConfig,
                             gate: Criteria | None = None,
                             texts: prompts.GenerationPrompts = prompts.DEFAULT) -> Candidate:
    """Steps (a)-(c) for one section. Never raises for API trouble except FatalAPIError."""
    candidate = Candidate(section.position, section.source_id, section.title)
    try:
        if not await ask_question(client, section, candidate, config.max_json_attempts, texts):
            candidate.reason = "bad_json"
        elif not await rephrase_until_simple(client, section, candidate, config, gate, texts):
            candidate.reason = "flesch_after_retries"
    except RequestFailed as error:
        candidate.reason = "api_error"
        candidate.error = " ".join(str(error).split())[:500]
    return candidate


# --------------------------------------------------------------------------- the run


@dataclass
class GenerationResult:
    """What a run produced: accepted pairs and the ledger (both in source order), and counters."""

    pairs: list[Candidate]
    ledger: list[Candidate]
    stats: CallStats
    wall_time_s: float
    sections_total: int
    stop_reason: str  # target_reached | sources_exhausted | budget_exhausted

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(REASONS, 0)
        for candidate in self.ledger:
            counts[reason_group(candidate.reason)] += 1
        return counts


@dataclass
class _Block:
    sections: list[Section]
    tasks: list[asyncio.Task | None]  # None: not recorded, nothing to ask
    launched: int


class Engine:
    """Runs sections through the client concurrently and commits them in source order."""

    def __init__(self, client: ChatClient, embedder: Any, config: GenerateConfig, progress: Any = None,
                 gate: Criteria | None = None, texts: prompts.GenerationPrompts = prompts.DEFAULT):
        self.client = client
        self.embedder = embedder
        self.config = config
        self.gate = gate or DEFAULT_GATE
        self.texts = texts
        self.progress = progress
        self.index = NearDuplicateIndex(embedder.dim, config.dedup_threshold)
        self.pairs: list[Candidate] = []
        self.ledger: list[Candidate] = []
        self._accepted_ids: list[str] = []
        # At least three blocks in flight, so the next block is busy while the head one commits.
        self.window = max(3 * BLOCK_SIZE, WINDOW_PER_SLOT * config.client.concurrency)

    async def run(self, sections: Sequence[Section]) -> GenerationResult:
        """Generate until `target_pairs` are accepted or the sections run out."""
        started = time.perf_counter()
        blocks = [list(sections[i : i + BLOCK_SIZE]) for i in range(0, len(sections), BLOCK_SIZE)]
        pending: deque[_Block] = deque()
        abort: asyncio.Future = asyncio.get_running_loop().create_future()
        next_block, stop_reason = 0, "sources_exhausted"
        try:
            while True:
                while next_block < len(blocks) and self._may_launch(pending):
                    pending.append(self._launch(blocks[next_block], abort))
                    next_block += 1
                if not pending:
                    if next_block < len(blocks):  # nothing launched: only the budget stops that
                        section = blocks[next_block][0]
                        self.ledger.append(Candidate(section.position, section.source_id, section.title,
                                                     reason="budget_exhausted",
                                                     error=f"cost cap ${self.client.budget.cap_usd:g} reached"))
                        stop_reason = "budget_exhausted"
                    break
                candidates = await self._finished(pending[0], abort)
                pending.popleft()
                budget_hit = await self._commit(candidates)
                if len(self.pairs) >= self.config.target_pairs:
                    stop_reason = "target_reached"
                    break
                if budget_hit:
                    stop_reason = "budget_exhausted"
                    break
        finally:
            await self._cancel(pending)
            if abort.done() and not abort.cancelled():
                abort.exception()  # retrieved: it was raised above, or is moot
        return GenerationResult(self.pairs, self.ledger, self.client.stats, time.perf_counter() - started,
                                len(sections), stop_reason)

    def _may_launch(self, pending: deque[_Block]) -> bool:
        """Launch another block while the window has room and the target is not yet reachable."""
        in_flight = sum(block.launched for block in pending)
        if self.client.budget_exhausted():
            return False  # nothing more can be sent; what is launched still commits
        return in_flight < self.window and len(self.pairs) + in_flight < self.config.target_pairs

    def _launch(self, sections: list[Section], abort: asyncio.Future) -> _Block:
        tasks = [
            asyncio.create_task(self._run_section(section, abort))
            if self.client.backend.has_source(section.source_id) else None
            for section in sections
        ]
        return _Block(sections, tasks, sum(task is not None for task in tasks))

    async def _run_section(self, section: Section, abort: asyncio.Future) -> Candidate:
        try:
            return await generate_candidate(self.client, section, self.config, self.gate, self.texts)
        except BudgetExhausted as error:
            return Candidate(section.position, section.source_id, section.title, reason="budget_exhausted",
                             error=str(error))
        except FatalAPIError as error:
            if not abort.done():
                abort.set_exception(error)
            raise

    async def _finished(self, block: _Block, abort: asyncio.Future) -> list[Candidate]:
        """Wait for every section of `block`; a fatal API error anywhere ends the wait at once."""
        tasks = [task for task in block.tasks if task is not None]
        if tasks:
            everything = asyncio.gather(*tasks)
            await asyncio.wait({everything, abort}, return_when=asyncio.FIRST_COMPLETED)
            if abort.done():
                if everything.done():
                    everything.exception()  # retrieved: the same fatal error is raised below
                else:
                    everything.cancel()
                raise abort.exception()
            everything.result()
        candidates = []
        for section, task in zip(block.sections, block.tasks, strict=True):
            if task is None:
                candidates.append(Candidate(section.position, section.source_id, section.title, reason="not_recorded"))
            else:
                candidates.append(task.result())
        return candidates

    async def _cancel(self, pending: deque[_Block]) -> None:
        tasks = [task for block in pending for task in block.tasks if task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _commit(self, candidates: list[Candidate]) -> bool:
        """Faithfulness and dedup for one block, in source order; stop at the target, or at the
        first section the budget refused (recorded, then True: the run stops)."""
        refused = next((i for i, c in enumerate(candidates) if c.reason == "budget_exhausted"), None)
        if refused is not None:
            candidates = candidates[: refused + 1]
        repaid: dict[str, list[str]] = {}
        for step in self.client.repaid_steps:
            repaid.setdefault(step.source_id, []).append(f"{step.step}/{step.attempt}")
        for candidate in candidates:
            candidate.repaid_requests = sorted(repaid.get(candidate.source_id, []))
        questions = [c for c in candidates if c.question]
        both = [c for c in candidates if c.factual_answer and c.answer]
        texts = [c.question for c in questions] + [c.factual_answer for c in both] + [c.answer for c in both]
        # One batch per block, in a worker thread so replies keep flowing in meanwhile.
        vectors = await asyncio.to_thread(self.embedder.encode, texts, False) if texts else None
        question_vector = {id(c): vectors[i] for i, c in enumerate(questions)}
        if both:
            factual = vectors[len(questions) : len(questions) + len(both)]
            conversational = vectors[len(questions) + len(both) :]
            for candidate, score in zip(both, np.einsum("ij,ij->i", factual, conversational), strict=True):
                candidate.faithfulness = float(score)
        for candidate in candidates:
            if candidate.reason is None and candidate.faithfulness < self.config.faithfulness_threshold:
                candidate.reason = "unfaithful"

        stored = len(self.index)  # questions accepted before this block
        passing = [c for c in candidates if c.reason is None]
        verdicts = self.index.add(np.stack([question_vector[id(c)] for c in passing])) if passing else None
        row_of = {id(c): row for row, c in enumerate(passing)}
        others = [c for c in questions if id(c) not in row_of]
        earlier = self._similarities_to_earlier(others, question_vector, stored)
        accepted_here: list[tuple[int, str]] = []  # (index row, pair id) accepted in this block
        for candidate in candidates:
            if id(candidate) in row_of:
                row = row_of[id(candidate)]
                if verdicts.nearest[row] >= 0:
                    candidate.nearest_similarity = float(verdicts.similarity[row])
                    candidate.nearest_id = self._accepted_ids[int(verdicts.nearest[row])]
                if verdicts.accepted[row]:
                    candidate.reason = "accepted"
                    candidate.id = pair_id(candidate.source_id, candidate.question)
                    accepted_here.append((len(self._accepted_ids), candidate.id))
                    self._accepted_ids.append(candidate.id)
                    self.pairs.append(candidate)
                else:
                    candidate.reason = f"duplicate_of:{candidate.nearest_id}"
            elif id(candidate) in earlier:
                self._record_nearest(candidate, question_vector[id(candidate)], earlier[id(candidate)],
                                     accepted_here)
            self.ledger.append(candidate)
            if self.progress is not None:
                self.progress.committed(candidate, self.client.stats)
            if len(self.pairs) >= self.config.target_pairs:
                break
        return refused is not None

    def _similarities_to_earlier(self, others: list[Candidate], question_vector: dict, stored: int) -> dict:
        """(best cosine, row) of each rejected candidate's question among the questions accepted
        before this block: one matrix product for the block, no copy of the index."""
        if not others:
            return {}
        if not stored:
            return {id(c): (-2.0, -1) for c in others}
        similarities = np.stack([question_vector[id(c)] for c in others]) @ self.index.vectors[:stored].T
        rows = similarities.argmax(axis=1)
        return {id(c): (float(similarities[i, rows[i]]), int(rows[i])) for i, c in enumerate(others)}

    def _record_nearest(self, candidate: Candidate, vector: np.ndarray, earlier: tuple[float, int],
                        accepted_here: list[tuple[int, str]]) -> None:
        """For a candidate that never reached the dedup gate: its nearest earlier-accepted
        question, among those of earlier blocks and those accepted before it in this block."""
        best, row = earlier
        best_id = self._accepted_ids[row] if row >= 0 else None
        for index_row, other_id in accepted_here:
            similarity = float(self.index.vectors[index_row] @ vector)
            if similarity > best:
                best, best_id = similarity, other_id
        if best_id is not None:
            candidate.nearest_similarity, candidate.nearest_id = best, best_id


class ProgressBar:
    """tqdm bar: accepted/target with ETA, plus calls, cache hits and errors as they change."""

    def __init__(self, target: int, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(total=target, unit="pair", desc="generate", disable=not enabled, mininterval=0.5,
                         dynamic_ncols=True)
        self._ticker: asyncio.Task | None = None

    def committed(self, candidate: Candidate, stats: CallStats) -> None:
        if candidate.reason == "accepted":
            self._bar.update(1)
        self._postfix(stats)

    def _postfix(self, stats: CallStats) -> None:
        self._bar.set_postfix(calls=stats.api_calls, cached=stats.cache_hits, errors=stats.errors, refresh=False)

    async def tick(self, stats: CallStats, every_s: float = 1.0) -> None:
        """Refresh the counters while the head of the queue is still waiting for replies."""
        while True:
            await asyncio.sleep(every_s)
            self._postfix(stats)
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
