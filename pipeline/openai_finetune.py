"""Stage `openai_finetune` (optional, paper appendix A.4): fine-tune OpenAI models on a training
split, then score them, and their base versions, on the validation split like every other model.

    python -m pipeline.openai_finetune --base-model gpt-4o-mini-2024-07-18 \\
        --train data/splits/train_100.parquet --val data/splits/val.parquet   # fine-tune + evaluate
    python -m pipeline.openai_finetune --base-model gpt-4o-mini-2024-07-18 \\
        --val data/splits/val.parquet                                         # the base model only
    python -m pipeline.openai_finetune --collect     # metrics/openai/*.json for the report
    python -m pipeline.openai_finetune ... --cancel  # cancel this training set's job

Off unless `openai.enabled` is true: then it only writes `status.json` {"status": "not_run"}
and exits 0 (the demo's DVC stages take a second, and the report lists the models as not run).

A fine-tuning run, in order (each step is skipped when it was done before, see "Idempotence"):

1. the chat JSONL: per training row [system: the concise prompt, user: question, assistant:
   answer] (appendix A.5), checked against the API's limits before anything is sent: at least
   10 examples, file size <= `openai.max_file_mb`, every line a valid chat, no example over
   `openai.max_example_tokens` (4 characters a token); a violation is one line, nothing uploaded;
2. `files.create(purpose="fine-tune")` (and the validation split with `openai.validation_file`);
3. `fine_tuning.jobs.create` with `method={"type": "supervised", "supervised": {"hyperparameters":
   {n_epochs, batch_size, learning_rate_multiplier}}}`, `seed`, a `suffix` and `metadata` that
   carry the job's identity digest;
4. polling with backoff (`poll_interval_s`, doubled after each poll that brought nothing new, up
   to `poll_max_interval_s`), streaming the job's events into the MLflow run as they arrive
   (train/valid loss and token accuracy per step), then the checkpoints' metrics and the result
   file (step_metrics.csv, which the API serves base64-encoded), logged as an artifact;
5. the fine-tuned model id: a tag of the run, status.json and the metrics record;
6. evaluation through chat completions with the concise prompt (the base model: the verbose one),
   through the generator's client (pipeline.core.llmclient: concurrency, rate limits, retries,
   a durable response cache, so a re-run pays for nothing already answered), scored by the same
   code as the LoRA adapters (pipeline.core.predictions.score_answers + pipeline.core.evalmetrics).

Idempotence. A job is identified by (base model, sha256 of the training file [and of the
validation file], method and hyperparameters, seed): the identity digest. Every file id, job id
and MLflow run id is appended (and fsynced) to the ledger `data/openai/jobs.jsonl` the moment it
exists, per endpoint. A re-run reuses them: a recorded job is polled again, never created twice;
a recorded file is not uploaded again. A crash between upload and job creation, or while the
creation's reply was on its way, leaves the remote side ahead of the ledger: before uploading or
creating, the remote lists are searched (files by name `tonetune-<role>-<sha256[:16]>.jsonl`,
jobs by `metadata.tonetune_identity`), so a job is adopted, not paid for again, even without the
ledger (another machine, a `dvc exp run --temp` workspace). Job creation is sent without the
SDK's automatic retries; after a timeout or connection error the job list is checked before the
request is repeated. A failed or cancelled job stays the answer for its identity (the stage exits
non-zero with the API's error message) until `--new-job` asks for a new, paid one.

Outputs: `reports/openai/<model>/` (status.json, train.jsonl, step_metrics.csv, predictions.parquet,
metrics.json) per model; `--collect` copies the metrics records of the current params' models to
`metrics/openai/<model>.json`, where the report reads them. Model names: `openai-<base model>` and
`openai-<base model>-n<training rows>`. MLflow: one run per model under those names, beside the
LoRA runs. The API key comes from OPENAI_API_KEY only; it goes to the HTTP client and nowhere else.

Not done here: Azure OpenAI serves a fine-tuned model only after it is deployed; pass the
deployment name with `--eval-model` to evaluate it there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.core.config import METRICS_DIR, REPORTS_DIR, VAL_SPLIT_PATH, Config, OpenAIConfig, load_config
from pipeline.core.errors import TonetuneError, exit_on_user_error

if TYPE_CHECKING:
    import pandas as pd

KEY_ENV = "OPENAI_API_KEY"
STATE_DIR = Path("data/openai")  # local state, not a DVC output: it is what prevents paying twice
LEDGER_PATH = STATE_DIR / "jobs.jsonl"
CACHE_PATH = STATE_DIR / "responses.jsonl"
RUNS_DIR = REPORTS_DIR / "openai"
COLLECTED_DIR = METRICS_DIR / "openai"
MIN_EXAMPLES = 10  # the fine-tuning API refuses fewer
IDENTITY_KEY = "tonetune_identity"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TRAIN_FILE_PATTERN = re.compile(r"train_(\d+)\.parquet$")
STEP_METRICS = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                "full_valid_loss", "full_valid_mean_token_accuracy")
CSV_COLUMN_NAMES = {"train_accuracy": "train_mean_token_accuracy"}  # result CSV -> event names


class JobFailed(TonetuneError):
    """The fine-tuning job ended failed or cancelled (the message is the API's)."""


class APIError(TonetuneError):
    """An API call failed; `transient` says whether trying again later may help."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class RemoteNotFound(APIError):
    """The API answered 404 for an object we asked for by id."""


# --------------------------------------------------------------------------- names and files


def model_name(base_model: str, n_train: int | None = None) -> str:
    """openai-<base> for the base model, openai-<base>-n<N> for its fine-tuned version."""
    return f"openai-{base_model}" if n_train is None else f"openai-{base_model}-n{n_train}"


def read_split(path: Path, what: str) -> pd.DataFrame:
    """A split parquet with question and answer columns (one line when it is missing or wrong)."""
    from pipeline.core.tables import read_table

    frame = read_table(path, ("question", "answer"), f"the {what} split; run `dvc repro split` first")
    return frame.reset_index(drop=True)


def chat_examples(frame: pd.DataFrame, system_prompt: str) -> list[dict[str, Any]]:
    """One fine-tuning example per row: system prompt, the question, the answer to learn."""
    from pipeline.core.system_prompts import chat_messages

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


def write_atomic(path: Path, data: bytes) -> Path:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
    return path


def write_json(path: Path, record: dict[str, Any]) -> Path:
    return write_atomic(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


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


# --------------------------------------------------------------------------- the ledger


class JobLedger:
    """Append-only JSONL of what exists remotely (files, jobs, MLflow runs), fsynced per record.

    Records: {"kind": "file", endpoint, sha256, file_id, ...}, {"kind": "file_gone", ...},
    {"kind": "job", endpoint, identity, job_id, ...}, {"kind": "job_update", endpoint, job_id,
    status, fine_tuned_model, ...}, {"kind": "job_superseded", ...} (--new-job) and
    {"kind": "run", endpoint, identity, mlflow_run_id}. A torn last line (a crash mid-write) is
    ignored and cut off before the next append. `lock()` serialises the check-then-create steps
    of concurrent processes on one machine (flock)."""

    def __init__(self, path: Path = LEDGER_PATH):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records = []
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it before returning (the id is then safe from a crash)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        line = json.dumps({"at": datetime.now(UTC).isoformat(timespec="seconds"), **record}, sort_keys=True)
        with open(self.path, "a+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":  # a torn line from a crash: drop it
                    handle.seek(0)
                    data = handle.read()
                    handle.truncate(data.rfind(b"\n") + 1)
            handle.write(line.encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            _fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as handle:
            try:
                import fcntl

                fcntl.flock(handle, fcntl.LOCK_EX)
            except (ImportError, OSError):  # no flock (Windows, some network disks): unlocked
                pass
            yield

    def file_id(self, endpoint: str, sha256: str) -> str | None:
        """The newest recorded upload of a file with this content at this endpoint, unless gone."""
        found = None
        for record in self.records():
            if record.get("endpoint") != endpoint or record.get("sha256") != sha256:
                continue
            if record.get("kind") == "file":
                found = record.get("file_id")
            elif record.get("kind") == "file_gone" and record.get("file_id") == found:
                found = None
        return found

    def job(self, endpoint: str, identity: str) -> dict[str, Any] | None:
        """The current job of an identity at this endpoint, with its later updates merged in."""
        current: dict[str, Any] | None = None
        for record in self.records():
            if record.get("endpoint") != endpoint:
                continue
            kind = record.get("kind")
            if kind == "job" and record.get("identity") == identity:
                current = dict(record)
            elif kind == "job_update" and current and record.get("job_id") == current.get("job_id"):
                current.update({k: v for k, v in record.items() if k not in ("kind", "at")})
            elif kind == "job_superseded" and current and record.get("job_id") == current.get("job_id"):
                current = None
        return current

    def known_job_ids(self, endpoint: str, identity: str) -> set[str]:
        return {r["job_id"] for r in self.records()
                if r.get("kind") == "job" and r.get("endpoint") == endpoint and r.get("identity") == identity}

    def run_id(self, endpoint: str, identity: str) -> str | None:
        found = None
        for record in self.records():
            if record.get("kind") == "run" and record.get("endpoint") == endpoint and record.get("identity") == identity:
                found = record.get("mlflow_run_id")
        return found


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- the API


def api_key_from_env() -> str:
    """OPENAI_API_KEY, or one line saying so (before anything is uploaded)."""
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise TonetuneError(
            f"environment variable {KEY_ENV} is not set: export the key of the OpenAI (or Azure OpenAI) "
            "account that should run the fine-tuning; nothing was uploaded"
        )
    return key


class FineTuningAPI:
    """The few calls this stage makes, through the real `openai` client, with errors in one line.

    Reads (GET) use the SDK's own retries. Uploads and job creation are sent once per attempt
    (max_retries=0): a timed-out creation may have happened, so the caller looks before retrying."""

    def __init__(self, base_url: str | None, api_key: str, config: OpenAIConfig):
        import openai

        self._openai = openai
        self.api_key = api_key  # for the chat client of the evaluation; never logged
        self.config = config
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=config.max_retries,
                                    timeout=config.request_timeout_s)
        self.once = self.client.with_options(max_retries=0)
        # The resolved endpoint: params, else OPENAI_BASE_URL, else api.openai.com (never credentials).
        parts = urlsplit(str(self.client.base_url))
        self.endpoint = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"
        self.host = parts.hostname or self.endpoint

    def call(self, what: str, function: Callable, *args, **kwargs):
        """function(*args, **kwargs); API errors become one-line APIErrors (key scrubbed), marked
        transient for timeouts, connection errors and 408/409/429/5xx."""
        openai = self._openai
        try:
            return function(*args, **kwargs)
        except openai.APIStatusError as error:
            from pipeline.core.llmclient import server_message  # the server message, on one line

            status = error.status_code
            message = f"{what}: HTTP {status} from {self.host}: {server_message(error)}".replace(self.api_key, "***")
            if status == 404:
                raise RemoteNotFound(message) from None
            raise APIError(message, transient=status in (408, 409, 429) or status >= 500) from None
        except openai.APIConnectionError as error:  # timeouts included
            message = f"{what}: cannot reach {self.host}: {error}".replace(self.api_key, "***")
            raise APIError(message, transient=True) from None

    # ----------------------------------------------------------------- files

    def retrieve_file(self, file_id: str):
        return self.call(f"files.retrieve({file_id})", self.client.files.retrieve, file_id)

    def find_file(self, filename: str, size: int) -> str | None:
        """A fine-tune file already uploaded under `filename` with `size` bytes (newest first)."""
        files = self.call("files.list", lambda: list(self.client.files.list(purpose="fine-tune")))
        matches = [f for f in files if f.filename == filename and f.bytes == size and f.status != "error"]
        return max(matches, key=lambda f: f.created_at).id if matches else None

    def upload(self, filename: str, data: bytes):
        return self.once.files.create(file=(filename, data, "application/jsonl"), purpose="fine-tune")

    def result_file(self, file_id: str) -> bytes:
        """A result file's bytes, base64-decoded when the API served them encoded."""
        import base64
        import binascii

        content = self.call(f"files.content({file_id})", self.client.files.content, file_id).read()
        try:
            decoded = base64.b64decode(content, validate=True)
            if decoded.lstrip().startswith(b"step"):
                return decoded
        except (binascii.Error, ValueError):
            pass
        return content

    # ----------------------------------------------------------------- jobs

    def find_jobs(self, identity: str) -> list:
        """Jobs tagged with this identity, newest first (metadata filter, re-checked here: a server
        that ignores the filter returns every job)."""
        jobs = self.call("fine_tuning.jobs.list",
                         lambda: list(self.client.fine_tuning.jobs.list(metadata={IDENTITY_KEY: identity}, limit=100)))
        tagged = [job for job in jobs if (job.metadata or {}).get(IDENTITY_KEY) == identity]
        return sorted(tagged, key=lambda job: job.created_at, reverse=True)

    def create_job(self, spec: JobSpec, training_file: str, validation_file: str | None, metadata: dict[str, str]):
        kwargs = {"validation_file": validation_file} if validation_file else {}
        return self.once.fine_tuning.jobs.create(
            model=spec.base_model, training_file=training_file, method=spec.method(), seed=spec.seed,
            suffix=spec.suffix, metadata=metadata, **kwargs,
        )

    def retrieve_job(self, job_id: str):
        return self.call(f"fine_tuning.jobs.retrieve({job_id})", self.client.fine_tuning.jobs.retrieve, job_id)

    def cancel_job(self, job_id: str):
        return self.call(f"fine_tuning.jobs.cancel({job_id})", self.client.fine_tuning.jobs.cancel, job_id)

    def new_events(self, job_id: str, seen: set[str]) -> list:
        """Events not in `seen`, oldest first (the API pages newest first: stop at a known one)."""
        fresh = []
        for event in self.call(f"list_events({job_id})", self.client.fine_tuning.jobs.list_events, job_id, limit=100):
            if event.id in seen:
                break
            fresh.append(event)
        seen.update(event.id for event in fresh)
        return list(reversed(fresh))

    def checkpoints(self, job_id: str) -> list:
        page = self.call(f"checkpoints.list({job_id})", self.client.fine_tuning.jobs.checkpoints.list, job_id)
        return sorted(page, key=lambda checkpoint: checkpoint.step_number)


def retry_with_backoff(api: FineTuningAPI, what: str, attempt_once: Callable[[], Any], check_first: Callable[[], Any],
                       config: OpenAIConfig, sleep: Callable[[float], None] = time.sleep):
    """Send a non-idempotent request; after a transient failure, `check_first()` (did it happen
    after all?) before sending it again. Returns what either of them produced."""
    rng = random.Random()  # jitter only
    for attempt in range(config.max_retries + 1):
        try:
            return api.call(what, attempt_once)
        except APIError as error:
            if not error.transient or attempt == config.max_retries:
                raise
            print(f"openai: {error}; checking whether it happened before retrying", flush=True)
        sleep(rng.uniform(0, min(60.0, 2.0**attempt)))
        found = check_first()
        if found is not None:
            return found
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- MLflow


@dataclass
class RunLog:
    """The MLflow run of one model: step metrics logged once per (key, step), even on resume."""

    run_id: str
    client: Any
    logged: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def open(cls, run_id: str) -> RunLog:
        import mlflow

        client = mlflow.MlflowClient()
        log = cls(run_id, client)
        for key in STEP_METRICS:
            history = client.get_metric_history(run_id, key)
            if history:
                log.logged[key] = {metric.step for metric in history}
        return log

    def steps(self, rows: Iterable[tuple[int, dict[str, Any]]]) -> int:
        """Log {metric: value} at each step unless that (metric, step) is already logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for step, values in rows:
            for key, value in values.items():
                key = CSV_COLUMN_NAMES.get(key, key)
                if key not in STEP_METRICS or not _is_number(value) or step in self.logged.setdefault(key, set()):
                    continue
                self.logged[key].add(step)
                batch.append(Metric(key, float(value), now, int(step)))
        for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000], synchronous=True)
        return len(batch)

    def tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value)[:5000])


def _is_number(value: Any) -> bool:
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def start_run(config: Config, name: str, run_id: str | None, tags: dict[str, str]):
    """Re-open `run_id` when the store still has it, else start a run named `name`."""
    import mlflow

    from pipeline.core.tracking import code_version_tags, configure_mlflow

    configure_mlflow(config.tracking)
    if run_id:
        try:
            if mlflow.get_run(run_id).info.lifecycle_stage == "active":
                return mlflow.start_run(run_id=run_id)
        except mlflow.exceptions.MlflowException:
            pass  # deleted or another store: start a new one
    return mlflow.start_run(run_name=name, tags={**tags, **code_version_tags()})


# --------------------------------------------------------------------------- evaluation


def ask_all(model: str, system_prompt: str, questions: list[str], config: Config, api_key: str, endpoint: str,
            cache_path: Path = CACHE_PATH):
    """(GenerationResult, call stats): every question answered by `model` through the generator's
    client (cache, concurrency, rate limits, retries). A question still unanswered after its
    retries fails the stage in one line; the answers received are cached, so a re-run pays only
    for the rest. `stopped` is finish_reason == "stop" (not cut off at max_tokens)."""
    from pipeline.core.config import GenerateConfig
    from pipeline.core.llmclient import ChatClient, OpenAIBackend, RequestFailed, RequestSettings, StepKey
    from pipeline.core.predictions import GenerationResult
    from pipeline.core.responsecache import ResponseCache
    from pipeline.core.system_prompts import chat_messages

    settings = config.openai
    client_config = GenerateConfig(
        backend="openai", base_url=endpoint, model=model, temperature=settings.eval_temperature,
        max_tokens=config.evaluate.max_new_tokens, request_timeout_s=settings.request_timeout_s,
        concurrency=settings.eval_concurrency, requests_per_minute=settings.eval_requests_per_minute,
        tokens_per_minute=settings.eval_tokens_per_minute, max_retries=settings.max_retries, seed=settings.seed,
    )
    request = RequestSettings(model, settings.eval_temperature, config.evaluate.max_new_tokens, settings.seed,
                              settings.request_timeout_s)

    async def run() -> tuple[list, dict[str, int]]:
        backend = OpenAIBackend(endpoint, api_key, settings.eval_concurrency, settings.request_timeout_s)
        client = ChatClient(backend, cache, request, client_config)
        try:
            replies = await asyncio.gather(*(
                client.complete(chat_messages(question, system_prompt), StepKey(f"val{index:06d}", "evaluate", 0))
                for index, question in enumerate(questions)
            ), return_exceptions=True)
        finally:
            await client.aclose()
        return replies, client.stats.as_dict()

    cache = ResponseCache(cache_path)
    started = time.perf_counter()
    try:
        replies, stats = asyncio.run(run())
    finally:
        cache.close()
    errors = [reply for reply in replies if isinstance(reply, BaseException)]
    fatal = next((error for error in errors if isinstance(error, TonetuneError)), None)
    if fatal is not None:
        raise fatal
    if errors:
        first = errors[0] if isinstance(errors[0], RequestFailed) else repr(errors[0])
        raise TonetuneError(f"{len(errors)} of {len(questions)} evaluation requests to {model} failed (first: {first}); "
                            "re-run to retry them, the answers received are cached")
    result = GenerationResult(
        answers=[reply.content.strip() for reply in replies],
        n_tokens=[reply.output_tokens for reply in replies],
        stopped=[reply.finish_reason in (None, "stop") for reply in replies],
        seconds=time.perf_counter() - started,
    )
    return result, stats


def score(name: str, kind: str, base_model: str, answers, validation: pd.DataFrame, config: Config,
          extra: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame]:
    """The predictions table and metrics record, computed exactly as for the LoRA adapters."""
    from pipeline.core.contracts import openai_family
    from pipeline.core.evalmetrics import metrics_record, summarize_predictions
    from pipeline.core.predictions import score_answers
    from pipeline.core.textmetrics import load_embedder

    embedder = load_embedder(config.embeddings)
    references = embedder.encode(validation["answer"].astype(str).tolist())
    predictions = score_answers(validation, answers, references, embedder)
    settings = config.evaluate
    summary = summarize_predictions(predictions, settings.conversational_threshold, settings.bootstrap_samples, settings.seed)
    record = metrics_record(name, kind, summary, family=openai_family(base_model), base_model=base_model, **extra)
    return record, predictions


def evaluate_model(name: str, kind: str, base_model: str, model_id: str, prompt_name: str, validation: pd.DataFrame,
                   val_path: Path, config: Config, api: FineTuningAPI, out_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Answer, score, write predictions.parquet + metrics.json, and log both to the active run."""
    import mlflow

    from pipeline.core.predictions import MLFLOW_METRIC_PREFIX, predictions_artifact_path, write_predictions
    from pipeline.core.system_prompts import SYSTEM_PROMPTS
    from pipeline.core.tracking import log_dataset_input

    questions = validation["question"].astype(str).tolist()
    print(f"openai: evaluating {model_id} ({prompt_name} prompt) on {len(questions)} validation questions", flush=True)
    answers, stats = ask_all(model_id, SYSTEM_PROMPTS[prompt_name], questions, config, api.api_key, api.endpoint)
    record, predictions = score(name, kind, base_model, answers, validation, config,
                                {"system_prompt": prompt_name, "evaluated_model": model_id, **extra})
    write_predictions(predictions, "predictions", folder=out_dir)
    write_json(out_dir / "metrics.json", record)
    metrics = {f"{MLFLOW_METRIC_PREFIX}{key}": float(value) for key, value in record.items()
               if _is_number(value) and key not in ("n_train", "trained_tokens")}
    metrics[f"{MLFLOW_METRIC_PREFIX}seconds"] = answers.seconds
    metrics |= {f"{MLFLOW_METRIC_PREFIX}{key}": float(value) for key, value in stats.items()
                if key in ("api_calls", "cache_hits", "retries", "input_tokens", "output_tokens")}
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"eval.system_prompt": prompt_name, "eval.model": model_id,
                     "eval.max_new_tokens": str(config.evaluate.max_new_tokens),
                     "eval.temperature": str(config.openai.eval_temperature),
                     "eval.conversational_threshold": str(config.evaluate.conversational_threshold),
                     "eval.embeddings_model": config.embeddings.model, "eval.n_eval": str(len(predictions))})
    log_dataset_input(validation, val_path, context="evaluation", name="val")
    run_id = mlflow.active_run().info.run_id
    mlflow.log_table(predictions, artifact_file=predictions_artifact_path(mlflow.MlflowClient(), run_id))
    def number(key: str, digits: int) -> str:
        return f"{record[key]:.{digits}f}" if _is_number(record.get(key)) else "n/a"

    print(f"openai: {name}: {number('pct_conversational', 1)}% conversational "
          f"[{number('pct_conversational_ci_low', 1)}, {number('pct_conversational_ci_high', 1)}], "
          f"Flesch {number('flesch_mean', 1)}, similarity {number('similarity_mean', 3)}, "
          f"{stats['api_calls']} API calls, {stats['cache_hits']} cached", flush=True)
    return record


