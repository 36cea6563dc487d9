"""What a fine-tuning job is, before anything is sent: names, the chat JSONL, its checks
against the API's limits, the job identity, and what it will cost.

Owns: model names (`openai-<base>`, `openai-<base>-n<N>`), the paths of the arm's local state
and outputs, the training file's exact bytes and its validation (one line per problem, nothing
uploaded), `JobSpec` (whose digest is the job's identity), the price check (no unpriced
spending, through the one check in core/config.py) and the training cost estimate against
`openai.max_training_cost_usd`.
Does not own: anything that talks to the API (api.py), the ledger (ledger.py), MLflow.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import OPENAI_METRICS_DIR, REPORTS_DIR, OpenAIConfig
from pipeline.core.errors import TonetuneError
from pipeline.core.system_prompts import chat_messages
from pipeline.core.tables import read_table

if TYPE_CHECKING:
    import pandas as pd

STATE_DIR = Path("data/openai")  # local state, not a DVC output: it is what prevents paying twice
LEDGER_PATH = STATE_DIR / "jobs.jsonl"
CACHE_PATH = STATE_DIR / "responses.jsonl"
RUNS_DIR = REPORTS_DIR / "openai"
COLLECTED_DIR = OPENAI_METRICS_DIR
MIN_EXAMPLES = 10  # the fine-tuning API refuses fewer
IDENTITY_KEY = "tonetune_identity"
TRAIN_FILE_PATTERN = re.compile(r"train_(\d+)\.parquet$")




def model_name(base_model: str, n_train: int | None = None) -> str:
    """openai-<base> for the base model, openai-<base>-n<N> for its fine-tuned version."""
    return f"openai-{base_model}" if n_train is None else f"openai-{base_model}-n{n_train}"


def read_split(path: Path, what: str) -> pd.DataFrame:
    """A split parquet with question and answer columns (one line when it is missing or wrong)."""

    frame = read_table(path, ("question", "answer"), f"the {what} split; run `dvc repro split` first")
    return frame.reset_index(drop=True)


def chat_examples(frame: pd.DataFrame, system_prompt: str) -> list[dict[str, Any]]:
    """One fine-tuning example per row: system prompt, the question, the answer to learn."""

    return [
        {"messages": [*chat_messages(str(question), system_prompt), {"role": "assistant", "content": str(answer)}]}
        for question, answer in zip(frame["question"], frame["answer"], strict=True)
    ]


def jsonl_bytes(examples: Iterable[dict[str, Any]]) -> bytes:
    """The exact bytes uploaded: one compact JSON object per line (deterministic, so the digest is)."""
    return "".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples).encode("utf-8")


def estimated_tokens(example: dict[str, Any]) -> int:
    """Rough tokens of one example (4 characters a token, plus a few per message)."""
    messages = example.get("messages") or []
    return sum(len(str(m.get("content") or "")) for m in messages) // 4 + 4 * len(messages)


def validate_chat_jsonl(data: bytes, label: str, config: OpenAIConfig) -> int:
    """Check a fine-tuning file against the API's limits; return its example count.

    Raises TonetuneError with one line naming the first problem, before anything is uploaded."""
    max_bytes = int(config.max_file_mb * 1024 * 1024)
    if len(data) > max_bytes:
        raise TonetuneError(
            f"{label}: {len(data) / 2**20:.1f} MiB is over the API's limit of {config.max_file_mb:g} MiB per file "
            "(openai.max_file_mb): fine-tune on a smaller training split; nothing was uploaded"
        )
    count = 0
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        count += 1
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise TonetuneError(f"{label}: line {number} is not JSON ({error.msg}); nothing was uploaded") from None
        problem = chat_problem(example)
        if problem:
            raise TonetuneError(f"{label}: line {number} is not a valid chat example: {problem}; nothing was uploaded")
        tokens = estimated_tokens(example)
        if tokens > config.max_example_tokens:
            raise TonetuneError(
                f"{label}: line {number} has ~{tokens} tokens, over the API's {config.max_example_tokens} per "
                "example (openai.max_example_tokens); nothing was uploaded"
            )
    if count < MIN_EXAMPLES:
        raise TonetuneError(
            f"{label}: {count} example(s); the fine-tuning API needs at least {MIN_EXAMPLES}; nothing was uploaded"
        )
    return count


def chat_problem(example: Any) -> str | None:
    """What is wrong with one chat example (None when it is fine)."""
    if not isinstance(example, dict) or not isinstance(example.get("messages"), list) or not example["messages"]:
        return 'expected {"messages": [...]} with at least one message'
    for index, message in enumerate(example["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            return f"message {index} has no valid role (system, developer, user, assistant)"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {index} ({message['role']}) has empty or non-text content"
    if example["messages"][-1]["role"] != "assistant":
        return "the last message must be the assistant's answer"
    return None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- job identity


@dataclass(frozen=True)
class JobSpec:
    """Everything that decides what a fine-tuning job learns; its digest is the job's identity."""

    base_model: str
    training_sha256: str
    validation_sha256: str | None
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    seed: int

    @classmethod
    def from_config(cls, base_model: str, training_sha256: str, validation_sha256: str | None,
                    config: OpenAIConfig) -> JobSpec:
        return cls(base_model, training_sha256, validation_sha256, config.epochs, config.batch_size,
                   config.learning_rate_multiplier, config.seed)

    def method(self) -> dict[str, Any]:
        """The `method` argument of jobs.create (appendix A.4: supervised)."""
        return {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": self.n_epochs, "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
        }}}

    @property
    def identity(self) -> str:
        blob = json.dumps({
            "base_model": self.base_model, "training_file_sha256": self.training_sha256,
            "validation_file_sha256": self.validation_sha256, "method": self.method(), "seed": self.seed,
        }, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def suffix(self) -> str:
        """Part of the fine-tuned model's name (the API allows 18+ characters): tt-<identity[:12]>."""
        return f"tt-{self.identity[:12]}"


# --------------------------------------------------------------------------- money

CLIENT_SECTION = "openai.client"  # the arm's client settings: endpoint, key, limits, prices, caps


def check_priced(config: OpenAIConfig, models: Iterable[str], training: bool = False) -> None:
    """No unpriced spending: every base model this invocation uses must be priced in
    `openai.client.prices` (the one check, ClientConfig.check_priced, unless allow_unpriced),
    and a training cap needs the model's training price. One line, nothing sent."""
    models = list(models)
    config.client.check_priced(models, CLIENT_SECTION)
    if not training or config.max_training_cost_usd is None:
        return
    for model in models:
        price = config.client.price(model)
        if price is None or price.training_per_mtok is None:
            raise TonetuneError(
                f"openai.max_training_cost_usd is ${config.max_training_cost_usd:g} but {model!r} has no "
                f"training_per_mtok in {CLIENT_SECTION}.prices, so the cap cannot be checked; nothing was sent")


def training_tokens(data: bytes) -> int:
    """Tokens of a training file as this stage estimates them (4 characters a token, plus a few
    per message: `estimated_tokens` of every example)."""
    return sum(estimated_tokens(json.loads(line)) for line in data.splitlines() if line.strip())


def training_cost_usd(data: bytes, spec: JobSpec, config: OpenAIConfig) -> float | None:
    """Estimated USD of training: file tokens x epochs x the base model's training price."""
    price = config.client.price(spec.base_model)
    if price is None or price.training_per_mtok is None:
        return None
    return training_tokens(data) * spec.n_epochs * price.training_per_mtok / 1e6


def check_training_budget(data: bytes, spec: JobSpec, config: OpenAIConfig) -> float | None:
    """Refuse (one line) a job whose estimated training cost is above `openai.max_training_cost_usd`."""
    cost = training_cost_usd(data, spec, config)
    cap = config.max_training_cost_usd
    if cap is not None and cost is not None and cost > cap:
        raise TonetuneError(
            f"estimated training cost ${cost:.4f} ({training_tokens(data)} tokens x {spec.n_epochs} epochs x "
            f"${config.client.price(spec.base_model).training_per_mtok:g}/M for {spec.base_model}) is above "
            f"openai.max_training_cost_usd ${cap:g}: no job created"
        )
    return cost
