"""The paper's two system prompts (appendix A.5), verbatim, and the chat they open.

- `VERBOSE_SYSTEM_PROMPT` is what the paper gave the *base* models (no fine-tuning): specific and
  long, because it has to carry the whole style directive, down to the Flesch target.
- `CONCISE_SYSTEM_PROMPT` is what the paper used while fine-tuning and for inference with the
  fine-tuned models: the adapter, not the prompt, carries the style.

Training (pipeline.train), evaluation and the registry's pyfunc model all build their chats with
`chat_messages`, so a fine-tuned model is queried with exactly the prompt it was trained on.
The texts are part of the experiment: changing one changes every result (the train stage lists
this file as a DVC dependency).
"""

from __future__ import annotations

VERBOSE_SYSTEM_PROMPT = (
    "You are a helpful assistant. You answer questions in a natural, conversational tone, like in a "
    "spoken conversation. You give short and concise answers. Your answers must be one to four "
    "sentences long. The Flesch Reading Ease Score is a metric to assess how difficult a text passage "
    "is to understand. Higher scores indicate text that is easier. Please formulate your answer such "
    "that it would receive a Flesch Reading Ease Score of above 60."
)

CONCISE_SYSTEM_PROMPT = (
    "You are a helpful assistant. You answer questions in a natural, conversational tone, like in a "
    "spoken conversation."
)

SYSTEM_PROMPTS = {"verbose": VERBOSE_SYSTEM_PROMPT, "concise": CONCISE_SYSTEM_PROMPT}


def chat_messages(question: str, system_prompt: str = CONCISE_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The prompt side of one exchange: [system, user], ready for a chat template."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
    ]