# --------------------------------------------------------------------------- fine-tuning


def ensure_file(api: FineTuningAPI, ledger: JobLedger, data: bytes, role: str) -> str:
    """The file id of `data` at this endpoint: recorded, found remotely by name, or uploaded now."""
    sha = sha256_hex(data)
    filename = f"tonetune-{role}-{sha[:16]}.jsonl"
    recorded = ledger.file_id(api.endpoint, sha)
    if recorded:
        try:
            api.retrieve_file(recorded)
            return recorded
        except RemoteNotFound:  # deleted remotely: record that, upload again
            ledger.append({"kind": "file_gone", "endpoint": api.endpoint, "sha256": sha, "file_id": recorded})
    existing = api.find_file(filename, len(data))
    if existing:
        print(f"openai: {role} file {existing} found at {api.host} (uploaded before; not uploading again)", flush=True)
        ledger.append({"kind": "file", "endpoint": api.endpoint, "sha256": sha, "file_id": existing,
                       "filename": filename, "bytes": len(data), "found_remotely": True})
        return existing
    uploaded = retry_with_backoff(api, f"files.create({filename})", lambda: api.upload(filename, data),
                                  lambda: api.find_file(filename, len(data)), api.config)
    file_id = uploaded if isinstance(uploaded, str) else uploaded.id
    ledger.append({"kind": "file", "endpoint": api.endpoint, "sha256": sha, "file_id": file_id,
                   "filename": filename, "bytes": len(data)})
    print(f"openai: uploaded {role} file {filename} ({len(data)} bytes) as {file_id}", flush=True)
    return file_id


