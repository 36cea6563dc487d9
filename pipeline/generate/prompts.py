"""Every prompt the generator sends, in one place, and the parser for the one structured reply.

The paper (section 2.2) uses three kinds of request per Wikipedia section:

1. `qa`: write one interesting question the section answers, and its answer, as JSON;
2. `rephrase`: say that answer again in a natural, conversational tone, same meaning;
3. `simplify`: the rephrasing scored below the Flesch threshold, make it simpler (up to 3x).

`PROMPT_VERSION` is a hash of every template below. It is logged with each generation run and
is part of every cached request (through the message text), so editing a prompt can never
silently reuse answers to the old one. The replay backend keys its recordings by
(section, step, attempt) instead of prompt text, so prompt edits do not break the demo.

What this module does not do: send anything, or judge the replies (that is engine.py).
"""

from __future__ import annotations

import hashlib
import json
import re

QA_SYSTEM = (
    "You write question and answer pairs for a dataset. Each pair is based on one section of a "
    "Wikipedia article and uses only facts stated in that section."
)

QA_USER = """Here is a section of the Wikipedia article "{title}":

{text}

Write one interesting question that this section answers, and the answer to it. Use only facts \
from the section. The question must make sense on its own, without the section: name the subject, \
and do not mention "the text", "the section" or "the article".

Reply with only a JSON object, no other text:
{{"question": "...", "answer": "..."}}"""

QA_CORRECTION = (
    'Your reply was not a JSON object with the string keys "question" and "answer" ({problem}). '
    "Reply again with only the JSON object."
)

REPHRASE_SYSTEM = (
    "You rewrite answers so that they sound natural when spoken aloud in a conversation, "
    "for a voice assistant."
)

REPHRASE_USER = """Question: {question}
Answer: {answer}

Rephrase the answer in a natural, conversational tone, as if you were saying it out loud to \
someone who just asked you the question. Keep the meaning the same: keep every fact and add none. \
Reply with only the rephrased answer."""

SIMPLIFY_USER = """That answer is still hard to follow when spoken (Flesch reading ease \
{flesch:.0f}; it needs {threshold:.0f} or more). Make it simpler: shorter sentences, everyday \
words, the same conversational tone and the same facts. Reply with only the new answer."""

_TEMPLATES = (QA_SYSTEM, QA_USER, QA_CORRECTION, REPHRASE_SYSTEM, REPHRASE_USER, SIMPLIFY_USER)
PROMPT_VERSION = hashlib.sha256("\x1e".join(_TEMPLATES).encode("utf-8")).hexdigest()[:12]

Messages = list[dict[str, str]]


def qa_messages(title: str, text: str, bad_replies: list[tuple[str, str]] = ()) -> Messages:
    """The question/answer request; earlier malformed replies are replayed with a correction.

    Continuing the conversation (instead of resending the same request) gives a model that
    ignored the format a concrete nudge, and makes each retry a different request, so the
    response cache never hands back the same malformed reply twice.
    """
    messages = [
        {"role": "system", "content": QA_SYSTEM},
        {"role": "user", "content": QA_USER.format(title=title, text=text)},
    ]
    for reply, problem in bad_replies:
        messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": QA_CORRECTION.format(problem=problem)})
    return messages


def rephrase_messages(question: str, factual_answer: str) -> Messages:
    """Ask for the factual answer again in a conversational tone, same meaning."""
    return [
        {"role": "system", "content": REPHRASE_SYSTEM},
        {"role": "user", "content": REPHRASE_USER.format(question=question, answer=factual_answer)},
    ]


def simplify_messages(
    question: str, factual_answer: str, attempts: list[tuple[str, float]], threshold: float
) -> Messages:
    """Ask to simplify again: the rephrasing conversation so far, each earlier answer followed by
    its Flesch score and the request to make it simpler.

    The conversation grows with every attempt, so the model sees what it already tried, and two
    attempts are never the same request (an identical request would be answered from the cache,
    and "up to three more tries" would silently become one)."""
    messages = rephrase_messages(question, factual_answer)
    for answer, flesch in attempts:
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": SIMPLIFY_USER.format(flesch=flesch, threshold=threshold)})
    return messages


def prompts_text() -> str:
    """All templates as one human-readable document (logged as an MLflow artifact)."""
    names = ("QA_SYSTEM", "QA_USER", "QA_CORRECTION", "REPHRASE_SYSTEM", "REPHRASE_USER", "SIMPLIFY_USER")
    parts = [f"# tonetune generation prompts, PROMPT_VERSION {PROMPT_VERSION}\n"]
    parts += [f"## {name}\n\n{template}\n" for name, template in zip(names, _TEMPLATES, strict=True)]
    return "\n".join(parts)


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
