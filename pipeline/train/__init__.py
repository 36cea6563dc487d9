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

Modules: inputs.py (grid point, paths, splits, examples), trainer.py (LoRA, optimizer and
schedule, SFTConfig, CPU loss, the SFTTrainer, the step logger), resume.py (fingerprints,
checkpoint state, finding and loading checkpoints), run.py (one grid point end to end: MLflow
run, training, saving and logging the adapter), __main__.py (the command line). This file only
re-exports the names tests and bench/ use. Importing the package imports nothing heavy.

Not here: loading and answering (pipeline.core.modeling), evaluation (pipeline.predict,
pipeline.score), registration (registry).
"""

from pipeline.train.inputs import TrainPaths, conversational_examples
from pipeline.train.resume import find_resume_state, write_checkpoint_state
from pipeline.train.run import train_grid_point
from pipeline.train.trainer import attach_lora, build_trainer, completion_loss, optimizer_steps

__all__ = [
    "TrainPaths",
    "attach_lora",
    "build_trainer",
    "completion_loss",
    "conversational_examples",
    "find_resume_state",
    "optimizer_steps",
    "train_grid_point",
    "write_checkpoint_state",
]