def ensure_job(api: FineTuningAPI, ledger: JobLedger, spec: JobSpec, files: Callable[[], tuple[str, str | None]],
               metadata: dict[str, str], new_job: bool):
    """(job, created): the identity's recorded job, a remote job tagged with it, or a new one.

    `files()` uploads (or finds) the training/validation files; it is only called when a job
    has to be created. With `new_job` the recorded job is superseded and a new one created."""
    identity = spec.identity
    recorded = ledger.job(api.endpoint, identity)
    if recorded and new_job:
        ledger.append({"kind": "job_superseded", "endpoint": api.endpoint, "identity": identity,
                       "job_id": recorded["job_id"]})
        recorded = None
    if recorded:
        try:
            return api.retrieve_job(recorded["job_id"]), False
        except RemoteNotFound:
            raise TonetuneError(
                f"job {recorded['job_id']} (recorded in {ledger.path}) does not exist at {api.host}: "
                "pass --new-job to create a new one (paid)"
            ) from None
    known = ledger.known_job_ids(api.endpoint, identity)
    if new_job:  # every job that exists now is an old one; only a job made by our own attempt counts
        known |= {job.id for job in api.find_jobs(identity)}

    def adoptable():
        """A job with this identity not known yet: made by an attempt whose reply never arrived
        (or, without --new-job, by another machine). Running or finished beats failed."""
        jobs = [job for job in api.find_jobs(identity) if job.id not in known]
        jobs = [job for job in jobs if job.status not in ("failed", "cancelled")] or jobs
        return jobs[0] if jobs else None

    found = None if new_job else adoptable()
    if found is not None:
        print(f"openai: job {found.id} for this training set already exists at {api.host} "
              f"({found.status}); following it instead of creating another", flush=True)
        ledger.append({"kind": "job", "endpoint": api.endpoint, "identity": identity, "job_id": found.id,
                       "base_model": spec.base_model, "found_remotely": True})
        return found, False
    training_file, validation_file = files()
    job = retry_with_backoff(api, "fine_tuning.jobs.create",
                             lambda: api.create_job(spec, training_file, validation_file, metadata),
                             adoptable, api.config)
    ledger.append({"kind": "job", "endpoint": api.endpoint, "identity": identity, "job_id": job.id,
                   "base_model": spec.base_model, "training_file": training_file, "validation_file": validation_file})
    print(f"openai: created fine-tuning job {job.id} ({spec.base_model}, {spec.n_epochs} epochs, batch "
          f"{spec.batch_size}, lr multiplier {spec.learning_rate_multiplier:g}, seed {spec.seed})", flush=True)
    return job, True


