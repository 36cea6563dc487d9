"""The offline demo backend: answers from hand-authored recordings, through the same engine.

The demo profile (`generate.backend: replay`) runs the whole generation stage with no network:
the engine sends its usual requests and parses, gates, retries and dedups as it would against a
live API, but the answer comes from `recordings/demo/*.jsonl`, one JSON object per passage:

    {"source_id": "...", "title": "...", "question": "...?", "factual_answer": "...",
     "rephrasings": ["first conversational rephrasing", "simpler retry 1", ...],
     "qa_replies": ["optional raw replies to the qa request, malformed on purpose"]}

Answers are looked up by (source_id, step, attempt), never by prompt text, so editing a prompt
does not break the demo:

- qa attempt k: `qa_replies[k]` when the key exists (past its end: a malformed reply), else the
  JSON `{"question", "answer": factual_answer}`, wrapped in ```json fences for a fixed subset
  of passages (by hash of source_id) so the fence-tolerant parser is exercised;
- rephrase: `rephrasings[0]`; simplify i (1-based): `rephrasings[i]`; a step past the list is
  a replay error, which the engine records as `api_error`.

Sections without a recording are skipped by the engine (ledger reason `not_recorded`).

    python -m pipeline.generate.replay check [--dir recordings/demo] [--sections ...]

validates every recording file (schema, duplicates, source ids present in sections.parquet,
Flesch path of each passage) and prints what the demo will do with them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import SECTIONS_PATH, load_config
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.llmclient import Messages, Reply, RequestFailed, RequestSettings, StepKey, estimate_tokens
from pipeline.core.textmetrics import flesch_reading_ease
from pipeline.core.tone import Criteria
from pipeline.core.tone import gate as tone_gate

REQUIRED_FIELDS = ("source_id", "title", "question", "factual_answer", "rephrasings")
OPTIONAL_FIELDS = ("qa_replies",)
FENCED_EVERY = 4  # one passage in four gets its JSON wrapped in ```json fences
MISSING_QA_REPLY = "(no recorded reply)"


@dataclass(frozen=True)
class Recording:
    """One hand-authored passage: the answers a generator would give for one section."""

    source_id: str
    title: str
    question: str
    factual_answer: str
    rephrasings: tuple[str, ...]
    qa_replies: tuple[str, ...] | None
    location: str  # file:line, for messages
    digest: str  # hash of the record: editing it invalidates only its cached answers


def recording_files(directory: Path) -> list[Path]:
    """The *.jsonl files of a recordings folder, in name order."""
    return sorted(path for path in directory.glob("*.jsonl") if path.is_file())


def _record_problems(record: Any) -> list[str]:
    """Schema problems of one parsed line (empty when it is a valid recording)."""
    if not isinstance(record, dict):
        return [f"expected a JSON object, got {type(record).__name__}"]
    problems = [f"missing key {key!r}" for key in REQUIRED_FIELDS if key not in record]
    unknown = sorted(set(record) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        problems.append(f"unknown key(s) {unknown} (allowed: {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    for key in ("source_id", "question", "factual_answer"):
        if key in record and (not isinstance(record[key], str) or not record[key].strip()):
            problems.append(f"{key!r} must be a non-empty string")
    if "title" in record and not isinstance(record["title"], str):
        problems.append("'title' must be a string")
    rephrasings = record.get("rephrasings")
    if "rephrasings" in record and (
        not isinstance(rephrasings, list) or not rephrasings
        or not all(isinstance(text, str) and text.strip() for text in rephrasings)
    ):
        problems.append("'rephrasings' must be a non-empty list of non-empty strings")
    replies = record.get("qa_replies")
    if "qa_replies" in record and (not isinstance(replies, list) or not all(isinstance(r, str) for r in replies)):
        problems.append("'qa_replies' must be a list of strings")
    return problems


def read_recordings(directory: str | Path) -> tuple[dict[str, Recording], list[str]]:
    """Every valid recording under `directory` by source_id, and a list of problems found."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TonetuneError(f"replay recordings folder not found: {directory} (generate.replay_dir)")
    recordings: dict[str, Recording] = {}
    problems: list[str] = []
    for path in recording_files(directory):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            location = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"{location}: not valid JSON ({error.msg})")
                continue
            record_problems = _record_problems(record)
            if record_problems:
                problems.extend(f"{location}: {problem}" for problem in record_problems)
                continue
            source_id = record["source_id"].strip()
            if source_id in recordings:
                problems.append(f"{location}: duplicate source_id {source_id!r} (first at {recordings[source_id].location})")
                continue
            replies = record.get("qa_replies")
            recordings[source_id] = Recording(
                source_id=source_id,
                title=record["title"],
                question=record["question"],
                factual_answer=record["factual_answer"],
                rephrasings=tuple(record["rephrasings"]),
                qa_replies=tuple(replies) if replies is not None else None,
                location=location,
                digest=hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()[:16],
            )
    return recordings, problems


def load_recordings(directory: str | Path) -> dict[str, Recording]:
    """Recordings for a generation run: any problem stops the run, naming file and line."""
    recordings, problems = read_recordings(directory)
    if problems:
        more = f" (and {len(problems) - 1} more; run `python -m pipeline.generate.replay check`)" if len(problems) > 1 else ""
        raise TonetuneError(f"{problems[0]}{more}")
    if not recordings:
        raise TonetuneError(f"no recordings in {directory} (expected *.jsonl files, one passage per line)")
    return recordings


def is_fenced(source_id: str) -> bool:
    """Whether this passage's JSON reply comes wrapped in ```json fences (fixed by its id)."""
    return int(hashlib.sha256(source_id.encode("utf-8")).hexdigest()[:8], 16) % FENCED_EVERY == 0


