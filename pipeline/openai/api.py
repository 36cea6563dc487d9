"""The OpenAI API as this arm uses it: the few calls, their errors in one line, and the one
retry helper for everything that is not a chat completion.

Owns: `FineTuningAPI` (files, fine-tuning jobs, events, checkpoints through the real `openai`
client), the error classes, the key from OPENAI_API_KEY, provider tolerance, and `retrying`
(tenacity: exponential backoff with full jitter for transient failures, with an optional
"did it happen after all?" check before a non-idempotent request is sent again).
Does not own: deciding what to create or reuse (jobs.py), the ledger, chat completions
(pipeline.core.llmclient).

Provider tolerance. Several OpenAI-compatible providers serve only part of the Files and
fine-tuning APIs. The optional routes (files list / retrieve / content, jobs list, events,
checkpoints) only make the arm smarter (finding work a crashed run left behind, streaming
metrics); when one answers 404 or 405 as a route the provider does not serve, the call returns
a fallback and prints one notice per route, and the arm goes on with what the ledger knows.
A 404 whose message names the object asked for (the OpenAI API's "No such File object:
file-abc") is "that object is gone"; one that only echoes the URL ("Invalid URL (GET
/v1/files/file-abc)") or names nothing is "no such route". Required routes (upload, create job,
retrieve job, chat) still fail loudly with the server's message.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pipeline.core.config import OpenAIConfig
from pipeline.core.errors import TonetuneError
from pipeline.core.llmclient import server_message
from pipeline.openai.spec import IDENTITY_KEY, JobSpec

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

# Optional route -> what the arm does without it (the second half of the one-line notice).
OPTIONAL_ROUTES = {
    "GET /files": "uploads are matched through the ledger only",
    "GET /files/{file_id}": "the recorded file id is used without checking it still exists",
    "GET /files/{file_id}/content": "no step_metrics.csv",
    "GET /fine_tuning/jobs": "jobs are found through the ledger only",
    "GET /fine_tuning/jobs/{job_id}/events": "following the job by its status only (no per-step metrics while it runs)",
    "GET /fine_tuning/jobs/{job_id}/checkpoints": "no checkpoint metrics",
}


class APIError(TonetuneError):
    """An API call failed; `transient` says whether trying again later may help."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class RemoteNotFound(APIError):
    """The API answered 404 for an object we asked for by id (the object is gone)."""