def follow_job(api: FineTuningAPI, job, run_log: RunLog, config: OpenAIConfig,
               sleep: Callable[[float], None] = time.sleep):
    """Poll until the job ends, streaming new events into the run; returns the final job.

    The interval starts at poll_interval_s and doubles after each poll that brought no news (no
    status change, no event), up to poll_max_interval_s. Transient API errors are retried at
    the same pace, up to max_retries in a row."""
    seen: set[str] = set()
    interval = config.poll_interval_s
    failures = 0
    first = True
    status = None
    while True:
        try:
            if not first:
                job = api.retrieve_job(job.id)
            events = api.new_events(job.id, seen)
            failures = 0
        except TonetuneError as error:
            failures += 1
            if isinstance(error, RemoteNotFound) or failures > config.max_retries:
                raise
            print(f"openai: polling {job.id}: {error}; retrying", flush=True)
            sleep(interval)
            continue
        news = bool(events) or job.status != status
        if job.status != status:
            print(f"openai: job {job.id}: {job.status}", flush=True)
            run_log.tags({"openai.status": job.status})
            status = job.status
        log_events(events, run_log, quiet=first and len(events) > 5)
        first = False
        if job.status in TERMINAL:
            return job
        interval = config.poll_interval_s if news else min(config.poll_max_interval_s, interval * 2)
        sleep(interval)


