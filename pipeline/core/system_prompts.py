"""The paper's two system prompts (appendix A.5) for the default tone, and the chat they open.

- `VERBOSE_SYSTEM_PROMPT` is what the paper gave the *base* models (no fine-tuning): specific and
  long, because it has to carry the whole style directive, down to the Flesch target.
- `CONCISE_SYSTEM_PROMPT` is what the paper used while fine-tuning and for inference with the
  fine-tuned models: the adapter, not the prompt, carries the style.

The texts live in prompts/conversational/system_{verbose,concise}.txt (pipeline.core.prompts), filled
with the default tone's description; these constants are that default, for code that has no
params (the served model's fallback, benches). Stages take their tone's prompts from params `tone`
(`pipeline.core.prompts.system_prompts`). Training, evaluation and the registry's pyfunc model all
build their chats with `chat_messages`, so a fine-tuned model is queried with exactly the prompt it
was trained on (the adapter records it).
"""

from __future__ import annotations

from pipeline.core.prompts import REPO_ROOT, TonePrompts

DEFAULT_PROMPTS_DIR = REPO_ROOT / "prompts" / "conversational"
DEFAULT_DESCRIPTION = "a natural, conversational tone, like in a spoken conversation"

_DEFAULT = TonePrompts.load(DEFAULT_PROMPTS_DIR, DEFAULT_DESCRIPTION, ("system_verbose", "system_concise"))
VERBOSE_SYSTEM_PROMPT = _DEFAULT.system_prompt("verbose")
CONCISE_SYSTEM_PROMPT = _DEFAULT.system_prompt("concise")

SYSTEM_PROMPTS = {"verbose": VERBOSE_SYSTEM_PROMPT, "concise": CONCISE_SYSTEM_PROMPT}


def chat_messages(question: str, system_prompt: str = CONCISE_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The prompt side of one exchange: [system, user], ready for a chat template."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
    ]
