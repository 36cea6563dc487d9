"""Which model answers, how: the base (with the paper's verbose prompt) or an adapter (with the
prompt it was trained with, in the precision it was trained in and is served in).

Shared by the predict stage (validation) and the heldout stage (test), so both run a model the
same way. File reads only; no model loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.adapterinfo import adapter_metadata, read_adapter_record
from pipeline.core.errors import TonetuneError
from pipeline.core.modeling import PRECISIONS
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, VERBOSE_SYSTEM_PROMPT

BASE_NAME = "base"


@dataclass
class ModelSpec:
    """One model to run: its name (file names, MLflow), prompt, precision and optional adapter."""

    name: str
    kind: str  # "base" or "lora"
    system_prompt_name: str  # "verbose", "concise" or "as-trained"
    system_prompt: str
    precision: str
    adapter_dir: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the adapter's tonetune_adapter.json


def base_spec(precision: str, system_prompt: str = VERBOSE_SYSTEM_PROMPT) -> ModelSpec:
    """The prompting condition: the base model with the tone's verbose system prompt (the paper's
    for the default tone)."""
    return ModelSpec(BASE_NAME, "base", "verbose", system_prompt, precision)


def check_base_model(model_dir: Path) -> None:
    """Fail in one line when the base model folder is missing (before torch is imported)."""
    if not (model_dir / "config.json").is_file():
        raise TonetuneError(f"{model_dir}: base model not found (run `dvc repro base_model` first)")


def adapter_spec(path: Path, concise: str = CONCISE_SYSTEM_PROMPT) -> ModelSpec:
    """An adapter, prompted as it was trained, in the precision it was trained in (`concise`: the
    tone's concise prompt, which names the prompt "concise" when the adapter recorded that one)."""
    record = read_adapter_record(path)
    trained_with = record.get("system_prompt") or concise
    precision = record.get("serve_precision") or adapter_metadata(path)["precision"]
    if precision not in PRECISIONS:
        raise TonetuneError(
            f"{path}: cannot tell which precision the adapter was trained in (got {precision!r}; expected one of "
            f"{', '.join(PRECISIONS)} in tonetune_adapter.json or a lora-<precision>-... folder name)"
        )
    prompt_name = "concise" if trained_with == concise else "as-trained"
    return ModelSpec(path.name, "lora", prompt_name, trained_with, precision, adapter_dir=path, record=record)


def precision_groups(specs: Sequence[ModelSpec]) -> list[tuple[str, list[ModelSpec]]]:
    """Specs grouped by precision, in order of first appearance (one base load per group)."""
    groups: dict[str, list[ModelSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.precision, []).append(spec)
    return list(groups.items())
