"""A style metric scored by an LLM following a rubric: `rubric:<name>`.

The rubric is a text file of the tone's prompts folder, `<tone.prompts>/rubric_<name>.txt`, under
version control like the other prompts. It is a template: `{answer}` (required) is the answer to
score, `{description}` may appear (params `tone.description`); a literal brace is `{{` or `}}`.
Each answer is sent once, as the user turn of a chat request, after the rubric's text and then
the form to fill, `{"reasoning": "...", "score": <an integer from 1 to 5>}`. The score is the
metric (1..5, higher: more of what the rubric asks for; column `rubric_<name>`).

The requests go through the judge's client (params `judge.model`, `judge.max_tokens`,
`judge.seed`, `judge.client`: endpoint, key variable, concurrency, rate limits, retries, prices,
cap), by pipeline.core.llmclient.ChatClient:

- temperature 0 and the judge's seed, so the same answer gets the same score;
- cached in data/cache/rubric/responses.jsonl (pipeline.core.responsecache; not a DVC output: a
  cache shared by the stages that score on-style): a re-run sends nothing and gives the same
  scores; the key covers the model, the filled messages (so an edited rubric is asked again),
  temperature, max tokens and seed;
- priced and capped: `judge.model` must have a price in `judge.client.prices` (or
  `judge.client.allow_unpriced: true`, then no cap), checked before anything is sent; every
  attempt reserves its worst case against `judge.client.max_cost_usd`, a cap on each stage
  run's rubric scoring (cached answers count towards it), and an attempt that would pass it is
  not sent: one line;
- the key only from the environment variable `judge.client.api_key_env`, read only when an answer
  is not in the cache (a fully cached re-run needs none), never logged;
- transient HTTP failures (429, 5xx, timeouts, a body that is not JSON) are retried by the
  client's policy (`judge.client.max_retries`, back-off); a reply that is not the asked JSON is
  asked again with a correction turn, up to MAX_REPLY_ATTEMPTS in all, then the stage fails in
  one line naming the answer (the replies are cached, so a re-run fails the same way: change the
  rubric or the model).

Which stages: a rubric is an on-style metric (`tone.on_style`, scored by score, heldout, the
OpenAI arm and promote, which pass `config.judge`); params validation refuses it in `tone.gate`,
which the generator checks on every attempt inside its own event loop. dvc.yaml does not list the
rubric file or the `judge` params as dependencies of those stages: after editing either, re-run
them with `dvc repro --force` (the cache asks only what changed).

What this module does not do: the judge stage's G-Eval and pairwise judgements (pipeline.judge).
"""

from __future__ import annotations

import asyncio
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import TonetuneError
from pipeline.core.llmclient import Budget, parse_json_object
from pipeline.core.metricnames import StyleMetric, metric_column
from pipeline.core.prompts import prompts_dir, read_prompt

if TYPE_CHECKING:
    import numpy as np

    from pipeline.core.config import JudgeConfig
    from pipeline.core.llmclient import Reply, RequestSettings, StepKey
    from pipeline.core.metricnames import MetricContext

SPEC = re.compile(r"^rubric:(?P<name>[a-z][a-z0-9_]*)$")
CACHE_PATH = Path("data/cache/rubric/responses.jsonl")
CLIENT_SECTION = "judge.client"
SCALE = (1, 5)
TEMPERATURE = 0.0
MAX_REPLY_ATTEMPTS = 3  # the first ask and two corrections
FIELDS = ("answer", "description")
SYSTEM = "You are a careful judge of the style of answers. You reply with one JSON object only."
FORM = ('Reply with a JSON object {"reasoning": "<one or two sentences>", '
        f'"score": <an integer from {SCALE[0]} to {SCALE[1]}>}}.')
CORRECTION = "That was not the JSON object asked for ({problem}). "  # then FORM (its braces are literal)


def rubric_file(metric: str, context: MetricContext | None) -> Path:
    """`<tone.prompts>/rubric_<name>.txt` of a `rubric:<name>` metric."""
    match = SPEC.match(metric)
    if not match:
        raise TonetuneError(f"tone metric {metric!r}: expected `rubric:<name>` (lower-case letters, digits, _)")
    if context is None:
        raise TonetuneError(f"tone metric {metric!r}: needs the tone's prompts folder and the judge's params; "
                            "this caller scores without them")
    return prompts_dir(context.prompts) / f"rubric_{match['name']}.txt"