class RouteUnavailable(APIError):
    """The provider does not serve this route (405, or a 404 that does not name the object)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def api_key_from_env(config: OpenAIConfig) -> str:
    """The key from the variable `openai.client.api_key_env` names (OPENAI_API_KEY), or one line
    saying so (before anything is uploaded)."""
    key_env = config.client.api_key_env
    key = os.environ.get(key_env, "").strip()
    if not key:
        raise TonetuneError(
            f"environment variable {key_env} is not set: export the key of the OpenAI (or Azure OpenAI) "
            "account that should run the fine-tuning; nothing was uploaded"
        )
    return key


class FineTuningAPI:
    """The few calls this stage makes, through the real `openai` client, with errors in one line.

    Reads (GET) use the SDK's own retries. Uploads and job creation are sent once per attempt
    (max_retries=0): a timed-out creation may have happened, so the caller looks before retrying.
    `degraded` maps each optional route the provider turned out not to serve to its notice."""

    def __init__(self, base_url: str | None, api_key: str, config: OpenAIConfig):
        import openai

        self._openai = openai
        self.api_key = api_key  # for the chat client of the evaluation; never logged
        self.config = config
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=config.client.max_retries,
                                    timeout=config.client.request_timeout_s)
        self.once = self.client.with_options(max_retries=0)
        # The resolved endpoint: params, else OPENAI_BASE_URL, else api.openai.com (never credentials).
        parts = urlsplit(str(self.client.base_url))
        self.endpoint = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"
        self.host = parts.hostname or self.endpoint
        self.degraded: dict[str, str] = {}

    def call(self, what: str, function: Callable, *args, ids: tuple[str, ...] = (), **kwargs):
        """function(*args, **kwargs); API errors become one-line APIErrors (key scrubbed), marked
        transient for timeouts, connection errors and 408/409/429/5xx. A 404 is `RemoteNotFound`
        when the server's message names one of `ids` (the objects in the path) other than by
        echoing the URL, else `RouteUnavailable`, like a 405."""
        openai = self._openai
        try:
            return function(*args, **kwargs)
        except openai.APIStatusError as error:
            status = error.status_code
            server = server_message(error)
            message = f"{what}: HTTP {status} from {self.host}: {server}".replace(self.api_key, "***")
            if status == 404 and any(object_id in server and f"/{object_id}" not in server for object_id in ids):
                raise RemoteNotFound(message) from None
            if status in (404, 405):
                raise RouteUnavailable(message, status) from None
            raise APIError(message, transient=status in (408, 409, 429) or status >= 500) from None
        except openai.APIConnectionError as error:  # timeouts included
            message = f"{what}: cannot reach {self.host}: {error}".replace(self.api_key, "***")
            raise APIError(message, transient=True) from None

    def optional(self, route: str, fallback: Any, what: str, function: Callable, *args,
                 ids: tuple[str, ...] = (), **kwargs):
        """`call` for an optional route: when the provider does not serve it, one notice (once per
        route) and `fallback` instead of an error."""
        try:
            return self.call(what, function, *args, ids=ids, **kwargs)
        except RouteUnavailable as error:
            if route not in self.degraded:
                notice = (f"openai: {self.host} does not serve {route} (HTTP {error.status}): "
                          f"{OPTIONAL_ROUTES[route]}")
                self.degraded[route] = notice
                print(notice, file=sys.stderr, flush=True)
            return fallback

    # ----------------------------------------------------------------- files

    def retrieve_file(self, file_id: str):
        """The file's record; None when the provider does not serve GET /files/{id}."""
        return self.optional("GET /files/{file_id}", None, f"files.retrieve({file_id})", self.client.files.retrieve,
                             file_id, ids=(file_id,))

    def find_file(self, filename: str, size: int) -> str | None:
        """A fine-tune file already uploaded under `filename` with `size` bytes (newest first)."""
        files = self.optional("GET /files", [], "files.list", lambda: list(self.client.files.list(purpose="fine-tune")))
        matches = [f for f in files if f.filename == filename and f.bytes == size and f.status != "error"]
        return max(matches, key=lambda f: f.created_at).id if matches else None

    def upload(self, filename: str, data: bytes):
        return self.once.files.create(file=(filename, data, "application/jsonl"), purpose="fine-tune")

    def result_file(self, file_id: str) -> bytes | None:
        """A result file's bytes, base64-decoded when the API served them encoded (None when the
        provider does not serve file contents)."""
        import base64
        import binascii

        response = self.optional("GET /files/{file_id}/content", None, f"files.content({file_id})",
                                 self.client.files.content, file_id, ids=(file_id,))
        if response is None:
            return None
        content = response.read()
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
        that ignores the filter returns every job). Empty when the provider does not list jobs."""
        jobs = self.optional("GET /fine_tuning/jobs", [], "fine_tuning.jobs.list",
                             lambda: list(self.client.fine_tuning.jobs.list(metadata={IDENTITY_KEY: identity}, limit=100)))
        tagged = [job for job in jobs if (job.metadata or {}).get(IDENTITY_KEY) == identity]
        return sorted(tagged, key=lambda job: job.created_at, reverse=True)

    @property
    def lists_jobs(self) -> bool:
        """False once the provider turned out not to serve the job list."""
        return "GET /fine_tuning/jobs" not in self.degraded

    def create_job(self, spec: JobSpec, training_file: str, validation_file: str | None, metadata: dict[str, str]):
        kwargs = {"validation_file": validation_file} if validation_file else {}
        return self.once.fine_tuning.jobs.create(
            model=spec.base_model, training_file=training_file, method=spec.method(), seed=spec.seed,
            suffix=spec.suffix, metadata=metadata, **kwargs,
        )

    def retrieve_job(self, job_id: str):
        return self.call(f"fine_tuning.jobs.retrieve({job_id})", self.client.fine_tuning.jobs.retrieve, job_id,
                         ids=(job_id,))

    def cancel_job(self, job_id: str):
        return self.call(f"fine_tuning.jobs.cancel({job_id})", self.client.fine_tuning.jobs.cancel, job_id,
                         ids=(job_id,))

    def new_events(self, job_id: str, seen: set[str]) -> list:
        """Events not in `seen`, oldest first (the API pages newest first: stop at a known one).
        Empty when the provider does not serve events."""
        def newest_first() -> list:
            fresh = []
            for event in self.client.fine_tuning.jobs.list_events(job_id, limit=100):
                if event.id in seen:
                    break
                fresh.append(event)
            return fresh

        fresh = self.optional("GET /fine_tuning/jobs/{job_id}/events", [], f"list_events({job_id})", newest_first,
                              ids=(job_id,))
        seen.update(event.id for event in fresh)
        return list(reversed(fresh))

    def checkpoints(self, job_id: str) -> list:
        """The job's checkpoints by step; empty when the provider does not serve them."""
        page = self.optional("GET /fine_tuning/jobs/{job_id}/checkpoints", [], f"checkpoints.list({job_id})",
                             lambda: list(self.client.fine_tuning.jobs.checkpoints.list(job_id)), ids=(job_id,))
        return sorted(page, key=lambda checkpoint: checkpoint.step_number)


def retrying(what: str, attempt_once: Callable[[], Any], config: OpenAIConfig,
             check_first: Callable[[], Any] | None = None, wait_s: float | None = None,
             sleep: Callable[[float], None] = time.sleep):
    """attempt_once(), tried again after a transient APIError, up to `config.client.max_retries` times.

    The one retry helper of this arm (tenacity). Waits are exponential with full jitter (at most
    60 s), or a fixed `wait_s` (polling keeps its pace). For a non-idempotent request,
    `check_first()` (did it happen after all?) runs before each new attempt; what it finds is
    returned instead of sending again. Non-transient errors are raised at once."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_fixed, wait_random_exponential

    def before_sleep(state) -> None:
        error = state.outcome.exception()
        action = "checking whether it happened before retrying" if check_first else "retrying"
        print(f"openai: {error}; {action}", flush=True)

    retry = Retrying(
        stop=stop_after_attempt(config.client.max_retries + 1),
        wait=wait_fixed(wait_s) if wait_s is not None else wait_random_exponential(multiplier=1, max=60),
        retry=retry_if_exception(lambda error: isinstance(error, APIError) and error.transient),
        sleep=sleep, reraise=True, before_sleep=before_sleep,
    )
    for attempt in retry:
        with attempt:
            if check_first is not None and attempt.retry_state.attempt_number > 1:
                found = check_first()
                if found is not None:
                    return found
            return attempt_once()
    raise AssertionError("unreachable")  # pragma: no cover
