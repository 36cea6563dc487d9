"""A fake LLM judge for tests/fakes/openai_server.py: answers the judge stage's prompts with JSON.

Rules (what the tests derive their expectations from):
- G-Eval (a prompt with "Evaluation form"): the answer under evaluation containing GOOD scores
  5 on an even request seed and 4 on an odd one; BAD scores 2 / 3; GARBLED gets a reply that is
  not JSON ("I'd say four out of five."). So over repeats with seeds 0..R-1 the mean is 4.5 / 2.5
  (R even) with a population std of 0.5.
- Pairwise (a prompt with "[Answer A]"): a question containing "biased" -> always "A" (a judge
  with position bias: the two orders disagree); "tie" -> "tie"; an answer containing GARBLED ->
  not JSON; else the answer containing GOOD wins, and two answers of the same kind tie.
- Faults: the first chat calls get the replies in `faults` (e.g. HTTP 500, a malformed JSON
  body), which the client retries.
The fake keeps the token usage of every successful reply (the server's own formula), so the
cost the stage reports can be checked against what the server billed.
"""

from __future__ import annotations

import json
import re
import threading

from tests.fakes.openai_server import FakeReply, RecordedRequest, _usage


def _kind(text: str) -> str:
    return "GARBLED" if "GARBLED" in text else "GOOD" if "GOOD" in text else "BAD"


class FakeJudge:
    """A chat behaviour for FakeOpenAIServer(chat=FakeJudge(...))."""

    def __init__(self, faults: list[FakeReply] | None = None):
        self.faults = list(faults or [])
        self.calls = 0
        self.billed_input = 0
        self.billed_output = 0
        self.geval_seeds: list[int] = []
        self.pairs: list[tuple[str, str, str]] = []  # (question, answer A, answer B)
        self._lock = threading.Lock()

    def __call__(self, request: RecordedRequest) -> str | FakeReply:
        with self._lock:
            self.calls += 1
            if self.calls <= len(self.faults):
                return self.faults[self.calls - 1]
        content = self._answer(request)
        usage = _usage(request, content)
        with self._lock:
            self.billed_input += usage["prompt_tokens"]
            self.billed_output += usage["completion_tokens"]
        return content

    def _answer(self, request: RecordedRequest) -> str:
        prompt = request.last_user_message
        seed = int((request.body or {}).get("seed") or 0)
        if "Evaluation form" in prompt:
            answer = prompt.split("Answer to evaluate:\n", 1)[1].split("\n\nEvaluation form", 1)[0]
            with self._lock:
                self.geval_seeds.append(seed)
            kind = _kind(answer)
            if kind == "GARBLED":
                return "I'd say four out of five."
            score = (5 if seed % 2 == 0 else 4) if kind == "GOOD" else (2 if seed % 2 == 0 else 3)
            return "```json\n" + json.dumps({"steps": f"The answer is {kind.lower()}.", "score": score}) + "\n```"
        if "[Answer A]" in prompt:
            question = prompt.split("Question:\n", 1)[1].split("\n\n[Answer A]", 1)[0]
            first = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", prompt, re.DOTALL).group(1)
            second = re.search(r"\[Answer B\]\n(.*?)\n\nReply with", prompt, re.DOTALL).group(1)
            with self._lock:
                self.pairs.append((question, first, second))
            if "GARBLED" in first + second:
                return "Both are fine, really."
            if "biased" in question:
                winner = "A"
            elif "tie" in question or _kind(first) == _kind(second):
                winner = "tie"
            else:
                winner = "A" if _kind(first) == "GOOD" else "B"
            return json.dumps({"reasoning": "compared", "winner": winner})
        return "echo"
