"""What stages hand each other, named in one place: artifact file names, the adapter naming and
the MLflow tag keys (`Tags`: who writes each key, who reads it).

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


# --------------------------------------------------------------------------- MLflow tag keys


class Tags:
    """MLflow tag keys the stages write and the registry reads: writer -> reader beside each.
    First the tags on tracking runs, then the ones promotion writes on model versions."""

    STAGE = "stage"  # every stage's run (generate, split, score, report, train, judge, ...) -> promote
    STAGE_LEGACY = "tonetune.stage"  # train, openai_finetune (older key, written beside STAGE) -> readers accept both
    GRID = "grid"  # train: the grid id on the parent and its children
    ROLE = "tonetune.role"  # train: "train-grid" (parent run) / "train" (one grid point)
    ADAPTER_MODEL_URI = "adapter_model_uri"  # train: the logged pyfunc -> promote registers it
    PAIRS_MD5 = "pairs_md5"  # split (and a training run, if it records it) -> promote's data-quality evidence
    DATA_QUALITY_SUCCESS = "data_quality_success"  # split: "true"/"false" -> promote
    GENERATION_RUN_ID = "generation_run_id"  # split -> promote, lineage
    GIT_COMMIT = "git_commit"  # tracking.code_version_tags -> promote, lineage
    EXPERIMENT_KIND = "mlflow.experimentKind"  # experiment tag: which MLflow UI view opens it (tracking.py)
    MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's nesting tag: grid repairs duplicate parents
    MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"  # the same, under MLflow's own key (the UI shows it)
    DATASET_PREFIX = "dataset."  # tracking.log_dataset_input: dataset.<name>.{path,dvc_md5,dvc_stage,matches_dvc_lock}
    DATASET_INPUT_PATH = "path"  # the same path/md5 as tags of the MLflow dataset input itself
    DATASET_INPUT_MD5 = "dvc_md5"
    TRAINING_CONTEXT = "training"  # the dataset input context of the split a model was trained on

    # Model-version tags (written by registry promote/rollback, read by registry list/summary/lineage)
    TRAINING_RUN_ID = "tonetune.training_run_id"
    TRAINING_RUN_NAME = "tonetune.training_run_name"
    EVAL_MODEL = "tonetune.eval_model"
    EXPERIMENT_ID = "tonetune.experiment_id"
    METRIC_PREFIX = "metric."  # metric.<key of metrics/eval/<model>.json> of this version
    BASE_PREFIX = "base."  # base.<key>: the base model's metric, same evaluation round
    PARAM_PREFIX = "param."  # param.<training run param>
    DQ_SUCCESS = "data_quality.success"
    DQ_PAIRS_MD5 = "data_quality.pairs_md5"
    DQ_SOURCE = "data_quality.source"
    DVC_LOCK_MD5 = "dvc_lock_md5"
    PROMOTE_GIT_COMMIT = "promote.git_commit"
    PROMOTE_POLICY = "promote.policy"
    PROMOTE_MODE = "promote.mode"  # policy / version / forced
    PROMOTE_AT = "promote.at"
    PROMOTE_FORCED = "promote.forced"  # "true"/"false"
    PROMOTE_FORCE_REASON = "promote.force_reason"
    PROMOTE_OVERRIDDEN = "promote.gates_overridden"  # guard names, comma-separated
    PROMOTE_OVERRIDES = "promote.overrides"  # each overridden refusal in full, one per line
    ROLLED_BACK = "tonetune.rolled_back"
    ROLLED_BACK_AT = "tonetune.rolled_back_at"
    RESTORED_FROM = "tonetune.restored_by_rollback_from"
    RESTORED_AT = "tonetune.restored_at"
    DECISION_PREFIX = "decision."  # decision.<key>: the promotion rule's evidence on the test set (version and run)
    # Registered-model tag: versions that were Production, oldest first (rollback pops it)
    PRODUCTION_HISTORY = "tonetune.production_history"

    @staticmethod
    def metric(key: str) -> str:
        """`metric.<key>`: a version's own metric."""
        return f"{Tags.METRIC_PREFIX}{key}"

    @staticmethod
    def base(key: str) -> str:
        """`base.<key>`: the base model's metric in the same evaluation round."""
        return f"{Tags.BASE_PREFIX}{key}"

    @staticmethod
    def decision(key: str) -> str:
        """`decision.<key>`: one fact of the promotion decision (registry/policy.decision_tags)."""
        return f"{Tags.DECISION_PREFIX}{key}"

    @staticmethod
    def param(key: str) -> str:
        """`param.<key>`: a training-run param recorded on the version."""
        return f"{Tags.PARAM_PREFIX}{key}"

    @staticmethod
    def dataset(name: str, field: str) -> str:
        """`dataset.<name>.<field>` (field: path, dvc_md5, dvc_stage, matches_dvc_lock)."""
        return f"{Tags.DATASET_PREFIX}{name}.{field}"

    @staticmethod
    def parse_dataset(key: str) -> tuple[str, str] | None:
        """(name, field) of a `dataset.<name>.<field>` key, else None (names may hold dots)."""
        if not key.startswith(Tags.DATASET_PREFIX):
            return None
        name, dot, field = key.removeprefix(Tags.DATASET_PREFIX).rpartition(".")
        return (name, field) if dot and name and field else None

    @staticmethod
    def stage_of(tags: dict[str, str]) -> str | None:
        """The stage a run belongs to, under either key."""
        return tags.get(Tags.STAGE) or tags.get(Tags.STAGE_LEGACY)
