"""The tone's prompts: text files under version control, one folder per tone (params `tone.prompts`).

    prompts/<tone>/system_verbose.txt         the base model's system prompt (the paper's verbose one)
    prompts/<tone>/system_concise.txt         the fine-tuning and serving system prompt (the concise one)
    prompts/<tone>/generate_qa_system.txt     generation: write one question/answer pair from a section
    prompts/<tone>/generate_qa_user.txt         ... its user turn ({title}, {text})
    prompts/<tone>/generate_qa_correction.txt   ... sent back after a malformed reply ({problem})
    prompts/<tone>/generate_rephrase_system.txt generation: say the answer again in the tone
    prompts/<tone>/generate_rephrase_user.txt   ... its user turn ({question}, {answer})
    prompts/<tone>/generate_simplify_user.txt   ... after an answer failed the gate ({flesch}, {threshold}, {failed})

Each file is a Python `str.format` template: `{description}` (params `tone.description`) may appear in
any of them, the fields above in theirs; a literal brace is written `{{` or `}}`. A file's final
newline is not part of the prompt (editors add one).

A prompt's *version* is the first 12 hex digits of the sha256 of its file's bytes: the same text
gives the same version on every machine, and any edit gives a new one. Stages log the versions as
MLflow tags (`prompt.<name>.version`) and register the texts in MLflow's Prompt Registry
(`tracking.log_prompts`). dvc.yaml lists each file as a dependency of exactly the stages that send
it, so editing one re-runs only those.

What this module does not do: send anything (pipeline.core.llmclient, pipeline.generate) or decide
which model gets which system prompt (pipeline.core.modelspec).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import TonetuneError

SYSTEM_PROMPT_FILES = {"verbose": "system_verbose.txt", "concise": "system_concise.txt"}
GENERATION_PROMPT_FILES = {
    "qa_system": "generate_qa_system.txt",
    "qa_user": "generate_qa_user.txt",
    "qa_correction": "generate_qa_correction.txt",
    "rephrase_system": "generate_rephrase_system.txt",
    "rephrase_user": "generate_rephrase_user.txt",
    "simplify_user": "generate_simplify_user.txt",
}
PROMPT_FILES = {**{f"system_{k}": v for k, v in SYSTEM_PROMPT_FILES.items()}, **GENERATION_PROMPT_FILES}
VERSION_DIGITS = 12
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PromptFile:
    """One prompt file: its name, path, template text and version (content hash)."""

    name: str
    path: Path
    template: str

    @property
    def version(self) -> str:
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()[:VERSION_DIGITS]


def prompt_version(text: str) -> str:
    """The version of a filled prompt text (what a model was actually sent): its sha256, 12 hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:VERSION_DIGITS]


def read_prompt(path: Path, name: str | None = None) -> PromptFile:
    """A prompt file, its final newline dropped; one line naming the file when it is missing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TonetuneError(f"{path}: prompt file not found (params tone.prompts names the folder; "
                            f"it needs {', '.join(sorted(PROMPT_FILES.values()))})") from None
    return PromptFile(name or Path(path).stem, Path(path), text[:-1] if text.endswith("\n") else text)


def prompts_dir(folder: str | Path) -> Path:
    """The prompts folder, relative to the working directory (the repository root under dvc);
    falls back to the project's own copy so an installed model still finds the default tone."""
    path = Path(folder)
    if path.is_dir() or path.is_absolute():
        return path
    return REPO_ROOT / path if (REPO_ROOT / path).is_dir() else path


def fill(prompt: PromptFile, description: str, **fields: object) -> str:
    """The template with `{description}` and its own fields filled; a bad placeholder is one line."""
    try:
        return prompt.template.format(description=description, **fields)
    except (KeyError, IndexError, ValueError) as error:
        raise TonetuneError(f"{prompt.path}: cannot fill the template ({type(error).__name__}: {error}); "
                            f"placeholders allowed: {{description}}, {', '.join('{' + f + '}' for f in fields)}; "
                            "write a literal brace as {{ or }}") from None


@dataclass(frozen=True)
class TonePrompts:
    """Every prompt file of one tone, read once."""

    folder: Path
    description: str
    files: dict[str, PromptFile]

    @classmethod
    def load(cls, folder: str | Path, description: str, names: tuple[str, ...] = tuple(PROMPT_FILES)) -> TonePrompts:
        base = prompts_dir(folder)
        return cls(base, description, {name: read_prompt(base / PROMPT_FILES[name], name) for name in names})

    def system_prompt(self, kind: str) -> str:
        """The filled system prompt: kind `verbose` (the base model's) or `concise` (fine-tuning, serving)."""
        return fill(self.files[f"system_{kind}"], self.description)

    def text(self, name: str, **fields: object) -> str:
        """A generation prompt (`qa_user`, ...) with its fields filled."""
        return fill(self.files[name], self.description, **fields)

    def versions(self) -> dict[str, str]:
        """{name: version} of every file read."""
        return {name: prompt.version for name, prompt in self.files.items()}

    def version(self) -> str:
        """One version for the whole set (hash of the names and versions, in name order)."""
        joined = "\x1e".join(f"{name}={v}" for name, v in sorted(self.versions().items()))
        return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:VERSION_DIGITS]


def tone_prompts(tone, names: tuple[str, ...] = tuple(PROMPT_FILES)) -> TonePrompts:
    """The prompts of params `tone` (ToneConfig): its folder and description."""
    return TonePrompts.load(tone.prompts, tone.description, names)


def system_prompts(tone) -> TonePrompts:
    """Only the two system prompts of the tone."""
    return tone_prompts(tone, ("system_verbose", "system_concise"))


def generation_prompts(tone) -> TonePrompts:
    """Only the generation prompts of the tone."""
    return tone_prompts(tone, tuple(GENERATION_PROMPT_FILES))
