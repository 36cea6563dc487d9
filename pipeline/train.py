"""Stage `train`: LoRA fine-tuning of the base model on one grid point (paper 2.3, appendix A.3).

    python -m pipeline.train --precision int8 --lora-r 32 --learning-rate 0.001 --n-train 150

One call trains one point of the grid precision x lora_r x learning_rate x n_train (dvc.yaml
runs the whole grid as a `matrix` stage) and writes the adapter to
`models/adapters/lora-<precision>-r<R>-lr<LR>-n<N>/` (the DVC output), where LR is the
canonical text of the rate (`format_learning_rate`, which is also how DVC renders it).

The recipe, as in the paper:
- TRL SFTTrainer + PEFT LoRA on q_proj/k_proj/v_proj, lora_alpha = r, dropout 0.2, bias
  "lora_only"; 5 epochs, batch 16 x 2 accumulation steps; AdamW with torch's OneCycleLR (cosine,
  30% warm-up, div_factor 25, final_div_factor 1e3), built here over the exact number of
  optimizer steps the Trainer will take and handed over via `optimizers=`.
- Conversational prompt/completion examples: prompt = [system: the concise prompt, user: the
  question], completion = [assistant: the answer]. TRL then computes the loss on the completion
  only, with the base model's own chat template and no `{% generation %}` markers needed.
- Precision: `bf16` (weights and adapters bf16), `fp32`, `int8` (bitsandbytes 8-bit base,
  llm_int8_threshold 6.0, lm_head skipped and kept in bf16, LoRA weights bf16). Adapters are
  cast to bf16 explicitly: PEFT would upcast them to fp32 (autocast_adapter_dtype).
- Gradient checkpointing off unless params say so (TRL's default is on: 5-20x slower on CPU).

Tracking: one MLflow run per grid point named like the adapter, tagged `grid=<id>` and nested
under a `train-grid-<id>` parent run (same id for every point trained with one recipe), with the
paper's params, per-step `train_loss`/`learning_rate`/`grad_norm`, tokens/s, peak memory, wall
time, the train and val splits as dataset inputs (with their DVC md5), and the adapter logged
as a pyfunc model (pipeline.core.servable: base referenced by path + hash, served in the
precision it was trained and evaluated in, with the evaluation's decoding policy).

Resuming: checkpoints go to `models/.checkpoints/<run-name>/` (outside every DVC output, and
outside models/adapters, which evaluate scans) every `save_steps` optimizer steps, next to a
fingerprint of everything that defines the run. A re-run with the same fingerprint resumes from
the newest checkpoint and continues the same MLflow run; a different one starts over. The
checkpoints are deleted once the adapter is saved and logged.

Not here: loading and answering (pipeline.core.modeling), evaluation (pipeline.predict,
pipeline.score), registration (registry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import (
    ADAPTERS_DIR,
    BASE_MODEL_DIR,
    VAL_SPLIT_PATH,
    Config,
    TrainConfig,
    load_config,
    train_split_path,
)
from pipeline.core.contracts import ADAPTER_METADATA_FILE, GridPoint, format_learning_rate
from pipeline.core.dvcmeta import file_md5
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.modeling import (
    PRECISIONS,
    DecodingPolicy,
    adapter_dtype,
    base_model_reference,
    cast_adapter_weights,
    load_base_model,
    require_bitsandbytes,
)
from pipeline.core.servable import log_adapter_model
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, chat_messages
from pipeline.core.tables import read_table
from pipeline.core.tracking import code_version_tags, configure_mlflow, log_dataset_input

if TYPE_CHECKING:
    import datasets
    import pandas as pd

REQUIRED_COLUMNS = ("question", "answer")
CHECKPOINTS_DIRNAME = ".checkpoints"
CHECKPOINT_STATE_FILE = "tonetune_checkpoint.json"
GRID_ROLE_TAG = "tonetune.role"


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


# --------------------------------------------------------------------------- model
def lora_config(lora_r: int, config: TrainConfig):
    """The paper's LoRA: q/k/v, alpha = r, dropout 0.2, only LoRA biases trained."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_r,
        lora_alpha=lora_r,
        lora_dropout=config.lora_dropout,
        bias="lora_only",
        target_modules=list(config.target_modules),
        task_type="CAUSAL_LM",
    )


