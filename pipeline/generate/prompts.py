"""Every prompt the generator sends, and the parser for the one structured reply.

The paper (section 2.2) uses three kinds of request per Wikipedia section:

1. `qa`: write one interesting question the section answers, and its answer, as JSON;
2. `rephrase`: say that answer again in the tone (the paper: natural, conversational), same meaning;
3. `simplify`: the rephrasing failed the tone's gate (the paper: Flesch below 75), try again (up to 3x).

The texts are files, prompts/<tone>/generate_*.txt (params `tone.prompts`; pipeline.core.prompts);
`GenerationPrompts` fills them. Its `prompt_version` is a hash of every template; it is logged
with each generation run and the text itself is part of every cached request, so editing a prompt
can never silently reuse answers to the old one. The replay backend keys its recordings by
(section, step, attempt) instead of prompt text, so prompt edits do not break the demo.

What this module does not do: send anything, or judge the replies (that is engine.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from pipeline.core.prompts import GENERATION_PROMPT_FILES, TonePrompts
from pipeline.core.system_prompts import DEFAULT_DESCRIPTION, DEFAULT_PROMPTS_DIR

Messages = list[dict[str, str]]
TEMPLATE_ORDER = ("qa_system", "qa_user", "qa_correction", "rephrase_system", "rephrase_user", "simplify_user")
TEMPLATE_NAMES = ("QA_SYSTEM", "QA_USER", "QA_CORRECTION", "REPHRASE_SYSTEM", "REPHRASE_USER", "SIMPLIFY_USER")


@dataclass(frozen=True)
class GenerationPrompts:
    """The generation requests of one tone, built from its prompt files."""

    prompts: TonePrompts

    @classmethod
    def of(cls, tone) -> GenerationPrompts:
        """The prompts of params `tone` (ToneConfig)."""
        return cls(TonePrompts.load(tone.prompts, tone.description, tuple(GENERATION_PROMPT_FILES)))

    @property
    def prompt_version(self) -> str:
        """A hash of every template (the same formula since the prompts were Python constants, so
        the default tone keeps its version)."""
        templates = [self.prompts.files[name].template for name in TEMPLATE_ORDER]
        return hashlib.sha256("\x1e".join(templates).encode("utf-8")).hexdigest()[:12]

    def _text(self, name: str, **fields: object) -> str:
        return self.prompts.text(name, **fields)

    def qa_messages(self, title: str, text: str, bad_replies: list[tuple[str, str]] = ()) -> Messages:
        """The question/answer request; earlier malformed replies are replayed with a correction.

        Continuing the conversation (instead of resending the same request) gives a model that
        ignored the format a concrete nudge, and makes each retry a different request, so the
        response cache never hands back the same malformed reply twice.
        """
        messages = [
            {"role": "system", "content": self._text("qa_system")},
            {"role": "user", "content": self._text("qa_user", title=title, text=text)},
        ]
        for reply, problem in bad_replies:
            messages.append({"role": "assistant", "content": reply})
            messages.append({"role": "user", "content": self._text("qa_correction", problem=problem)})
        return messages

    def rephrase_messages(self, question: str, factual_answer: str) -> Messages:
        """Ask for the factual answer again in the tone, same meaning."""
        return [
            {"role": "system", "content": self._text("rephrase_system")},
            {"role": "user", "content": self._text("rephrase_user", question=question, answer=factual_answer)},
        ]

    def simplify_messages(
        self, question: str, factual_answer: str, attempts: list[tuple[str, float] | tuple[str, float, list[str]]],
        threshold: float,
    ) -> Messages:
        """Ask to try again: the rephrasing conversation so far, each earlier answer followed by
        its Flesch score (and the gate criteria it failed, `{failed}`) and the request.

        The conversation grows with every attempt, so the model sees what it already tried, and two
        attempts are never the same request (an identical request would be answered from the cache,
        and "up to three more tries" would silently become one)."""
        messages = self.rephrase_messages(question, factual_answer)
        for answer, flesch, *failed in attempts:
            failed_text = "; ".join(failed[0]) if failed else ""
            messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": self._text("simplify_user", flesch=flesch, threshold=threshold,
                                                                   failed=failed_text)})
        return messages

    def text(self) -> str:
        """All templates as one human-readable document (logged as an MLflow artifact)."""
        parts = [f"# tonetune generation prompts, PROMPT_VERSION {self.prompt_version}\n"]
        parts += [f"## {label}\n\n{self.prompts.files[name].template}\n"
                  for label, name in zip(TEMPLATE_NAMES, TEMPLATE_ORDER, strict=True)]
        return "\n".join(parts)


# The default tone's prompts (prompts/conversational), for code that has no params.
DEFAULT = GenerationPrompts(TonePrompts.load(DEFAULT_PROMPTS_DIR, DEFAULT_DESCRIPTION, tuple(GENERATION_PROMPT_FILES)))
PROMPT_VERSION = DEFAULT.prompt_version
QA_SYSTEM, QA_USER, QA_CORRECTION, REPHRASE_SYSTEM, REPHRASE_USER, SIMPLIFY_USER = (
    DEFAULT.prompts.files[name].template for name in TEMPLATE_ORDER)
qa_messages = DEFAULT.qa_messages
rephrase_messages = DEFAULT.rephrase_messages
simplify_messages = DEFAULT.simplify_messages


def prompts_text() -> str:
    """The default tone's templates as one document."""
    return DEFAULT.text()


class MalformedReply(ValueError):
    """The question/answer reply could not be read as the JSON object we asked for."""


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)


def parse_qa_reply(reply: str | None) -> tuple[str, str]:
    """(question, answer) from a reply that should be `{"question": ..., "answer": ...}`.

    Tolerates what models add around JSON: ```json fences, whitespace, a sentence before the
    object, text after it. Raises MalformedReply (with a short reason) for anything else,
    including a "question" that does not end with '?' (the reason is sent back to the model).
    """
    text = (reply or "").strip()
    if not text:
        raise MalformedReply("the reply was empty")
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    start = text.find("{")
    if start < 0:
        raise MalformedReply("no JSON object in the reply")
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as error:
        raise MalformedReply(f"invalid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise MalformedReply("the JSON is not an object")
    fields = []
    for key in ("question", "answer"):
        field = value.get(key)
        if not isinstance(field, str) or not field.strip():
            raise MalformedReply(f"missing or empty {key!r}")
        fields.append(" ".join(field.split()))
    if not fields[0].endswith("?"):  # the validate stage requires it too
        raise MalformedReply("'question' must be a question ending with '?'")
    return fields[0], fields[1]


def clean_rephrasing(reply: str | None) -> str:
    """A rephrased answer without surrounding whitespace or quotes the model wrapped it in."""
    text = (reply or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
