"""What the predict and score stages read about a model folder: adapters on disk, their
training record (tonetune_adapter.json), their grid point, and the base model's display name.

File reads only (JSON, folder names); no model loading, no MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.contracts import ADAPTER_METADATA_FILE, ADAPTER_NAME_PATTERN, BASE_PROVENANCE_FILE
from pipeline.core.errors import TonetuneError

ADAPTER_CONFIG_FILE = "adapter_config.json"
METADATA_KEYS = ("precision", "lora_r", "lora_alpha", "learning_rate", "n_train")


def discover_adapters(adapters_dir: Path) -> list[Path]:
    """Adapter folders (those holding adapter_config.json) under `adapters_dir`, sorted by name."""
    if not adapters_dir.is_dir():
        return []
    return sorted(p for p in adapters_dir.iterdir() if (p / ADAPTER_CONFIG_FILE).is_file())


def select_adapters(found: Sequence[Path], grid_names: set[str], include_all: bool) -> tuple[list[Path], list[Path]]:
    """(adapters to evaluate, leftovers skipped): those of the current grid, or all of them."""
    if include_all:
        return list(found), []
    return [p for p in found if p.name in grid_names], [p for p in found if p.name not in grid_names]


def model_family(model_dir: Path) -> str:
    """Display name of the base model (e.g. SmolLM2-135M-Instruct), from its provenance file."""
    provenance = model_dir / BASE_PROVENANCE_FILE
    if provenance.is_file():
        record = json.loads(provenance.read_text())
        name = record.get("upstream") or record.get("hub_id")
        if name:
            return str(name).rstrip("/").split("/")[-1]
    return model_dir.resolve().name


def read_adapter_record(adapter_dir: Path) -> dict[str, Any]:
    """The train stage's tonetune_adapter.json (grid point, MLflow run id, system prompt, serving
    precision and decoding policy), or {}."""
    path = adapter_dir / ADAPTER_METADATA_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{path}: not valid JSON ({error.msg}); re-run the train stage for this adapter") from None
    return record if isinstance(record, dict) else {}


def _number(value: Any, kind: type) -> Any:
    """params come back from MLflow as strings; None stays None."""
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def merge_metadata(found: Mapping[str, Any], run_params: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`found` overlaid with the training run's params (most trusted), typed; None where unknown."""
    merged = dict(found)
    for key in METADATA_KEYS:
        if run_params and run_params.get(key) not in (None, ""):
            merged[key] = run_params[key]
    return {
        "precision": merged.get("precision"),
        "lora_r": _number(merged.get("lora_r"), int),
        "lora_alpha": _number(merged.get("lora_alpha"), int),
        "learning_rate": _number(merged.get("learning_rate"), float),
        "n_train": _number(merged.get("n_train"), int),
    }


def adapter_metadata(adapter_dir: Path, run_params: Mapping[str, str] | None = None) -> dict[str, Any]:
    """precision, lora_r, lora_alpha, learning_rate, n_train of an adapter.

    Sources, most trusted first: the training run's params, tonetune_adapter.json (written by
    the train stage next to the adapter), adapter_config.json (r, alpha), and the folder name
    (lora-<precision>-r<r>-lr<lr>-n<n>). Missing values stay None.
    """
    found: dict[str, Any] = {}
    match = ADAPTER_NAME_PATTERN.match(adapter_dir.name)
    if match:
        found.update(match.groupdict())
    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    if config_file.is_file():
        adapter_config = json.loads(config_file.read_text())
        found.update(lora_r=adapter_config.get("r"), lora_alpha=adapter_config.get("lora_alpha"))
    record = read_adapter_record(adapter_dir)
    found.update({k: record[k] for k in METADATA_KEYS if k in record})
    return merge_metadata(found, run_params)
