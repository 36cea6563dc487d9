"""Stage `train`, resuming: run fingerprints, checkpoint state, finding and loading checkpoints.

Owns: the fingerprint of everything that defines a run, the state file next to the checkpoints
(which run and MLflow run they belong to), finding the newest complete checkpoint of the same
run (or clearing another run's), and copying a checkpoint's LoRA weights into the model in place.

Not here: where checkpoints live (inputs.TrainPaths), the trainer that writes and resumes them
(trainer.py), continuing the MLflow run (run.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import TrainConfig
from pipeline.core.contracts import GridPoint, format_learning_rate
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT

CHECKPOINT_STATE_FILE = "tonetune_checkpoint.json"


def run_fingerprint(point: GridPoint, config: TrainConfig, train_md5: str, base_sha256: str,
                    system_prompt: str = CONCISE_SYSTEM_PROMPT) -> str:
    """Hash of everything that defines a run: a checkpoint is reused only for the same one."""
    settings = config.model_dump(mode="json", exclude={"grid", "save_steps", "logging_steps"})
    payload = {
        "point": [point.precision, point.lora_r, format_learning_rate(point.learning_rate), point.n_train],
        "train": settings,
        "train_md5": train_md5,
        "base_sha256": base_sha256,
        "system_prompt": system_prompt,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def checkpoint_step(path: Path) -> int:
    """The global step of a `checkpoint-<step>` folder (-1 if the name is not one)."""
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


@dataclass(frozen=True)
class ResumeState:
    """Where to pick a run up: a checkpoint folder and the MLflow run it was logging to."""

    checkpoint: Path | None
    mlflow_run_id: str | None


def find_resume_state(checkpoint_dir: Path, fingerprint: str) -> ResumeState:
    """The newest complete checkpoint for this exact run, or a clean folder to start over in."""
    state_file = checkpoint_dir / CHECKPOINT_STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == fingerprint:
            complete = [
                path for path in checkpoint_dir.glob("checkpoint-*")
                if (path / "trainer_state.json").is_file() and checkpoint_step(path) > 0
            ]
            latest = max(complete, key=checkpoint_step, default=None)
            return ResumeState(latest, state.get("mlflow_run_id"))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # another config's checkpoints: useless
    return ResumeState(None, None)


def write_checkpoint_state(checkpoint_dir: Path, fingerprint: str, run_id: str, run_label: str) -> None:
    """Record which run the checkpoints belong to; git-ignore the whole checkpoints folder."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ignore = checkpoint_dir.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# training checkpoints (pipeline.train): resumable state, not results\n*\n")
    state = {"fingerprint": fingerprint, "mlflow_run_id": run_id, "run_name": run_label}
    (checkpoint_dir / CHECKPOINT_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def load_adapter_checkpoint(model, checkpoint: Path) -> None:
    """Copy a checkpoint's LoRA weights into the model's existing parameters, in place.

    transformers resumes a PEFT model with `load_adapter`, whose default
    `autocast_adapter_dtype=True` replaces every bf16 LoRA parameter with a *new* fp32 one: the
    optimizer built before (ours, OneCycle's) keeps updating the orphaned originals and the model
    silently stops learning, in another precision. Copying in place keeps the objects and dtypes.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    if result.unexpected_keys:
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model: {result.unexpected_keys[:3]}")