def log_events(events: list, run_log: RunLog, quiet: bool = False) -> None:
    """Metrics events -> step metrics; message events -> printed (only the last few on a resume)."""
    rows = [(int(event.data["step"]), event.data) for event in events
            if event.type == "metrics" and isinstance(event.data, dict) and "step" in event.data]
    run_log.steps(rows)
    messages = [event for event in events if event.type != "metrics"]
    for event in messages[-3:] if quiet else messages:
        print(f"openai:   [{event.level}] {event.message}", flush=True)
    if rows:
        step, data = rows[-1]
        total = data.get("total_steps")
        print(f"openai:   step {step}{f'/{total}' if total else ''}: train_loss {data.get('train_loss')}", flush=True)


def record_results(api: FineTuningAPI, job, run_log: RunLog, out_dir: Path) -> dict[str, Any]:
    """Checkpoint metrics and the result file (step_metrics.csv) into the run; a summary dict."""
    import mlflow

    checkpoints = api.checkpoints(job.id)
    run_log.steps((checkpoint.step_number, checkpoint.metrics.model_dump(exclude_none=True))
                  for checkpoint in checkpoints)
    run_log.tags({f"openai.checkpoint.step_{c.step_number}": c.fine_tuned_model_checkpoint for c in checkpoints})
    for file_id in job.result_files or []:
        content = api.result_file(file_id)
        path = write_atomic(out_dir / "step_metrics.csv", content)
        mlflow.log_artifact(str(path), artifact_path="openai")
        run_log.steps(_csv_rows(content))
    summary = {"trained_tokens": job.trained_tokens, "checkpoints": len(checkpoints)}
    if job.trained_tokens is not None:
        mlflow.log_metric("trained_tokens", job.trained_tokens)
    if job.finished_at and job.created_at:
        mlflow.log_metric("job_wall_time_s", job.finished_at - job.created_at)
    return summary