def attach_lora(model, lora_r: int, config: TrainConfig, precision: str):
    """Wrap the base in a PeftModel whose adapter weights are in the precision's adapter dtype."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(config.seed)  # LoRA A is initialised randomly
    peft_model = get_peft_model(model, lora_config(lora_r, config), autocast_adapter_dtype=False)
    cast_adapter_weights(peft_model, adapter_dtype(precision))
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    return peft_model


# --------------------------------------------------------------------------- schedule
def optimizer_steps(n_examples: int, per_device_batch_size: int, gradient_accumulation_steps: int,
                    epochs: float) -> int:
    """The number of optimizer steps transformers.Trainer takes (its set_initial_training_values).

    OneCycleLR needs it up front and raises if stepped once more; a shorter count would end the
    cosine early. The last, partial accumulation window of an epoch is a step of its own.
    """
    batches_per_epoch = math.ceil(n_examples / per_device_batch_size)
    steps_per_epoch = max(
        batches_per_epoch // gradient_accumulation_steps + int(batches_per_epoch % gradient_accumulation_steps > 0), 1
    )
    return math.ceil(epochs * steps_per_epoch)


def build_optimizer_and_scheduler(model, learning_rate: float, total_steps: int, config: TrainConfig):
    """AdamW over the trainable (LoRA) parameters + OneCycleLR as in the paper.

    OneCycleLR starts at max_lr/div_factor, rises for warmup_fraction of the steps, then
    anneals with a cosine to max_lr/(div_factor*final_div_factor). Its default momentum cycling
    (AdamW beta1 between 0.85 and 0.95) is kept: the paper names OneCycleLR and no override.
    """
    import torch

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=learning_rate,
        total_steps=total_steps,
        pct_start=config.warmup_fraction,
        anneal_strategy="cos",
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
    )
    return optimizer, scheduler


# --------------------------------------------------------------------------- trainer
def sft_arguments(point: GridPoint, config: TrainConfig, output_dir: Path):
    """SFTConfig with every default that matters set explicitly (TRL's differ from the paper's)."""
    import torch
    from trl import SFTConfig

    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=point.learning_rate,  # informational: the optimizer is ours
        # TRL defaults gradient checkpointing to on (5-20x slower on CPU); transformers 5 names
        # it activation_checkpointing (the old name is a deprecated alias).
        activation_checkpointing=config.gradient_checkpointing,
        # Weights are already in the run's precision; autocast would only add casts on CPU.
        bf16=on_gpu and point.precision != "fp32",
        fp16=False,
        max_length=config.max_seq_length,
        completion_only_loss=True,
        assistant_only_loss=False,
        train_sampling_strategy=config.sampling,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        report_to="none",  # our callback logs to MLflow; TRL's own would open a second run
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        use_cpu=not on_gpu,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
    )


def completion_loss(trainer, model, inputs: dict, num_items_in_batch=None):
    """Next-token loss over the completion positions only, projecting just those through the
    LM head: what TRL's fused head computes, without its cost on CPU.

    TRL 1.16 scores *every* position (prompt and padding included) when Triton is unavailable,
    in fp32 tiles over the 49k vocabulary: on CPU that is slower than plain full logits. Here
    the backbone runs once, the hidden states of the labelled positions are gathered, and only
    they meet the LM head. Same value as TRL's loss (sum over labelled tokens / token count).
    """
    import torch
    import torch.nn.functional as functional

    causal_lm = trainer.accelerator.unwrap_model(model)
    if hasattr(causal_lm, "get_base_model"):
        causal_lm = causal_lm.get_base_model()  # PEFT: the LoRA layers live inside it
    hidden = causal_lm.base_model(
        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False
    ).last_hidden_state[:, :-1]
    targets = inputs["labels"][:, 1:]
    mask = targets != -100
    logits = causal_lm.get_output_embeddings()(hidden[mask]).float()
    loss = functional.cross_entropy(logits, targets[mask], reduction="sum")
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = loss / torch.as_tensor(count).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets[mask]).sum()
        trainer._metrics["train"]["mean_token_accuracy"].append((correct / mask.sum().clamp(min=1)).item())
    return loss


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


def sft_trainer_class():
    """SFTTrainer with this recipe's fixes (a factory: TRL is imported only when needed).

    - Resuming loads the adapter in place (`load_adapter_checkpoint`) and checks that the
      optimizer still holds the model's trainable parameters.
    - On CPU the loss is `completion_loss` (on CUDA, TRL's Triton head is compact already).
    """
    import torch
    from peft import PeftModel
    from trl import SFTTrainer

    class TonetuneSFTTrainer(SFTTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = model if model is not None else self.model
            checkpoint = Path(resume_from_checkpoint)
            if isinstance(model, PeftModel) and (checkpoint / "adapter_model.safetensors").is_file():
                load_adapter_checkpoint(model, checkpoint)
            else:
                super()._load_from_checkpoint(resume_from_checkpoint, model)
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if trainable != optimized:
                raise RuntimeError("after loading the checkpoint the optimizer no longer holds the LoRA parameters")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if torch.cuda.is_available() or return_outputs or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return completion_loss(self, model, inputs, num_items_in_batch)

    return TonetuneSFTTrainer


def build_trainer(model, tokenizer, examples: datasets.Dataset, point: GridPoint, config: TrainConfig,
                  output_dir: Path, callbacks=()):
    """SFTTrainer over a PEFT-wrapped model, with our AdamW + OneCycleLR over the exact steps."""
    from transformers.trainer_callback import PrinterCallback

    total_steps = optimizer_steps(
        len(examples), config.per_device_batch_size, config.gradient_accumulation_steps, config.epochs
    )
    optimizer, scheduler = build_optimizer_and_scheduler(model, point.learning_rate, total_steps, config)
    trainer = sft_trainer_class()(
        model=model,
        args=sft_arguments(point, config, output_dir),
        train_dataset=examples,
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
        callbacks=list(callbacks),
    )
    trainer_steps = optimizer_steps(
        len(trainer.train_dataset), config.per_device_batch_size, config.gradient_accumulation_steps, config.epochs
    )
    if trainer_steps != total_steps:  # TRL dropped examples: the schedule would not fit
        raise RuntimeError(f"OneCycleLR built for {total_steps} steps, trainer will take {trainer_steps}")
    trainer.remove_callback(PrinterCallback)  # the step logger prints one readable line per step
    return trainer


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU), in MiB."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_step_logger(run_id: str, label: str):
    """A TrainerCallback that logs train_loss, learning_rate and grad_norm to MLflow at every
    optimizer step (the step is the global step, so a resumed run continues the curve) and
    prints one line per step."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from transformers import TrainerCallback

    client = MlflowClient()

    class StepLogger(TrainerCallback):
        def __init__(self):
            self.history: list[dict[str, float]] = []
            self.resumed_at_step: int = 0
            self._last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.resumed_at_step = state.global_step
            self._last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            record = {"step": state.global_step, "train_loss": float(logs["loss"]),
                      "learning_rate": float(logs["learning_rate"])}
            if logs.get("grad_norm") is not None:
                record["grad_norm"] = float(logs["grad_norm"])
            self.history.append(record)
            now_ms = int(time.time() * 1000)
            metrics = [Metric(key, value, now_ms, state.global_step) for key, value in record.items() if key != "step"]
            client.log_batch(run_id, metrics=metrics, synchronous=True)
            elapsed, self._last = time.perf_counter() - self._last, time.perf_counter()
            print(
                f"train {label}: step {state.global_step}/{state.max_steps} loss {record['train_loss']:.4f} "
                f"lr {record['learning_rate']:.3g} ({elapsed:.1f} s)",
                flush=True,
            )

    return StepLogger()


# --------------------------------------------------------------------------- resume
def run_fingerprint(point: GridPoint, config: TrainConfig, train_md5: str, base_sha256: str) -> str:
    """Hash of everything that defines a run: a checkpoint is reused only for the same one."""
    settings = config.model_dump(mode="json", exclude={"grid", "save_steps", "logging_steps"})
    payload = {
        "point": [point.precision, point.lora_r, format_learning_rate(point.learning_rate), point.n_train],
        "train": settings,
        "train_md5": train_md5,
        "base_sha256": base_sha256,
        "system_prompt": CONCISE_SYSTEM_PROMPT,
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


# --------------------------------------------------------------------------- MLflow
def grid_id(config: TrainConfig) -> str:
    """Same id for every point trained with one recipe: the `train` params minus the grid axes
    (and the logging/checkpoint cadence), so growing the grid keeps the runs in one group."""
    recipe = config.model_dump(mode="json", exclude={"grid", "save_steps", "logging_steps"})
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def grid_parent_run(experiment_id: str, config: TrainConfig) -> str:
    """The `train-grid-<id>` parent run of this grid, created (and closed) on first use."""
    import mlflow
    from mlflow import MlflowClient

    identifier = grid_id(config)
    found = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.grid = '{identifier}' and tags.`{GRID_ROLE_TAG}` = 'train-grid'",
        output_format="list",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    client = MlflowClient()
    run = client.create_run(
        experiment_id, run_name=f"train-grid-{identifier}", tags={"grid": identifier, GRID_ROLE_TAG: "train-grid"}
    )
    recipe = config.model_dump(mode="json", exclude={"grid", "save_steps", "logging_steps"})
    for key, value in recipe.items():  # what every child shares; the children vary the grid axes
        client.log_param(run.info.run_id, key, ",".join(map(str, value)) if isinstance(value, list) else value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def run_params(point: GridPoint, config: TrainConfig, base_reference: dict, stats: SequenceStats,
               total_steps: int, train_md5: str, val_md5: str) -> dict[str, Any]:
    """The run's params: the names the paper's table and `mlflow ui` comparisons use."""
    return {
        "precision": point.precision,
        "lora_r": point.lora_r,
        "lora_alpha": point.lora_r,
        "learning_rate": format_learning_rate(point.learning_rate),
        "n_train": point.n_train,
        "epochs": config.epochs,
        "per_device_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "effective_batch_size": config.per_device_batch_size * config.gradient_accumulation_steps,
        "lora_dropout": config.lora_dropout,
        "lora_bias": "lora_only",
        "target_modules": ",".join(config.target_modules),
        "adapter_dtype": "float32" if point.precision == "fp32" else "bfloat16",
        "int8_threshold": config.int8_threshold if point.precision == "int8" else None,
        "optimizer": "AdamW",
        "weight_decay": config.weight_decay,
        "lr_scheduler": "OneCycleLR",
        "lr_anneal_strategy": "cos",
        "warmup_fraction": config.warmup_fraction,
        "div_factor": config.div_factor,
        "final_div_factor": config.final_div_factor,
        "total_steps": total_steps,
        "max_seq_length": config.max_seq_length,
        "gradient_checkpointing": config.gradient_checkpointing,
        "sampling": config.sampling,
        "seed": config.seed,
        "system_prompt": "concise",
        "base_model_id": base_reference["model_id"],
        "base_model_path": base_reference["path"],
        "base_model_sha256": base_reference["sha256"],
        "train_dataset_md5": train_md5,
        "val_dataset_md5": val_md5,
        "mean_sequence_tokens": round(stats.mean_tokens, 1),
        "truncated_examples": stats.truncated,
    }


def start_tracking(config: Config, point: GridPoint, resume: ResumeState):
    """Start (or re-open, when resuming) the grid point's MLflow run under its grid parent."""
    import mlflow

    experiment_id = configure_mlflow(config.tracking)
    if resume.mlflow_run_id:
        try:
            run = mlflow.get_run(resume.mlflow_run_id)
            if run.info.lifecycle_stage == "active":
                return mlflow.start_run(run_id=resume.mlflow_run_id), True
        except mlflow.exceptions.MlflowException:
            pass  # the run was deleted: log the resumed training to a new one
    parent = grid_parent_run(experiment_id, config.train)
    tags = {
        "grid": grid_id(config.train),
        GRID_ROLE_TAG: "train",
        "tonetune.stage": "train",
        **code_version_tags(),
    }
    active = mlflow.start_run(run_name=point.name, parent_run_id=parent, tags=tags)
    # Under `mlflow run` (MLFLOW_RUN_ID set) start_run re-opens that run and ignores name, parent
    # and tags: set them on it explicitly, so the grid looks the same however it was launched.
    mlflow.set_tags({**tags, "mlflow.runName": point.name, "mlflow.parentRunId": parent})
    return active, False


# --------------------------------------------------------------------------- outputs
def save_adapter(model, tokenizer, paths: TrainPaths, metadata: dict[str, Any]) -> None:
    """Write adapter + tokenizer + metadata to a sibling temp folder, then swap it into place."""
    building = paths.checkpoint_dir.with_name(f"{paths.checkpoint_dir.name}.saving")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    model.save_pretrained(str(building))
    tokenizer.save_pretrained(str(building))
    (building / ADAPTER_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    if paths.adapter_dir.exists():
        shutil.rmtree(paths.adapter_dir)
    paths.adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(building), str(paths.adapter_dir))


@dataclass(frozen=True)
class PreparedRun:
    """Everything known about a grid point before its model is loaded."""

    train_frame: Any
    val_frame: Any
    tokenizer: Any
    examples: Any
    stats: SequenceStats
    total_steps: int
    train_md5: str
    val_md5: str
    base_reference: dict
    fingerprint: str


def prepare_run(point: GridPoint, config: TrainConfig, paths: TrainPaths) -> PreparedRun:
    """Read and check the splits, tokenizer lengths, step count, hashes and the run fingerprint."""
    from transformers import AutoTokenizer

    train_frame = read_split(paths.train_split, point.n_train)
    val_frame = read_split(paths.val_split)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.base_dir))
    examples = conversational_examples(train_frame)
    stats = sequence_stats(tokenizer, examples, config.max_seq_length)
    total_steps = optimizer_steps(len(examples), config.per_device_batch_size, config.gradient_accumulation_steps,
                                  config.epochs)
    train_md5, val_md5 = file_md5(paths.train_split), file_md5(paths.val_split)
    base_reference = base_model_reference(paths.base_dir)
    fingerprint = run_fingerprint(point, config, train_md5, base_reference["sha256"])
    return PreparedRun(train_frame, val_frame, tokenizer, examples, stats, total_steps, train_md5, val_md5,
                       base_reference, fingerprint)


def record_run_inputs(point: GridPoint, config: TrainConfig, prepared: PreparedRun, paths: TrainPaths) -> None:
    """Params and dataset inputs of a new run (a resumed run has them already)."""
    import mlflow

    mlflow.log_params(run_params(point, config, prepared.base_reference, prepared.stats, prepared.total_steps,
                                 prepared.train_md5, prepared.val_md5))
    log_dataset_input(prepared.train_frame, paths.train_split, context="training", name=paths.train_split.stem)
    log_dataset_input(prepared.val_frame, paths.val_split, context="validation", name=paths.val_split.stem)


@dataclass
class FitResult:
    """A finished trainer and what this process measured while it trained."""

    trainer: Any
    history: list[dict[str, float]]
    resumed_at_step: int
    seconds: float
    tokens: int


def fit(point: GridPoint, config: TrainConfig, prepared: PreparedRun, paths: TrainPaths, resume: ResumeState,
        run_id: str, callbacks=()) -> FitResult:
    """Load the base in the point's precision, attach LoRA, train (from the checkpoint if any)."""
    model = attach_lora(
        load_base_model(paths.base_dir, point.precision, config.int8_threshold), point.lora_r, config, point.precision
    )
    step_logger = make_step_logger(run_id, point.name)
    trainer = build_trainer(
        model, prepared.tokenizer, prepared.examples, point, config, paths.checkpoint_dir, [step_logger, *callbacks]
    )
    if resume.checkpoint:
        print(f"train {point.name}: resuming from {resume.checkpoint}", flush=True)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
    seconds = time.perf_counter() - started
    # Non-padding tokens trained on by this process (a resumed run counts from its checkpoint).
    tokens = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen
    return FitResult(trainer, step_logger.history, step_logger.resumed_at_step, seconds, int(tokens))


def training_metrics(fitted: FitResult) -> dict[str, float]:
    """Summary metrics of the run (per-step curves are logged as training goes)."""
    losses = [record["train_loss"] for record in fitted.history]
    return {
        "train_runtime_s": fitted.seconds,
        "train_tokens": float(fitted.tokens),
        "tokens_per_s": fitted.tokens / fitted.seconds if fitted.seconds > 0 else 0.0,
        "peak_memory_mb": peak_memory_mb(),
        "first_train_loss": losses[0] if losses else float("nan"),
        "final_train_loss": losses[-1] if losses else float("nan"),
        "optimizer_steps": float(fitted.trainer.state.global_step),
    }


def publish_adapter(point: GridPoint, config: Config, prepared: PreparedRun, paths: TrainPaths, fitted: FitResult,
                    run_id: str):
    """Save the adapter folder (the DVC output) and log it as the run's pyfunc model."""
    policy = DecodingPolicy.for_evaluation(config.evaluate)
    metadata = {
        "run_name": point.name,
        "precision": point.precision,
        "lora_r": point.lora_r,
        "lora_alpha": point.lora_r,
        "learning_rate": point.learning_rate,
        "n_train": point.n_train,
        "mlflow_run_id": run_id,
        "base_model": prepared.base_reference,
        "system_prompt": CONCISE_SYSTEM_PROMPT,
        "train_dataset_md5": prepared.train_md5,
        "serve_precision": point.precision,
        "decoding": policy.to_dict(),
        "batch_size": config.evaluate.batch_size,
    }
    save_adapter(fitted.trainer.model, prepared.tokenizer, paths, metadata)
    return log_adapter_model(
        paths.adapter_dir, prepared.base_reference, point.precision, policy, config.evaluate.batch_size,
        int8_threshold=config.train.int8_threshold,
    )


@dataclass
class TrainResult:
    """What one grid point produced (tests use the model and history; main prints a summary)."""

    run_id: str
    run_name: str
    adapter_dir: Path
    total_steps: int
    resumed_at_step: int
    history: list[dict[str, float]]
    metrics: dict[str, float]
    model_uri: str
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)


