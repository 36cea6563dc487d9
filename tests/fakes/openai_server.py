"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API for the real client.

Tests and the benchmark point the real `openai` package at it (base_url = server.base_url), so
the whole client path runs: HTTP/1.1 keep-alive, status codes, headers, JSON bodies, timeouts.

    with FakeOpenAIServer(chat=behaviour, latency_s=0.01) as server:
        ...  # server.base_url, server.chat_calls, server.requests

`chat` decides each chat-completions reply from the request (a `RecordedRequest`): return a
string (the assistant's content) or a `FakeReply` for anything else: an HTTP error with
headers (429 + Retry-After, 500, 401/404 with the OpenAI error body), a delay (to trigger
client timeouts), a malformed JSON body, or a dropped connection. `Script` plays a list of
replies in order. The server counts chat calls and records every request's headers, so a test
can check the Authorization header and that the key appears nowhere else.

Routes live in a table (`server.route(method, "/v1/fine_tuning/jobs/{job_id}", handler)`), so
other endpoints (files, fine-tuning jobs) can be added without touching the HTTP plumbing;
`server.disable("GET", "/v1/files")` makes one route answer like a provider that does not serve
it (404 "Invalid URL (...)", or 405), counting the refusals in `server.refused`.

As a process (the kill -9 test and bench/generate.py run it this way so that its CPU use does
not share the client's interpreter):

    python -m tests.fakes.openai_server --port 0 --latency-ms 200 [--behaviour tonetune]

prints `listening on http://127.0.0.1:PORT/v1` and serves until killed; GET /_fake/stats
returns the counters as JSON.

Files and fine-tuning jobs (`server.fine_tuning`, a `FakeFineTuning`): multipart uploads,
files list/retrieve/content/delete, fine_tuning.jobs create/retrieve/list (metadata filter)/
cancel/events/checkpoints. Each retrieve moves a job one step along its `JobPlan` (default:
validating_files -> queued -> running -> running -> succeeded), so tests drive progress by
polling; the server counts uploads and job creations (also in /_fake/stats).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeReply:
    """One scripted HTTP answer. Build with the class methods; `delay_s` adds to the latency."""

    status: int = 200
    content: str | None = None
    json_body: Any = None
    raw_body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False

    @classmethod
    def chat(cls, content: str, delay_s: float = 0.0) -> FakeReply:
        """A normal chat completion whose assistant message is `content`."""
        return cls(content=content, delay_s=delay_s)

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None,
              delay_s: float = 0.0, code: str | None = None) -> FakeReply:
        """An HTTP error with OpenAI's error body: {"error": {"message", "type", "code"}}."""
        body = {"error": {"message": message, "type": "fake_error", "code": code or str(status)}}
        return cls(status=status, json_body=body, headers=dict(headers or {}), delay_s=delay_s)

    @classmethod
    def rate_limited(cls, retry_after: str | float, message: str = "Rate limit exceeded") -> FakeReply:
        """429 with a Retry-After header (seconds, or an HTTP date string)."""
        return cls.error(429, message, headers={"Retry-After": str(retry_after)}, code="rate_limit_exceeded")

    @classmethod
    def malformed(cls, body: bytes = b'{"id": "chatcmpl-x", "choices": [', status: int = 200) -> FakeReply:
        """A body that is not valid JSON."""
        return cls(status=status, raw_body=body, headers={"Content-Type": "application/json"})

    @classmethod
    def slow(cls, delay_s: float, content: str = "too late") -> FakeReply:
        """A reply that arrives after `delay_s` (longer than the client's timeout: a timeout)."""
        return cls(content=content, delay_s=delay_s)

    @classmethod
    def disconnect(cls) -> FakeReply:
        """Close the connection without answering (the client sees a connection error)."""
        return cls(drop=True)


@dataclass
class RecordedRequest:
    """What the server received: method, path, lower-cased headers, body (parsed if JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    raw_body: bytes
    body: Any
    index: int = 0  # 0-based count of requests to this route before this one
    path_params: dict[str, str] = field(default_factory=dict)
    received_at: float = field(default_factory=time.monotonic)
    query: dict[str, str] = field(default_factory=dict)  # ?a=1&b=2 (last value wins)

    @property
    def messages(self) -> list[dict[str, str]]:
        return (self.body or {}).get("messages", []) if isinstance(self.body, dict) else []

    @property
    def last_user_message(self) -> str:
        users = [m.get("content") or "" for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""


ChatBehaviour = Callable[[RecordedRequest], "str | FakeReply"]
RouteHandler = Callable[[RecordedRequest], FakeReply]


class Script:
    """Replies played in order, one per chat call, then `then` (a behaviour) for the rest."""

    def __init__(self, replies: Iterable[str | FakeReply], then: ChatBehaviour | None = None):
        self._replies = list(replies)
        self._then = then or echo_behaviour
        self._lock = threading.Lock()
        self._next = 0

    def __call__(self, request: RecordedRequest) -> str | FakeReply:
        with self._lock:
            position, self._next = self._next, self._next + 1
        if position < len(self._replies):
            return self._replies[position]
        return self._then(request)


def echo_behaviour(request: RecordedRequest) -> str:
    """Answer with the last user message, prefixed (a generic stand-in)."""
    return f"echo: {request.last_user_message[:200]}"


def _first_sentence(text: str) -> str:
    match = re.match(r"(.+?[.!?])(\s|$)", text.strip(), re.DOTALL)
    return " ".join((match.group(1) if match else text.strip()).split())


def tonetune_step(request: RecordedRequest) -> str:
    """Which of tonetune's requests this is: qa, rephrase or simplify (by message structure)."""
    from pipeline.generate import prompts

    messages = request.messages
    if messages and messages[0].get("content") == prompts.QA_SYSTEM:
        return "qa"
    return "rephrase" if len(messages) <= 2 else "simplify"


def tonetune_behaviour(request: RecordedRequest) -> str:
    """A deterministic, well-behaved generator for tonetune's prompts (no randomness at all).

    qa: the question names the article title; the answer is the section's first sentence.
    rephrase: "Sure. " + the factual answer; simplify: "So, " + the factual answer.
    """
    user = request.messages[1].get("content", "") if len(request.messages) > 1 else ""
    step = tonetune_step(request)
    if step == "qa":
        title = re.search(r'article "(.*?)":', user)
        section = user.split("\n\n")[1] if "\n\n" in user else user
        name = title.group(1) if title else "this"
        return json.dumps({"question": f"What should I know about {name}?", "answer": _first_sentence(section)})
    facts = re.search(r"^Answer: (.*)$", user, re.MULTILINE)
    text = facts.group(1) if facts else user
    return ("Sure. " if step == "rephrase" else "So, ") + text


def tone_behaviour(request: RecordedRequest) -> str:
    """Evaluation of the OpenAI arm: a fine-tuned model (`ft:...`) answers plainly and briefly, a base
    model like a encyclopaedia, so % conversational separates them the way the paper's do."""
    model = str((request.body or {}).get("model", "")) if isinstance(request.body, dict) else ""
    topic = " ".join(request.last_user_message.split()[:6]).rstrip("?.!")
    if model.startswith("ft:"):
        return f"Sure. It is about {topic.lower()}. It is a fun thing to know, and it is not hard."
    return (f"Regarding {topic.lower()}, the available documentation indicates considerable historical "
            "significance, characterised by multifaceted developments and institutional interpretations.")


BEHAVIOURS: dict[str, ChatBehaviour] = {"echo": echo_behaviour, "tonetune": tonetune_behaviour,
                                        "tone": tone_behaviour}


def _usage(request: RecordedRequest, content: str) -> dict[str, int]:
    """Plausible token counts (4 characters a token), so cost accounting has numbers to add."""
    prompt = sum(len(m.get("content") or "") for m in request.messages) // 4 + 1
    completion = len(content) // 4 + 1
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion_body(request: RecordedRequest, content: str) -> dict[str, Any]:
    """A complete ChatCompletion object, as the real API returns it."""
    body = request.body if isinstance(request.body, dict) else {}
    digest = hashlib.sha256(request.raw_body).hexdigest()[:24]
    return {
        "id": f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake-model"),
        "system_fingerprint": "fp_fake",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }],
        "usage": _usage(request, content),
    }


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 64+ clients connect at once; the default backlog of 5 stalls them
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        """Stay quiet when a client hangs up mid-request (a stage exiting on a fatal error closes
        its in-flight connections): socketserver would print a traceback between dashed lines
        to stderr, after the stage's own one-line error. Anything else is still reported."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class FakeOpenAIServer:
    """The loopback server: a route table over a ThreadingHTTPServer in a background thread."""

    def __init__(self, chat: ChatBehaviour | None = None, latency_s: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0):
        self.chat_behaviour = chat or echo_behaviour
        self.latency_s = latency_s
        self.requests: list[RecordedRequest] = []
        self.chat_calls = 0
        self.max_concurrent = 0
        self.refused: dict[str, int] = {}  # "METHOD pattern" -> requests refused by `disable`
        self._concurrent = 0
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern, RouteHandler]] = []
        self.route("POST", "/v1/chat/completions", self._chat_route)
        self.route("GET", "/v1/models", lambda request: FakeReply(json_body={"object": "list", "data": []}))
        self.route("GET", "/_fake/stats", lambda request: FakeReply(json_body=self.stats()))
        self.fine_tuning = FakeFineTuning(self)  # files + fine_tuning.jobs routes
        self._httpd = _ThreadingServer((host, port), self._handler_class())
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- public API

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def route(self, method: str, pattern: str, handler: RouteHandler) -> None:
        """Serve `method pattern` with `handler`; `{name}` in the pattern matches one path segment.
        Later routes win, so a test can override a default one."""
        regex = re.compile("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(pattern)) + "$")
        self._routes.insert(0, (method.upper(), regex, handler))

    def disable(self, method: str, pattern: str, status: int = 404) -> None:
        """Stop serving `method pattern`, as a provider that does not implement that route: 404
        with the real API's "Invalid URL (METHOD /path)" body, or 405 Method Not Allowed."""
        def refuse(request: RecordedRequest) -> FakeReply:
            with self._lock:
                self.refused[f"{method.upper()} {pattern}"] = self.refused.get(f"{method.upper()} {pattern}", 0) + 1
            if status == 405:
                return FakeReply.error(405, "Method Not Allowed", headers={"Allow": "POST"}, code="method_not_allowed")
            return FakeReply.error(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")

        self.route(method, pattern, refuse)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = {"chat_calls": self.chat_calls, "requests": len(self.requests),
                     "max_concurrent": self.max_concurrent}
        return {**stats, **self.fine_tuning.stats()}

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ----------------------------------------------------------------- internals

    def _chat_route(self, request: RecordedRequest) -> FakeReply:
        with self._lock:
            self.chat_calls += 1
        result = self.chat_behaviour(request)
        reply = FakeReply.chat(result) if isinstance(result, str) else result
        if reply.status == 200 and reply.content is not None and reply.json_body is None and reply.raw_body is None:
            reply = FakeReply(json_body=chat_completion_body(request, reply.content), headers=reply.headers,
                              delay_s=reply.delay_s)
        return reply

    def _dispatch(self, method: str, path: str, headers: dict[str, str], raw_body: bytes) -> FakeReply:
        path, _, query_string = path.partition("?")
        query = dict(urllib.parse.parse_qsl(query_string, keep_blank_values=True))
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = None
        for route_method, regex, handler in self._routes:
            match = regex.match(path)
            if route_method == method and match:
                with self._lock:
                    index = self._counts.get(regex.pattern + method, 0)
                    self._counts[regex.pattern + method] = index + 1
                    request = RecordedRequest(method, path, headers, raw_body, body, index, match.groupdict(),
                                              query=query)
                    self.requests.append(request)
                return handler(request)
        return FakeReply.error(404, f"Invalid URL ({method} {path})", code="unknown_url")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real API
            disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stalls on small replies

            def log_message(self, format, *args):  # noqa: A002 (quiet: tests capture output)
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw_body = self.rfile.read(length) if length else b""
                headers = {key.lower(): value for key, value in self.headers.items()}
                with server._lock:
                    server._concurrent += 1
                    server.max_concurrent = max(server.max_concurrent, server._concurrent)
                try:
                    reply = server._dispatch(self.command, self.path, headers, raw_body)
                    delay = server.latency_s + reply.delay_s
                    if delay:
                        time.sleep(delay)
                finally:
                    with server._lock:
                        server._concurrent -= 1
                if reply.drop:
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                if reply.raw_body is not None:
                    payload = reply.raw_body
                else:
                    payload = json.dumps(reply.json_body if reply.json_body is not None else {}).encode()
                head = [f"HTTP/1.1 {reply.status} {self.responses.get(reply.status, ('',))[0]}",
                        f"Content-Length: {len(payload)}", "Connection: keep-alive"]
                extra = {key.lower() for key in reply.headers}
                if "content-type" not in extra:
                    head.append("Content-Type: application/json")
                head += [f"{key}: {value}" for key, value in reply.headers.items()]
                try:  # one write: headers and body leave in the same segment
                    self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (timeout): fine

            do_GET = do_POST = do_DELETE = do_PUT = _serve

        return Handler


# --------------------------------------------------------------------------- files + fine-tuning


@dataclass
class JobPlan:
    """How a fake fine-tuning job moves: `statuses[i]` is its status after the i-th retrieve (the
    last one stays). A `failed` status carries `error`; metrics events are emitted while running."""

    statuses: tuple[str, ...] = ("validating_files", "queued", "running", "running", "succeeded")
    error_message: str = "The job failed due to an unknown error."
    error_code: str = "server_error"
    result_base64: bool = True  # the real API serves step_metrics.csv base64-encoded

    @classmethod
    def failing(cls, message: str, code: str = "invalid_training_file") -> JobPlan:
        return cls(statuses=("validating_files", "running", "failed"), error_message=message, error_code=code)

    @classmethod
    def endless(cls) -> JobPlan:
        """Never finishes on its own (for cancel and crash tests)."""
        return cls(statuses=("validating_files", "queued", "running"))


TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


def _multipart_fields(content_type: str, raw_body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (email's MIME parser)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + raw_body
    )
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _cursor_page(items: list[dict[str, Any]], query: dict[str, str], default_limit: int = 20) -> dict[str, Any]:
    """OpenAI's cursor pagination over `items` (already in the API's order): after + limit."""
    start = 0
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    limit = int(query.get("limit") or default_limit)
    page = items[start:start + limit]
    return {"object": "list", "data": page, "has_more": start + limit < len(items)}


class FakeFineTuning:
    """The Files API and fine_tuning.jobs, in memory, as the real client sees them.

    A job's status advances by one step of its `JobPlan` per retrieve (GET /fine_tuning/jobs/{id}),
    so a test controls progress by polling, not by the clock. While running it emits `metrics`
    events (step, train_loss, train_mean_token_accuracy[, valid_loss]); on success it gets a
    fine_tuned_model, trained_tokens, one checkpoint per epoch (the last three) and a result file
    (step_metrics.csv, base64-encoded as the real API serves it). Counters: `uploads`,
    `jobs_created`, `cancels`. `plan` picks each new job's JobPlan (default: success in 5 polls).

    Crash tests hold a job creation: `hold_create = "before"` parks the request before the job
    exists, `"after"` after it exists but before the reply leaves; `create_held` is set when a
    request is parked and `release_create` lets it go (a "before" request then creates nothing).
    `lose_create_replies = n`: the next n creations happen but answer 502 (a lost reply).
    """

    def __init__(self, server: FakeOpenAIServer):
        self.server = server
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}  # oldest first
        self.checkpoints: dict[str, list[dict[str, Any]]] = {}
        self.uploads = 0
        self.jobs_created = 0
        self.cancels = 0
        self.retrieves = 0
        self.plan: Callable[[dict[str, Any]], JobPlan] = lambda body: JobPlan()
        self.hold_create: str | None = None
        self.lose_create_replies = 0
        self.create_held = threading.Event()
        self.release_create = threading.Event()
        self._plans: dict[str, JobPlan] = {}
        self._polls: dict[str, int] = {}
        self._steps_done: dict[str, int] = {}
        self._lock = threading.RLock()
        self._serial = 0
        server.route("POST", "/v1/files", self._upload)
        server.route("GET", "/v1/files", self._list_files)
        server.route("GET", "/v1/files/{file_id}", self._retrieve_file)
        server.route("DELETE", "/v1/files/{file_id}", self._delete_file)
        server.route("GET", "/v1/files/{file_id}/content", self._file_content)
        server.route("POST", "/v1/fine_tuning/jobs", self._create_job)
        server.route("GET", "/v1/fine_tuning/jobs", self._list_jobs)
        server.route("GET", "/v1/fine_tuning/jobs/{job_id}", self._retrieve_job)
        server.route("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", self._cancel_job)
        server.route("GET", "/v1/fine_tuning/jobs/{job_id}/events", self._list_events)
        server.route("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", self._list_checkpoints)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"uploads": self.uploads, "jobs_created": self.jobs_created, "cancels": self.cancels,
                    "job_retrieves": self.retrieves}

    def _next_id(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-fake{self._serial:04d}{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:8]}"

    def polls_of(self, job_id: str) -> int:
        """How many times this job has been retrieved."""
        with self._lock:
            return self._polls.get(job_id, 0)

    def replan(self, job_id: str, plan: JobPlan) -> None:
        """Give a running job a new plan from now on (e.g. let an endless job finish)."""
        with self._lock:
            self._plans[job_id] = plan
            self._polls[job_id] = 0

    # ----------------------------------------------------------------- files

    def _add_file(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        with self._lock:
            file_id = self._next_id("file")
            record = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                      "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                      "status_details": None}
            self.files[file_id] = record
            self.contents[file_id] = content
            return record

    def _upload(self, request: RecordedRequest) -> FakeReply:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return FakeReply.error(400, f"expected multipart/form-data, got {content_type!r}", code="invalid_request")
        fields = _multipart_fields(content_type, request.raw_body)
        if "file" not in fields or "purpose" not in fields:
            return FakeReply.error(400, f"missing form field(s): {sorted({'file', 'purpose'} - set(fields))}")
        filename, content = fields["file"]
        purpose = fields["purpose"][1].decode()
        if purpose == "fine-tune" and not (filename or "").endswith(".jsonl"):
            return FakeReply.error(400, "Invalid file format for Fine-Tuning API. Must be .jsonl", code="invalid_file")
        with self._lock:
            self.uploads += 1
        return FakeReply(json_body=self._add_file(filename or "upload", content, purpose))

    def _list_files(self, request: RecordedRequest) -> FakeReply:
        with self._lock:
            files = sorted(self.files.values(), key=lambda f: (f["created_at"], f["id"]),
                           reverse=request.query.get("order", "desc") == "desc")
        purpose = request.query.get("purpose")
        if purpose:
            files = [f for f in files if f["purpose"] == purpose]
        return FakeReply(json_body=_cursor_page(files, request.query, default_limit=10_000))

    def _retrieve_file(self, request: RecordedRequest) -> FakeReply:
        record = self.files.get(request.path_params["file_id"])
        if record is None:
            return FakeReply.error(404, f"No such File object: {request.path_params['file_id']}", code="not_found")
        return FakeReply(json_body=record)

    def _delete_file(self, request: RecordedRequest) -> FakeReply:
        file_id = request.path_params["file_id"]
        with self._lock:
            existed = self.files.pop(file_id, None) is not None
            self.contents.pop(file_id, None)
        if not existed:
            return FakeReply.error(404, f"No such File object: {file_id}", code="not_found")
        return FakeReply(json_body={"id": file_id, "object": "file", "deleted": True})

    def _file_content(self, request: RecordedRequest) -> FakeReply:
        content = self.contents.get(request.path_params["file_id"])
        if content is None:
            return FakeReply.error(404, f"No such File object: {request.path_params['file_id']}", code="not_found")
        return FakeReply(raw_body=content, headers={"Content-Type": "application/octet-stream"})

    # ----------------------------------------------------------------- jobs

    def _create_job(self, request: RecordedRequest) -> FakeReply:
        body = request.body if isinstance(request.body, dict) else {}
        hold = self.hold_create
        if hold == "before":
            self.create_held.set()
            self.release_create.wait(30)
            return FakeReply.error(503, "the client went away before the job was created")
        training_file = body.get("training_file")
        if training_file not in self.files:
            return FakeReply.error(400, f"invalid training_file: {training_file}", code="invalid_request_error")
        validation_file = body.get("validation_file")
        if validation_file and validation_file not in self.files:
            return FakeReply.error(400, f"invalid validation_file: {validation_file}", code="invalid_request_error")
        if not body.get("model"):
            return FakeReply.error(400, "model is required", code="invalid_request_error")
        method = body.get("method") or {"type": "supervised", "supervised": {}}
        hyperparameters = dict(((method.get("supervised") or {}).get("hyperparameters")) or body.get("hyperparameters") or {})
        for key in ("n_epochs", "batch_size", "learning_rate_multiplier"):
            hyperparameters.setdefault(key, "auto")
        with self._lock:
            job_id = self._next_id("ftjob")
            job = {
                "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "error": None,
                "fine_tuned_model": None, "finished_at": None, "hyperparameters": hyperparameters,
                "model": body["model"], "organization_id": "org-fake", "result_files": [],
                "seed": body.get("seed") if body.get("seed") is not None else 42, "status": "validating_files",
                "trained_tokens": None, "training_file": training_file, "validation_file": validation_file,
                "estimated_finish": None, "integrations": [], "metadata": body.get("metadata"),
                "method": {"type": method.get("type", "supervised"),
                           "supervised": {"hyperparameters": hyperparameters}},
                "suffix": body.get("suffix"),
            }
            self.jobs[job_id] = job
            self._plans[job_id] = self.plan(body)
            self._polls[job_id] = 0
            self._steps_done[job_id] = 0
            self.events[job_id] = []
            self.checkpoints[job_id] = []
            self.jobs_created += 1
            self._event(job_id, f"Created fine-tuning job: {job_id}")
            self._event(job_id, f"Validating training file: {training_file}")
            public = self._public(job)
        if hold == "after":
            self.create_held.set()
            self.release_create.wait(30)
        with self._lock:
            if self.lose_create_replies > 0:
                self.lose_create_replies -= 1
                return FakeReply.error(502, "Bad gateway (the job was created; this reply was lost)")
        return FakeReply(json_body=public)

    @staticmethod
    def _public(job: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in job.items() if key != "suffix"}

    def _list_jobs(self, request: RecordedRequest) -> FakeReply:
        wanted = {key[len("metadata["):-1]: value for key, value in request.query.items()
                  if key.startswith("metadata[") and key.endswith("]")}
        with self._lock:
            jobs = sorted(self.jobs.values(), key=lambda j: (j["created_at"], j["id"]), reverse=True)
            jobs = [self._public(j) for j in jobs
                    if all((j.get("metadata") or {}).get(key) == value for key, value in wanted.items())]
        return FakeReply(json_body=_cursor_page(jobs, request.query))

    def _retrieve_job(self, request: RecordedRequest) -> FakeReply:
        job_id = request.path_params["job_id"]
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return FakeReply.error(404, f"No such fine-tuning job: {job_id}", code="not_found")
            self.retrieves += 1
            self._advance(job)
            return FakeReply(json_body=self._public(job))

    def _cancel_job(self, request: RecordedRequest) -> FakeReply:
        job_id = request.path_params["job_id"]
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return FakeReply.error(404, f"No such fine-tuning job: {job_id}", code="not_found")
            if job["status"] in TERMINAL_JOB_STATUSES:
                return FakeReply.error(400, f"Job {job_id} has already {job['status']}", code="invalid_request_error")
            job["status"] = "cancelled"
            job["finished_at"] = int(time.time())
            self._plans[job_id] = JobPlan(statuses=("cancelled",))
            self.cancels += 1
            self._event(job_id, "Fine-tuning job cancelled")
            return FakeReply(json_body=self._public(job))

    def _list_events(self, request: RecordedRequest) -> FakeReply:
        job_id = request.path_params["job_id"]
        with self._lock:
            if job_id not in self.jobs:
                return FakeReply.error(404, f"No such fine-tuning job: {job_id}", code="not_found")
            newest_first = list(reversed(self.events[job_id]))
        return FakeReply(json_body=_cursor_page(newest_first, request.query))

    def _list_checkpoints(self, request: RecordedRequest) -> FakeReply:
        job_id = request.path_params["job_id"]
        with self._lock:
            if job_id not in self.jobs:
                return FakeReply.error(404, f"No such fine-tuning job: {job_id}", code="not_found")
            newest_first = list(reversed(self.checkpoints[job_id]))
        return FakeReply(json_body=_cursor_page(newest_first, request.query, default_limit=10))

    # ----------------------------------------------------------------- simulation

    def _event(self, job_id: str, message: str, level: str = "info", data: Any = None,
               kind: str = "message") -> None:
        events = self.events[job_id]
        events.append({"id": f"ftevent-{job_id[-12:]}-{len(events):05d}", "object": "fine_tuning.job.event",
                       "created_at": int(time.time()), "level": level, "message": message, "data": data,
                       "type": kind})

    def _shape(self, job: dict[str, Any]) -> tuple[int, int, int]:
        """(examples, steps per epoch, epochs) of a job, from its training file."""
        lines = [line for line in self.contents[job["training_file"]].splitlines() if line.strip()]
        hyper = job["hyperparameters"]
        batch = hyper["batch_size"] if isinstance(hyper.get("batch_size"), int) else 1
        epochs = hyper["n_epochs"] if isinstance(hyper.get("n_epochs"), int) else 3
        return len(lines), max(1, -(-len(lines) // batch)), epochs

    @staticmethod
    def _losses(step: int, with_validation: bool) -> dict[str, float]:
        train = round(2.0 * 0.8 ** step + 0.3, 4)
        values = {"train_loss": train, "train_mean_token_accuracy": round(1 - train / 3, 4)}
        if with_validation:
            values |= {"valid_loss": round(train + 0.05, 4), "valid_mean_token_accuracy": round(1 - (train + 0.05) / 3, 4)}
        return values

    def _emit_steps(self, job: dict[str, Any], up_to: int) -> None:
        job_id = job["id"]
        total = self._total_steps(job)
        for step in range(self._steps_done[job_id] + 1, up_to + 1):
            data = {"step": step, "total_steps": total, **self._losses(step, bool(job["validation_file"]))}
            self._event(job_id, f"Step {step}/{total}: training loss={data['train_loss']:.4f}", data=data, kind="metrics")
        self._steps_done[job_id] = max(self._steps_done[job_id], up_to)

    def _total_steps(self, job: dict[str, Any]) -> int:
        _, per_epoch, epochs = self._shape(job)
        return per_epoch * epochs

    def _advance(self, job: dict[str, Any]) -> None:
        """One poll's worth of progress along the job's plan."""
        job_id = job["id"]
        if job["status"] in TERMINAL_JOB_STATUSES:
            return
        plan = self._plans[job_id]
        self._polls[job_id] += 1
        status = plan.statuses[min(self._polls[job_id], len(plan.statuses) - 1)]
        previous, job["status"] = job["status"], status
        total = self._total_steps(job)
        if status == "running":
            if previous != "running":
                self._event(job_id, "Fine-tuning job started")
                job["estimated_finish"] = int(time.time()) + 60
            running_polls = plan.statuses.count("running") or 1
            self._emit_steps(job, min(total, self._steps_done[job_id] + -(-total // (running_polls + 1))))
        elif status == "succeeded":
            self._succeed(job, plan)
        elif status == "failed":
            job["error"] = {"code": plan.error_code, "message": plan.error_message, "param": "training_file"}
            job["finished_at"] = int(time.time())
            self._event(job_id, plan.error_message, level="error")
        elif status == "cancelled":
            job["finished_at"] = int(time.time())

    def _succeed(self, job: dict[str, Any], plan: JobPlan) -> None:
        job_id = job["id"]
        total = self._total_steps(job)
        self._emit_steps(job, total)
        examples, per_epoch, epochs = self._shape(job)
        suffix = job.get("suffix") or ""
        job["fine_tuned_model"] = f"ft:{job['model']}:tonetune-fake:{suffix}:{job_id[-8:]}"
        training_bytes = len(self.contents[job["training_file"]])
        job["trained_tokens"] = training_bytes // 4 * epochs
        job["finished_at"] = int(time.time())
        job["estimated_finish"] = None
        validation = bool(job["validation_file"])
        rows = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
        for step in range(1, total + 1):
            losses = self._losses(step, validation)
            rows.append(f"{step},{losses['train_loss']},{losses['train_mean_token_accuracy']},"
                        f"{losses.get('valid_loss', '')},{losses.get('valid_mean_token_accuracy', '')}")
        csv_bytes = ("\n".join(rows) + "\n").encode()
        if plan.result_base64:
            import base64

            csv_bytes = base64.b64encode(csv_bytes)
        result = self._add_file("step_metrics.csv", csv_bytes, "fine-tune-results")
        job["result_files"] = [result["id"]]
        for epoch in range(max(1, epochs - 2), epochs + 1):
            step = epoch * per_epoch
            metrics = {"step": float(step), **self._losses(step, validation)}
            if validation:
                metrics |= {"full_valid_loss": metrics["valid_loss"] + 0.01,
                            "full_valid_mean_token_accuracy": metrics["valid_mean_token_accuracy"]}
            model = job["fine_tuned_model"] if epoch == epochs else f"{job['fine_tuned_model']}:ckpt-step-{step}"
            self.checkpoints[job_id].append({
                "id": f"ftckpt-{job_id[-8:]}-{step}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(time.time()), "fine_tuned_model_checkpoint": model,
                "fine_tuning_job_id": job_id, "metrics": metrics, "step_number": step,
            })
        self._event(job_id, f"New fine-tuned model created: {job['fine_tuned_model']}")
        self._event(job_id, "The job has successfully completed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.openai_server",
                                     description="Loopback fake of the OpenAI chat-completions API.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fixed latency added to every reply")
    parser.add_argument("--behaviour", choices=sorted(BEHAVIOURS), default="tonetune")
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(chat=BEHAVIOURS[args.behaviour], latency_s=args.latency_ms / 1000, port=args.port)
    print(f"listening on {server.base_url}", flush=True)
    try:
        server._httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
        print(json.dumps(server.stats()), file=sys.stderr)


if __name__ == "__main__":
    main()
