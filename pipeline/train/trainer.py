"""Stage `train`, the trainer: LoRA, AdamW + OneCycleLR, SFTConfig, the CPU loss, the SFTTrainer.

Owns: the paper's LoRA config and attaching it in the precision's adapter dtype, the exact
optimizer step count and the OneCycle schedule built over it, the SFTConfig (every default that
matters set explicitly), the completion-only CPU loss, the SFTTrainer subclass (resuming in
place, that loss) and the per-step MLflow/console logger callback.

Not here: data and paths (inputs.py), checkpoint state and loading LoRA weights from a
checkpoint (resume.py), the MLflow run, training end to end and the adapter (run.py).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import TrainConfig
from pipeline.core.contracts import GridPoint
from pipeline.core.modeling import adapter_dtype, cast_adapter_weights
from pipeline.train.resume import load_adapter_checkpoint

if TYPE_CHECKING:
    import datasets


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
