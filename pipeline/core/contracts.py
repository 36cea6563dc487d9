"""What stages hand each other, named in one place: artifact file names and the adapter naming.

An adapter folder, its MLflow training run and its DVC output path share one name,
`lora-<precision>-r<R>-lr<LR>-n<N>`. `adapter_name` writes it and `parse_adapter_name` reads it,
from the same pattern, so the train stage, the evaluation, the registry and dvc.yaml's out path
(which DVC renders from the same params) cannot drift apart. Also here: the provenance files a
stage leaves next to a model folder, and the display family of an OpenAI model id.

Holds names and formats only: no I/O, no heavy imports.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.core.config import TrainConfig

ADAPTER_METADATA_FILE = "tonetune_adapter.json"  # written by the train stage next to the adapter
BASE_PROVENANCE_FILE = "tonetune_base.json"  # written by the base_model stage next to the weights

ADAPTER_NAME_PATTERN = re.compile(
    r"lora-(?P<precision>[a-z0-9]+)-r(?P<lora_r>\d+)-lr(?P<learning_rate>[0-9.eE+-]+?)-n(?P<n_train>\d+)$"
)


def format_learning_rate(learning_rate: float) -> str:
    """Canonical text of a learning rate: Python's shortest float repr (0.001, 0.0002, 1e-05).

    DVC loads params.yaml with ruamel (YAML 1.2: `1e-3` and `0.001` are both the float 0.001)
    and renders `${item.learning_rate}` with str(), which is this same text, so the run name
    made here and the output path dvc.yaml renders agree (tests/test_train.py checks it with
    DVC itself). A learning rate written as a bare integer (`1`) would render as "1" in DVC and
    "1.0" here: write rates as floats.
    """
    return repr(float(learning_rate))


def adapter_name(precision: str, lora_r: int, learning_rate: float, n_train: int) -> str:
    """`lora-<precision>-r<R>-lr<LR>-n<N>`: the MLflow run name and the adapter folder name."""
    return f"lora-{precision}-r{lora_r}-lr{format_learning_rate(learning_rate)}-n{n_train}"


@dataclass(frozen=True)
class GridPoint:
    """One point of the training grid."""

    precision: str
    lora_r: int
    learning_rate: float
    n_train: int

    @property
    def name(self) -> str:
        return adapter_name(self.precision, self.lora_r, self.learning_rate, self.n_train)


def parse_adapter_name(name: str) -> GridPoint | None:
    """The grid point an adapter folder/run name encodes, or None for another kind of name."""
    match = ADAPTER_NAME_PATTERN.match(name)
    if not match:
        return None
    return GridPoint(match["precision"], int(match["lora_r"]), float(match["learning_rate"]), int(match["n_train"]))


def grid_adapter_names(train: TrainConfig) -> set[str]:
    """Folder names the current `train.grid` produces."""
    grid = train.grid
    return {
        adapter_name(precision, r, lr, n)
        for precision, r, lr, n in itertools.product(grid.precision, grid.lora_r, grid.learning_rate, grid.n_train)
    }


def openai_family(model: str) -> str:
    """gpt-4o-mini-2024-07-18 -> gpt-4o-mini (the paper's table drops the date)."""
    parts = model.split("-")
    while parts and parts[-1].isdigit():
        parts.pop()
    return "-".join(parts) or model