def recorded_reply(recording: Recording, step: StepKey) -> str:
    """The recorded answer for one (step, attempt) of a passage; RequestFailed past the end."""
    if step.step == "qa":
        if recording.qa_replies is not None:
            replies = recording.qa_replies
            return replies[step.attempt] if step.attempt < len(replies) else MISSING_QA_REPLY
        reply = json.dumps({"question": recording.question, "answer": recording.factual_answer}, ensure_ascii=False)
        return f"```json\n{reply}\n```" if is_fenced(recording.source_id) else reply
    index = 0 if step.step == "rephrase" else step.attempt
    if step.step not in ("rephrase", "simplify") or index >= len(recording.rephrasings):
        raise RequestFailed(
            f"replay: no recorded answer for {step.step} #{step.attempt} of {recording.source_id} "
            f"({recording.location} has {len(recording.rephrasings)} rephrasing(s))"
        )
    return recording.rephrasings[index]


class ReplayBackend:
    """Backend that answers from recordings, keyed by (source_id, step, attempt)."""

    name = "replay"

    def __init__(self, recordings: dict[str, Recording]):
        self.recordings = recordings

    def cache_identity(self, step: StepKey) -> list:
        recording = self.recordings.get(step.source_id)
        return ["replay", recording.digest if recording else None, step.step, step.attempt]

    def has_source(self, source_id: str) -> bool:
        return source_id in self.recordings

    async def send(self, messages: Messages, step: StepKey, settings: RequestSettings) -> Reply:
        recording = self.recordings.get(step.source_id)
        if recording is None:
            raise RequestFailed(f"replay: no recording for source {step.source_id}")
        content = recorded_reply(recording, step)
        return Reply(content=content, input_tokens=estimate_tokens(messages),
                     output_tokens=len(content) // 4 + 1, finish_reason="stop")

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- check


def flesch_path(recording: Recording, threshold: float, max_simplify_attempts: int, flesch,
                passes=None) -> str:
    """What the engine's gate will do with a passage: accepted_at_<n>, never_passes or
    replay_gap (a rephrasing fails and no next one is recorded: the run records api_error).
    `passes(text)`: the tone's gate; default Flesch >= threshold."""
    passes = passes or (lambda text: flesch(text) >= threshold)
    for attempt, text in enumerate(recording.rephrasings[: max_simplify_attempts + 1]):
        if passes(text):
            return f"passes_at_attempt_{attempt + 1}"
        if attempt + 1 >= len(recording.rephrasings) and attempt < max_simplify_attempts:
            return "replay_gap"
    return "never_passes"


def check(directory: Path, sections_path: Path, threshold: float, max_simplify_attempts: int,
          gate: Criteria | None = None) -> list[str]:
    """Validate every recording and print a summary; returns the list of problems. `gate`: the
    tone's gate (default: Flesch >= threshold)."""
    gate = gate or Criteria.flesch_at_least(threshold)
    gate_text = gate.describe()
    import pandas as pd

    recordings, problems = read_recordings(directory)
    if sections_path.exists():
        sections = pd.read_parquet(sections_path, columns=["id", "title"]).set_index("id")["title"]
        for recording in recordings.values():
            if recording.source_id not in sections.index:
                problems.append(f"{recording.location}: source_id {recording.source_id!r} is not in {sections_path}")
            elif sections[recording.source_id] != recording.title:
                problems.append(f"{recording.location}: title {recording.title!r} differs from "
                                f"{sections[recording.source_id]!r} in {sections_path}")
    else:
        problems.append(f"{sections_path}: not found, source ids not checked (run `dvc repro source`)")
    paths: dict[str, int] = {}
    for recording in recordings.values():
        if recording.qa_replies is not None:
            paths["custom_qa_replies"] = paths.get("custom_qa_replies", 0) + 1
        path = flesch_path(recording, threshold, max_simplify_attempts, flesch_reading_ease,
                           passes=lambda text: bool(text) and bool(gate.mask(gate.score([text]))[0]))
        paths[path] = paths.get(path, 0) + 1
        if path == "replay_gap":
            problems.append(f"{recording.location}: rephrasing #{len(recording.rephrasings)} fails "
                            f"{gate_text} and no simpler one follows (the run would record api_error)")
        elif len(recording.rephrasings) > max_simplify_attempts + 1:
            problems.append(f"{recording.location}: {len(recording.rephrasings)} rephrasings; only "
                            f"{max_simplify_attempts + 1} can be used")
    print(f"replay check: {len(recordings)} recordings in {len(recording_files(directory))} file(s) under {directory}")
    for name, count in sorted(paths.items()):
        print(f"  {name}: {count}")
    for problem in problems:
        print(f"  problem: {problem}")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.generate.replay",
                                     description="Tools for the replay backend's hand-authored recordings.")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate recording files (schema, ids, Flesch path)")
    check_parser.add_argument("--dir", type=Path, default=None, help="recordings folder (default: generate.replay_dir)")
    check_parser.add_argument("--sections", type=Path, default=SECTIONS_PATH, help="sections parquet to check ids against")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:

    args = parse_args(argv)
    full = load_config()
    config = full.generate
    directory = args.dir or Path(config.replay_dir)
    problems = check(directory, args.sections, full.tone.gate[0].threshold, config.max_simplify_attempts,
                     gate=tone_gate(full.tone))
    if problems:
        raise TonetuneError(f"{len(problems)} problem(s) in the recordings under {directory} (listed above)")
    print("replay check: OK")


if __name__ == "__main__":
    main()