def _csv_rows(content: bytes) -> list[tuple[int, dict[str, float]]]:
    """(step, {column: value}) rows of step_metrics.csv; empty cells skipped."""
    import csv
    import io

    rows = []
    for row in csv.DictReader(io.StringIO(content.decode("utf-8", errors="replace"))):
        try:
            step = int(float(row.pop("step")))
        except (KeyError, TypeError, ValueError):
            continue
        values = {}
        for key, value in row.items():
            with contextlib.suppress(TypeError, ValueError):
                values[key] = float(value)
        rows.append((step, values))
    return rows


# --------------------------------------------------------------------------- stages


@dataclass
class Target:
    """What one invocation is about: a base model, or a base model fine-tuned on a training file."""

    base_model: str
    train_path: Path | None
    val_path: Path
    n_train: int | None

    @property
    def name(self) -> str:
        return model_name(self.base_model, self.n_train)


def n_train_from_path(path: Path) -> int | None:
    """train_100.parquet -> 100 (the split stage's naming), else None."""
    match = TRAIN_FILE_PATTERN.search(path.name)
    return int(match.group(1)) if match else None


def write_status(out_dir: Path, target: Target, status: str, **details: Any) -> Path:
    record = {"model": target.name, "status": status, "base_model": target.base_model, "n_train": target.n_train,
              **{key: value for key, value in details.items() if value is not None}}
    return write_json(out_dir / "status.json", record)


def run_base(config: Config, target: Target, out_dir: Path, api: FineTuningAPI) -> dict[str, Any]:
    """Evaluate the base model with the verbose prompt (its own MLflow run, like eval-base)."""
    import mlflow

    from pipeline.core.predictions import read_validation

    validation = read_validation(target.val_path, config.evaluate.limit)
    run = start_run(config, target.name, None, {"stage": "openai_finetune", "tonetune.stage": "openai_finetune",
                                                "kind": "openai-base", "model": target.name})
    with run:
        mlflow.log_params({"base_model": target.base_model, "endpoint_host": api.host, "system_prompt": "verbose",
                           "seed": config.openai.seed})
        record = evaluate_model(target.name, "openai-base", target.base_model, target.base_model, "verbose",
                                validation, target.val_path, config, api, out_dir, {})
        write_status(out_dir, target, "evaluated", mlflow_run_id=run.info.run_id)
    return record


