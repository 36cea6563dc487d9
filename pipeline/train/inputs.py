"""Stage `train`, its inputs: the grid point, its file layout, the splits and the examples.

Owns: validating a grid point (one-line errors before anything is loaded), `TrainPaths` (every
file a point reads or writes, checkpoints included), the input checks, reading the split
parquets, the prompt/completion conversations TRL trains on, and their token lengths.

Not here: the model, optimizer and trainer (trainer.py), checkpoints and resuming (resume.py),
the MLflow run and the adapter (run.py), the command line (__main__.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import ADAPTERS_DIR, BASE_MODEL_DIR, VAL_SPLIT_PATH, train_split_path
from pipeline.core.contracts import GridPoint
from pipeline.core.errors import TonetuneError
from pipeline.core.modeling import PRECISIONS, require_bitsandbytes
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, chat_messages
from pipeline.core.tables import read_table

if TYPE_CHECKING:
    import datasets
    import pandas as pd

REQUIRED_COLUMNS = ("question", "answer")
CHECKPOINTS_DIRNAME = ".checkpoints"


# --------------------------------------------------------------------------- grid point and names
def validate_grid_point(point: GridPoint) -> None:
    """Reject an impossible grid point with one line, before anything is loaded."""
    if point.precision not in PRECISIONS:
        raise TonetuneError(f"unknown precision {point.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if point.lora_r <= 0:
        raise TonetuneError(f"--lora-r must be a positive integer, got {point.lora_r}")
    if not math.isfinite(point.learning_rate) or point.learning_rate <= 0:
        raise TonetuneError(f"--learning-rate must be a positive number, got {point.learning_rate}")
    if point.n_train <= 0:
        raise TonetuneError(f"--n-train must be a positive integer, got {point.n_train}")


@dataclass(frozen=True)
class TrainPaths:
    """Every file one grid point reads or writes."""

    base_dir: Path
    train_split: Path
    val_split: Path
    adapter_dir: Path
    checkpoint_dir: Path

    @classmethod
    def for_point(cls, point: GridPoint, adapter_dir: Path | None = None, base_dir: Path = BASE_MODEL_DIR,
                  splits_dir: Path | None = None) -> TrainPaths:
        """Default layout: models/adapters/<run-name>, checkpoints in models/.checkpoints/<run-name>."""
        adapter_dir = Path(adapter_dir) if adapter_dir is not None else ADAPTERS_DIR / point.name
        train_split = train_split_path(point.n_train)
        val_split = VAL_SPLIT_PATH
        if splits_dir is not None:
            train_split, val_split = Path(splits_dir) / train_split.name, Path(splits_dir) / val_split.name
        return cls(
            base_dir=Path(base_dir),
            train_split=train_split,
            val_split=val_split,
            adapter_dir=adapter_dir,
            checkpoint_dir=adapter_dir.parent.parent / CHECKPOINTS_DIRNAME / adapter_dir.name,
        )


def check_inputs(point: GridPoint, paths: TrainPaths) -> None:
    """Every input exists (and int8 can run) before the model is loaded."""
    if not paths.train_split.is_file():
        raise TonetuneError(
            f"no training split for --n-train {point.n_train}: {paths.train_split} does not exist "
            "(split.train_sizes in params.yaml lists the sizes `dvc repro split` makes)"
        )
    if not paths.val_split.is_file():
        raise TonetuneError(f"validation split {paths.val_split} does not exist (run `dvc repro split`)")
    if not (paths.base_dir / "config.json").is_file():
        raise TonetuneError(f"base model not found at {paths.base_dir} (run `dvc repro base_model`)")
    if point.precision == "int8":
        require_bitsandbytes()


# --------------------------------------------------------------------------- data
def read_split(path: Path, expected_rows: int | None = None) -> pd.DataFrame:
    """A split parquet with non-empty `question` and `answer` columns (and `expected_rows` rows)."""
    frame = read_table(path, REQUIRED_COLUMNS, "run the split stage first (dvc repro split)")
    if frame.empty:
        raise TonetuneError(f"{path}: no rows")
    for column in REQUIRED_COLUMNS:
        blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
        if blank.any():
            raise TonetuneError(f"{path}: {int(blank.sum())} row(s) with an empty {column!r} (first at row {int(blank.idxmax())})")
    if expected_rows is not None and len(frame) != expected_rows:
        raise TonetuneError(f"{path}: has {len(frame)} rows, but --n-train is {expected_rows}")
    return frame


def conversational_examples(frame: pd.DataFrame, system_prompt: str = CONCISE_SYSTEM_PROMPT) -> datasets.Dataset:
    """Prompt/completion conversations; TRL masks the prompt, so only the answer is learned."""
    import datasets

    rows = [
        {
            "prompt": chat_messages(str(question), system_prompt),
            "completion": [{"role": "assistant", "content": str(answer)}],
        }
        for question, answer in zip(frame["question"], frame["answer"], strict=True)
    ]
    return datasets.Dataset.from_list(rows)


@dataclass(frozen=True)
class SequenceStats:
    """Token lengths of the training examples under the chat template."""

    mean_tokens: float
    max_tokens: int
    total_tokens: int
    mean_completion_tokens: float
    truncated: int


def sequence_stats(tokenizer, examples: datasets.Dataset, max_seq_length: int) -> SequenceStats:
    """Token lengths, as TRL will see them; fail when a prompt alone fills max_seq_length.

    TRL would silently drop such an example (nothing left to learn), which would also change
    the number of optimizer steps the OneCycle schedule was built for.
    """
    lengths, completion_lengths, too_long = [], [], 0
    for example in examples:
        prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        full_tokens = len(tokenizer(full, add_special_tokens=False)["input_ids"])
        too_long += prompt_tokens >= max_seq_length
        lengths.append(full_tokens)
        completion_lengths.append(full_tokens - prompt_tokens)
    if too_long:
        raise TonetuneError(
            f"{too_long} example(s) have a prompt of >= train.max_seq_length = {max_seq_length} tokens: "
            "nothing of their answer would be trained on; raise max_seq_length"
        )
    return SequenceStats(
        mean_tokens=sum(lengths) / len(lengths),
        max_tokens=max(lengths),
        total_tokens=sum(min(length, max_seq_length) for length in lengths),
        mean_completion_tokens=sum(completion_lengths) / len(completion_lengths),
        truncated=sum(length > max_seq_length for length in lengths),
    )