def _read_template(metric: str, path: Path):
    if not path.is_file():
        raise TonetuneError(f"tone metric {metric!r}: rubric file {path} not found (tone.prompts names the folder)")
    prompt = read_prompt(path, path.stem)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(prompt.template) if name is not None}
    except ValueError as error:
        raise TonetuneError(f"{path}: not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(fields - set(FIELDS))
    if unknown or "answer" not in fields:
        problem = f"unknown placeholder(s) {', '.join('{' + f + '}' for f in unknown)}" if unknown else "no {answer}"
        raise TonetuneError(f"{path}: {problem}: a rubric needs {{answer}} (the answer to score) and may use "
                            "{description}; write a literal brace as {{ or }}")
    return prompt


def check(metric: str, context: MetricContext | None):
    """The checks before anything is sent: the syntax, the judge's params, the rubric file and
    its placeholders, and the judge model's price (unpriced: refused unless allow_unpriced).
    Returns the rubric's PromptFile."""
    path = rubric_file(metric, context)
    if context.judge is None:
        raise TonetuneError(f"tone metric {metric!r}: needs the judge's model and client (params judge); this "
                            "caller scores without them (rubrics are scored by score, heldout, the OpenAI arm "
                            "and promote, in tone.on_style)")
    prompt = _read_template(metric, path)
    try:
        context.judge.client.check_priced([context.judge.model], CLIENT_SECTION)
    except TonetuneError as error:
        raise TonetuneError(f"tone metric {metric!r}: {error}") from None
    return prompt


# --------------------------------------------------------------------------- replies

def parse_score(text: str) -> tuple[float | None, str]:
    """(the score, None when the reply is not the asked form; what is wrong with it)."""
    value = parse_json_object(text)
    if value is None:
        return None, "no JSON object"
    score = value.get("score")
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            return None, f"score {value.get('score')!r} is not a number"
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return None, "no numeric score"
    if not SCALE[0] <= score <= SCALE[1]:
        return None, f"score {score:g} is not between {SCALE[0]} and {SCALE[1]}"
    return float(score), ""


class BadReply(Exception):
    """A reply that stayed off the asked form after MAX_REPLY_ATTEMPTS."""

    def __init__(self, index: int, content: str, problem: str):
        super().__init__(problem)
        self.index, self.content, self.problem = index, content, problem


class _KeylessBackend:
    """Answers nothing: what a client without a key is built on, so that a fully cached re-run
    needs no key. Its cache identity is OpenAIBackend's, so the cache keys are the same."""

    name = "openai"

    def __init__(self, message: str):
        self.message = message

    def cache_identity(self, step: StepKey) -> str:
        return "openai"

    def has_source(self, source_id: str) -> bool:
        return True

    async def send(self, messages, step: StepKey, settings: RequestSettings) -> Reply:
        from pipeline.core.llmclient import FatalAPIError

        raise FatalAPIError(self.message)

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- scoring


@dataclass
class RubricScorer:
    """One rubric with the judge's client: its budget spans every call in this process (a
    stage run), its cache is the file at `cache_path`."""

    metric: str
    prompt: Any  # PromptFile
    description: str
    judge: JudgeConfig
    budget: Any  # llmclient.Budget
    cache_path: Path = CACHE_PATH

    def messages(self, answer: str) -> list[dict[str, str]]:
        from pipeline.core.prompts import fill

        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": fill(self.prompt, self.description, answer=answer) + "\n\n" + FORM}]

    def settings(self) -> RequestSettings:
        from pipeline.core.llmclient import RequestSettings

        return RequestSettings(self.judge.model, TEMPERATURE, self.judge.max_tokens, self.judge.seed,
                               self.judge.client.request_timeout_s)

    def scores(self, texts: list[str]) -> np.ndarray:
        """The rubric's score of every text (float64, input order); one line on any failure."""
        import numpy as np

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            values = asyncio.run(self._score(texts))
        else:  # called from inside an event loop: run ours in a thread of its own
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(1) as pool:
                values = pool.submit(asyncio.run, self._score(texts)).result()
        return np.asarray(values, dtype=np.float64)

    async def _score(self, texts: list[str]) -> list[float]:
        from pipeline.core.llmclient import ChatClient, OpenAIBackend, StepKey, raise_on_failed_replies
        from pipeline.core.responsecache import ResponseCache

        client_config = self.judge.client
        cache = ResponseCache(self.cache_path)
        key_env = client_config.api_key_env
        no_key = (f"environment variable {key_env} is not set ({CLIENT_SECTION}.api_key_env): tone metric "
                  f"{self.metric!r} asks {self.judge.model}")
        backend: Any = _KeylessBackend(no_key + "; nothing was sent")
        client = ChatClient(backend, cache, self.settings(), client_config, budget=self.budget)
        try:
            first = [self.messages(text) for text in texts]
            uncached = sum(client.key(messages, StepKey(str(i), "rubric", 0)) not in cache
                           for i, messages in enumerate(first))
            if uncached:
                key = os.environ.get(key_env, "").strip()
                if not key:
                    raise TonetuneError(f"{no_key} about {uncached} answer(s) not in the cache {self.cache_path}: "
                                        "export the judge endpoint's key; nothing was sent")
                backend = OpenAIBackend(client_config.base_url, key, client_config.concurrency,
                                        client_config.request_timeout_s)
                client.backend = backend

            async def one(index: int, messages: list[dict[str, str]]) -> float:
                for attempt in range(MAX_REPLY_ATTEMPTS):
                    reply = await client.complete(messages, StepKey(str(index), "rubric", attempt))
                    score, problem = parse_score(reply.content)
                    if score is not None:
                        return score
                    messages = [*messages, {"role": "assistant", "content": reply.content or "(empty reply)"},
                                {"role": "user", "content": CORRECTION.format(problem=problem) + FORM}]
                raise BadReply(index, reply.content, problem)

            results = await asyncio.gather(*(one(i, messages) for i, messages in enumerate(first)),
                                           return_exceptions=True)
        finally:
            await backend.aclose()
            cache.close()
        raise_on_failed_replies([None if isinstance(r, BadReply) else r for r in results],
                                f"{self.metric!r}", self.judge.model)
        bad = next((r for r in results if isinstance(r, BadReply)), None)
        if bad is not None:
            excerpt = " ".join((bad.content or "").split())[:120]
            raise TonetuneError(f"tone metric {self.metric!r}: {self.judge.model}'s reply about answer {bad.index} "
                                f"is not the asked JSON after {MAX_REPLY_ATTEMPTS} attempts ({bad.problem}): "
                                f"{excerpt!r}; the replies are cached: change the rubric or judge.model")
        stats = client.stats
        spent = f"${self.budget.paid_usd:.4f} paid so far" if self.budget.priced else "cost n/a (unpriced)"
        print(f"{self.metric}: {len(texts)} answer(s) scored by {self.judge.model}: {stats.api_calls} API call(s), "
              f"{stats.cache_hits} cached, {spent}", flush=True)
        return list(results)


_SCORERS: dict[tuple, RubricScorer] = {}


def scorer(metric: str, context: MetricContext | None) -> RubricScorer:
    """The scorer of a rubric, checked; one per (rubric text, judge params, folder) per process,
    so that the judge's cap covers a whole stage run."""
    prompt = check(metric, context)
    identity = (metric, prompt.template, context.description, context.judge.model_dump_json(), str(Path.cwd()))
    if identity not in _SCORERS:
        budget = Budget.for_model(context.judge.client, context.judge.model, CLIENT_SECTION)
        _SCORERS[identity] = RubricScorer(metric, prompt, context.description, context.judge, budget)
    return _SCORERS[identity]


def forget_scorers() -> None:
    """Drop the scorers of this process (as a new process would start): tests."""
    _SCORERS.clear()


def style_metric(metric: str, context: MetricContext | None) -> StyleMetric:
    """The `rubric:` metric as a StyleMetric (its checks first: one line, nothing sent)."""
    rubric = scorer(metric, context)
    return StyleMetric(metric, metric_column(metric), f"{rubric.prompt.path.stem} by {context.judge.model}",
                       lambda text: float(rubric.scores([text])[0]), source_file=rubric.prompt.path,
                       batch=rubric.scores)
