"""Stage `train`, one grid point end to end: MLflow run, training, saving and logging the adapter.

Owns: the grid id and its `train-grid-<id>` parent run, the run's params, starting or
re-opening the point's MLflow run, preparing the run (splits, tokenizer, step count, hashes,
fingerprint), fitting, the summary metrics, writing the adapter folder (the DVC output) and
logging it as the run's pyfunc model, and `train_grid_point`, which ties these together.

Not here: data and paths (inputs.py), the trainer's pieces (trainer.py), checkpoint state
(resume.py), argument parsing and signals (__main__.py), the pyfunc model itself
(pipeline.core.servable).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import Config, TrainConfig
from pipeline.core.contracts import ADAPTER_METADATA_FILE, GridPoint, Tags, format_learning_rate
from pipeline.core.dvcmeta import file_md5
from pipeline.core.modeling import DecodingPolicy, base_model_reference, load_base_model
from pipeline.core.prompts import system_prompts, tone_prompts
from pipeline.core.servable import log_adapter_model
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT
from pipeline.core.tone import tone_tags
from pipeline.core.tracking import code_version_tags, configure_mlflow, log_dataset_input, log_prompts
from pipeline.train.inputs import (
    SequenceStats,
    TrainPaths,
    conversational_examples,
    read_split,
    sequence_stats,
)
from pipeline.train.resume import (
    ResumeState,
    checkpoint_step,
    find_resume_state,
    run_fingerprint,
    write_checkpoint_state,
)
from pipeline.train.trainer import attach_lora, build_trainer, make_step_logger, optimizer_steps

GRID_ROLE_TAG = Tags.ROLE


def peak_memory_mb() -> float:
    """Peak GPU memory allocated (CUDA) or peak resident memory of this process (CPU), in MiB."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
        filter_string=f"tags.{Tags.GRID} = '{identifier}' and tags.`{GRID_ROLE_TAG}` = 'train-grid'",
        output_format="list",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    client = MlflowClient()
    run = client.create_run(
        experiment_id, run_name=f"train-grid-{identifier}", tags={Tags.GRID: identifier, GRID_ROLE_TAG: "train-grid"}
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
        Tags.GRID: grid_id(config.train),
        GRID_ROLE_TAG: "train",
        Tags.STAGE_LEGACY: "train",
        **code_version_tags(),
    }
    active = mlflow.start_run(run_name=point.name, parent_run_id=parent, tags=tags)
    # Under `mlflow run` (MLFLOW_RUN_ID set) start_run re-opens that run and ignores name, parent
    # and tags: set them on it explicitly, so the grid looks the same however it was launched.
    mlflow.set_tags({**tags, "mlflow.runName": point.name, Tags.MLFLOW_PARENT_RUN_ID: parent})
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


def prepare_run(point: GridPoint, config: TrainConfig, paths: TrainPaths,
                system_prompt: str = CONCISE_SYSTEM_PROMPT) -> PreparedRun:
    """Read and check the splits, tokenizer lengths, step count, hashes and the run fingerprint.
    `system_prompt`: the tone's concise prompt, the one the adapter is trained (and served) with."""
    from transformers import AutoTokenizer

    train_frame = read_split(paths.train_split, point.n_train)
    val_frame = read_split(paths.val_split)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.base_dir))
    examples = conversational_examples(train_frame, system_prompt)
    stats = sequence_stats(tokenizer, examples, config.max_seq_length)
    total_steps = optimizer_steps(len(examples), config.per_device_batch_size, config.gradient_accumulation_steps,
                                  config.epochs)
    train_md5, val_md5 = file_md5(paths.train_split), file_md5(paths.val_split)
    base_reference = base_model_reference(paths.base_dir)
    fingerprint = run_fingerprint(point, config, train_md5, base_reference["sha256"], system_prompt)
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
        "system_prompt": system_prompts(config.tone).system_prompt("concise"),
        "train_dataset_md5": prepared.train_md5,
        "serve_precision": point.precision,
        "decoding": policy.to_dict(),
        "batch_size": config.evaluate.batch_size,
        "bucket_tokens": config.evaluate.bucket_tokens,
    }
    save_adapter(fitted.trainer.model, prepared.tokenizer, paths, metadata)
    return log_adapter_model(
        paths.adapter_dir, prepared.base_reference, point.precision, policy, config.evaluate.batch_size,
        int8_threshold=config.train.int8_threshold, bucket_tokens=config.evaluate.bucket_tokens,
        system_prompt=metadata["system_prompt"],
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
    texts = system_prompts(config.tone)
    prepared = prepare_run(point, config.train, paths, texts.system_prompt("concise"))
    resume = find_resume_state(paths.checkpoint_dir, prepared.fingerprint)
    active, reopened = start_tracking(config, point, resume)
    run_id = active.info.run_id
    try:
        if reopened:
            step = checkpoint_step(resume.checkpoint) if resume.checkpoint else 0
            mlflow.set_tags({"resumed_at_step": step, "resumed_from_checkpoint": str(resume.checkpoint)})
        else:
            record_run_inputs(point, config.train, prepared, paths)
            mlflow.set_tags(tone_tags(config.tone))
            log_prompts(tone_prompts(config.tone, ("system_concise",)), config.tone.name)
        write_checkpoint_state(paths.checkpoint_dir, prepared.fingerprint, run_id, point.name)
        fitted = fit(point, config.train, prepared, paths, resume, run_id, callbacks)
        metrics = training_metrics(fitted)
        model_info = publish_adapter(point, config, prepared, paths, fitted, run_id)
        metrics["wall_time_s"] = time.perf_counter() - started
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"adapter_dir": paths.adapter_dir.as_posix(), Tags.ADAPTER_MODEL_URI: model_info.model_uri})
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