def train_grid_point(point: GridPoint, config: Config, paths: TrainPaths, callbacks=()) -> TrainResult:
    """Train one grid point end to end: data, resume state, MLflow run, training, adapter, model.

    An exception (Ctrl-C included) marks the MLflow run FAILED/KILLED and leaves the
    checkpoints, so the same call later resumes into the same run.
    """
    import mlflow

    started = time.perf_counter()
    prepared = prepare_run(point, config.train, paths)
    resume = find_resume_state(paths.checkpoint_dir, prepared.fingerprint)
    active, reopened = start_tracking(config, point, resume)
    run_id = active.info.run_id
    try:
        if reopened:
            step = checkpoint_step(resume.checkpoint) if resume.checkpoint else 0
            mlflow.set_tags({"resumed_at_step": step, "resumed_from_checkpoint": str(resume.checkpoint)})
        else:
            record_run_inputs(point, config.train, prepared, paths)
        write_checkpoint_state(paths.checkpoint_dir, prepared.fingerprint, run_id, point.name)
        fitted = fit(point, config.train, prepared, paths, resume, run_id, callbacks)
        metrics = training_metrics(fitted)
        model_info = publish_adapter(point, config, prepared, paths, fitted, run_id)
        metrics["wall_time_s"] = time.perf_counter() - started
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"adapter_dir": paths.adapter_dir.as_posix(), "adapter_model_uri": model_info.model_uri})
        shutil.rmtree(paths.checkpoint_dir, ignore_errors=True)
    except BaseException as error:
        mlflow.end_run(status="KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()
    return TrainResult(
        run_id=run_id,
        run_name=point.name,
        adapter_dir=paths.adapter_dir,
        total_steps=prepared.total_steps,
        resumed_at_step=fitted.resumed_at_step,
        history=fitted.history,
        metrics=metrics,
        model_uri=model_info.model_uri,
        model=fitted.trainer.model,
        tokenizer=prepared.tokenizer,
    )


# --------------------------------------------------------------------------- CLI
class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line TonetuneErrors (exit 2, no usage dump)."""

    def error(self, message: str):
        raise TonetuneError(f"{self.prog}: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _ArgumentParser(
        prog="python -m pipeline.train",
        description="Stage train: LoRA fine-tuning of models/base on one grid point; the adapter goes to "
        "models/adapters/lora-<precision>-r<R>-lr<LR>-n<N>/ (params: train.*).",
    )
    parser.add_argument("--precision", required=True, help=f"one of {', '.join(PRECISIONS)}")
    parser.add_argument("--lora-r", type=int, required=True, help="LoRA rank (alpha = r)")
    parser.add_argument("--learning-rate", type=float, required=True, help="OneCycleLR max_lr")
    parser.add_argument("--n-train", type=int, required=True, help="training subset size (data/splits/train_<N>.parquet)")
    parser.add_argument("--adapter-dir", type=Path, default=None, help="output folder (default models/adapters/<run-name>)")
    parser.add_argument("--base-model-dir", type=Path, default=BASE_MODEL_DIR, help="base model folder")
    return parser.parse_args(argv)


def _interrupt(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C, so the MLflow run is marked KILLED (checkpoints stay)."""
    raise KeyboardInterrupt(f"signal {signum}")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    point = GridPoint(args.precision, args.lora_r, args.learning_rate, args.n_train)
    validate_grid_point(point)
    paths = TrainPaths.for_point(point, args.adapter_dir, args.base_model_dir)
    check_inputs(point, paths)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)  # `dvc queue kill`, a scheduler: stop like Ctrl-C
    try:
        result = train_grid_point(point, config, paths)
    except KeyboardInterrupt:
        print(
            f"error: interrupted; checkpoints are in {paths.checkpoint_dir}: run the same command again to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    losses = [f"{record['train_loss']:.3f}" for record in result.history]
    print(
        f"train {result.run_name}: {result.total_steps} steps, loss {losses[0] if losses else '?'} -> "
        f"{losses[-1] if losses else '?'}, {result.metrics['tokens_per_s']:.0f} tokens/s, "
        f"peak {result.metrics['peak_memory_mb']:.0f} MiB, {result.metrics['wall_time_s']:.0f} s "
        f"-> {result.adapter_dir} (MLflow run {result.run_id})"
    )


if __name__ == "__main__":
    main()