def run_finetune(config: Config, target: Target, out_dir: Path, api: FineTuningAPI, ledger: JobLedger,
                 evaluate: bool = True, new_job: bool = False, cancel: bool = False, eval_model: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Fine-tune (or resume), record everything in MLflow, evaluate; returns the status record."""
    import mlflow

    from pipeline.core.predictions import read_validation
    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT
    from pipeline.core.tracking import log_dataset_input

    settings = config.openai
    train = read_split(target.train_path, "training")
    validation = read_validation(target.val_path, config.evaluate.limit) if evaluate else None
    training = jsonl_bytes(chat_examples(train, CONCISE_SYSTEM_PROMPT))
    n_examples = validate_chat_jsonl(training, f"{target.train_path} as chat JSONL", settings)
    write_atomic(out_dir / "train.jsonl", training)
    validation_bytes = None
    if settings.validation_file:
        validation_bytes = jsonl_bytes(chat_examples(read_split(target.val_path, "validation"), CONCISE_SYSTEM_PROMPT))
        validate_chat_jsonl(validation_bytes, f"{target.val_path} as chat JSONL", settings)
    spec = JobSpec.from_config(target.base_model, sha256_hex(training),
                               sha256_hex(validation_bytes) if validation_bytes else None, settings)
    identity = spec.identity
    print(f"openai: {target.name}: {n_examples} examples, identity {identity[:12]}, endpoint {api.host}", flush=True)
    metadata = {IDENTITY_KEY: identity, "tonetune_model": target.name[:512], "tonetune_n_train": str(n_examples)}

    with ledger.lock():
        if cancel:
            return cancel_job(api, ledger, spec, out_dir, target)
        recorded_run = None if new_job else ledger.run_id(api.endpoint, identity)
        run = start_run(config, target.name, recorded_run, {
            "stage": "openai_finetune", "tonetune.stage": "openai_finetune", "kind": "openai-finetuned",
            "model": target.name, "openai.identity": identity})
        if run.info.run_id != recorded_run:
            ledger.append({"kind": "run", "endpoint": api.endpoint, "identity": identity, "mlflow_run_id": run.info.run_id})
        run_log = RunLog.open(run.info.run_id)
        try:
            mlflow.log_params({
                "base_model": spec.base_model, "n_train": n_examples, "method": "supervised", "n_epochs": spec.n_epochs,
                "batch_size": spec.batch_size, "learning_rate_multiplier": spec.learning_rate_multiplier,
                "seed": spec.seed, "validation_file": bool(validation_bytes), "system_prompt": "concise",
                "identity": identity, "suffix": spec.suffix, "endpoint_host": api.host,
                "training_file_sha256": spec.training_sha256,
                "estimated_training_tokens": sum(estimated_tokens(json.loads(line)) for line in training.splitlines()),
            })
            log_dataset_input(train, target.train_path, context="training", name=target.train_path.stem)

            def files() -> tuple[str, str | None]:
                training_id = ensure_file(api, ledger, training, "train")
                validation_id = ensure_file(api, ledger, validation_bytes, "val") if validation_bytes else None
                run_log.tags({"openai.training_file": training_id, "openai.validation_file": validation_id})
                return training_id, validation_id

            job, _ = ensure_job(api, ledger, spec, files, metadata, new_job)
        except BaseException as error:
            if isinstance(error, TonetuneError):
                run_log.tags({"openai.error": str(error)})
            mlflow.end_run(status="FAILED")
            raise
    # The job exists and is recorded: polling needs no lock (a second process would only watch).
    try:
        run_log.tags({"openai.job_id": job.id, "openai.training_file": job.training_file,
                      "openai.validation_file": job.validation_file})
        write_status(out_dir, target, job.status, job_id=job.id, identity=identity, mlflow_run_id=run.info.run_id)
        job = follow_job(api, job, run_log, settings, sleep=sleep)
        summary = record_results(api, job, run_log, out_dir)
        if job.error:
            print(f"openai:   error {job.error.code}: {job.error.message}", flush=True)
        job_dump = job.model_dump(mode="json")
        mlflow.log_dict(job_dump, "openai/job.json")
        ledger.append({"kind": "job_update", "endpoint": api.endpoint, "job_id": job.id, "status": job.status,
                       "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens})
        details = {"job_id": job.id, "identity": identity, "mlflow_run_id": run.info.run_id,
                   "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens,
                   "training_file": job.training_file, "checkpoints": summary["checkpoints"]}
        if job.status != "succeeded":
            message = job.error.message if job.error else f"the job was {job.status}"
            code = job.error.code if job.error else None
            run_log.tags({"openai.error": message, "openai.error_code": code})
            write_status(out_dir, target, job.status, error=message, error_code=code, **details)
            mlflow.end_run(status="FAILED" if job.status == "failed" else "KILLED")
            hint = "re-run with --new-job to start a new (paid) job" if job.status == "failed" else \
                "re-run with --new-job to start it again"
            raise JobFailed(f"fine-tuning job {job.id} {job.status}: {message} ({hint})")
        run_log.tags({"openai.fine_tuned_model": job.fine_tuned_model})
        print(f"openai: job {job.id} succeeded: {job.fine_tuned_model} ({job.trained_tokens} trained tokens)", flush=True)
        status = write_status(out_dir, target, "succeeded", **details)
        if validation is not None:
            if not (eval_model or job.fine_tuned_model):
                raise TonetuneError(f"job {job.id} succeeded but names no fine_tuned_model; pass --eval-model")
            evaluate_model(target.name, "openai-finetuned", target.base_model, eval_model or job.fine_tuned_model,
                           "concise", validation, target.val_path, config, api, out_dir,
                           {"n_train": n_examples, "job_id": job.id, "fine_tuned_model": job.fine_tuned_model,
                            "trained_tokens": job.trained_tokens})
            status = write_status(out_dir, target, "evaluated", **details)
        mlflow.end_run()
        return json.loads(status.read_text())
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        if job.status in TERMINAL:
            print(f"openai: interrupted; job {job.id} is {job.status}. Run the same command again to finish "
                  "(answers received so far are cached).", file=sys.stderr)
        else:
            print(f"openai: interrupted; job {job.id} keeps running at {api.host}. Run the same command again to "
                  "resume following it (no new job is created), or add --cancel to stop it.", file=sys.stderr)
        raise SystemExit(130) from None
    except JobFailed:
        raise
    except BaseException:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        raise


def cancel_job(api: FineTuningAPI, ledger: JobLedger, spec: JobSpec, out_dir: Path, target: Target) -> dict[str, Any]:
    """Cancel the identity's job (recorded or found remotely); report what happened."""
    recorded = ledger.job(api.endpoint, spec.identity)
    job_id = recorded["job_id"] if recorded else next((j.id for j in api.find_jobs(spec.identity)), None)
    if job_id is None:
        print(f"openai: no job for {target.name} (identity {spec.identity[:12]}) at {api.host}: nothing to cancel")
        return {"status": "none"}
    job = api.retrieve_job(job_id)
    if job.status not in TERMINAL:
        job = api.cancel_job(job_id)
    ledger.append({"kind": "job_update", "endpoint": api.endpoint, "job_id": job.id, "status": job.status})
    print(f"openai: job {job.id} is {job.status}")
    write_status(out_dir, target, job.status, job_id=job.id, identity=spec.identity)
    return {"status": job.status, "job_id": job.id}


def collect(config: Config, runs_dir: Path = RUNS_DIR, out_dir: Path = COLLECTED_DIR) -> list[Path]:
    """Copy the metrics records of the models params name (and that were evaluated) to
    metrics/openai/, which the report reads; models without one are shown there as not run.
    metrics/openai/summary.yaml counts them (scalars for `dvc metrics show`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.json"):
        stale.unlink()
    settings = config.openai
    names = [model_name(base) for base in settings.base_models]
    names += [model_name(base, n) for base, n in itertools.product(settings.base_models, settings.n_train)]
    written, missing = [], []
    for name in names:
        source, status_file = runs_dir / name / "metrics.json", runs_dir / name / "status.json"
        status = json.loads(status_file.read_text()).get("status") if status_file.is_file() else None
        if settings.enabled and status == "evaluated" and source.is_file():
            written.append(write_atomic(out_dir / f"{name}.json", source.read_bytes()))
        else:
            missing.append(f"{name} ({status or 'no status'})")
    # Always written, so the DVC metrics folder is never empty (an empty one reads as deleted in a
    # fresh clone); .yaml (JSON is YAML) so the report's *.json records loader skips it.
    summary = {"enabled": settings.enabled, "models_expected": len(names), "models_evaluated": len(written)}
    write_atomic(out_dir / "summary.yaml", (json.dumps(summary) + "\n").encode())
    reason = "" if settings.enabled else " (openai.enabled is false)"
    print(f"openai: {len(written)} model(s) evaluated -> {out_dir}; not run{reason}: {', '.join(missing) or 'none'}")
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.openai_finetune",
        description="Optional OpenAI arm (params: openai.*): fine-tune --base-model on --train (chat JSONL with the "
        "concise prompt), follow the job into MLflow and evaluate the fine-tuned model on --val; without --train, "
        "evaluate the base model with the verbose prompt. Idempotent: a re-run resumes the recorded job. "
        f"Key: ${KEY_ENV}; endpoint: openai.base_url, else $OPENAI_BASE_URL, else api.openai.com.",
    )
    parser.add_argument("--base-model", help="e.g. gpt-4o-mini-2024-07-18")
    parser.add_argument("--train", type=Path, help="training split parquet (question, answer); omit for the base model")
    parser.add_argument("--val", type=Path, default=VAL_SPLIT_PATH, help=f"validation split (default {VAL_SPLIT_PATH})")
    parser.add_argument("--out-dir", type=Path, help=f"outputs (default {RUNS_DIR}/<model>)")
    parser.add_argument("--no-eval", action="store_true", help="fine-tune only, do not evaluate")
    parser.add_argument("--eval-model", help="evaluate this model id instead of the job's fine_tuned_model "
                        "(Azure: the deployment name)")
    parser.add_argument("--new-job", action="store_true", help="create a new (paid) job even if this training set "
                        "already has one (e.g. after a failure)")
    parser.add_argument("--cancel", action="store_true", help="cancel this training set's job")
    parser.add_argument("--collect", action="store_true", help=f"write {COLLECTED_DIR}/*.json for the report")
    args = parser.parse_args(argv)
    if not args.collect and not args.base_model:
        parser.error("--base-model is required (or --collect)")
    if args.cancel and not args.train:
        parser.error("--cancel needs --train (the job's training set)")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    if args.collect:
        collect(config)
        return
    target = Target(args.base_model, args.train, args.val, n_train_from_path(args.train) if args.train else None)
    if not config.openai.enabled:  # the demo: a status file in milliseconds, nothing imported or sent
        if args.train and target.n_train is None:
            target.n_train = len(read_split(args.train, "training"))
        write_status(args.out_dir or RUNS_DIR / target.name, target, "not_run", reason="openai.enabled is false")
        print(f"openai: {target.name}: not run (openai.enabled is false; enable with "
              "`dvc exp run -S openai.enabled=true` and export OPENAI_API_KEY)")
        return
    api = FineTuningAPI(config.openai.base_url, api_key_from_env(), config.openai)
    if args.train is None:
        run_base(config, target, args.out_dir or RUNS_DIR / target.name, api)
        return
    target.n_train = len(read_split(args.train, "training"))  # the name says how many rows were used
    run_finetune(config, target, args.out_dir or RUNS_DIR / target.name, api, JobLedger(),
                 evaluate=not args.no_eval, new_job=args.new_job, cancel=args.cancel, eval_model=args.eval_model)


if __name__ == "__main__":
    main()
