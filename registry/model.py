"""The fine-tuned model as an MLflow pyfunc: a LoRA adapter plus a reference to its base model.

Why not `mlflow.transformers`: with a PeftModel over a LOCAL base it reloads wrong weights
(logits off by ~0.6) with only a warning (ENVIRONMENT.md). This class is explicit instead:

- artifacts: `adapter` (the folder the train stage wrote: adapter weights, adapter_config.json,
  the tokenizer with its chat template) and `base_model` (a small JSON reference, see below);
- model_config: precision (the base is loaded as it was trained: bf16, fp32 or 8-bit), greedy
  `max_new_tokens`, `batch_size`, `system_prompt_text` (the paper's concise prompt; not
  `system_prompt`, which the training run already holds as the short param "concise" and
  MLflow, which copies model_config into the run's params, refuses to overwrite);
- `predict(questions)` returns one answer per question, greedy, so the same input always gives
  the same text.

The base model is *referenced*, not copied: logging the 260 MB base (5 GB at paper scale) into
every grid run would cost more than the training. The reference records the absolute path of
models/base and the SHA-256 of its weights (config.json + *.safetensors). Loading checks both
and fails with one line if the folder is missing or holds other weights; `TONETUNE_BASE_MODEL_DIR`
points at a relocated copy (e.g. after `dvc pull models/base` in another clone), still
hash-checked. The class is pickled by reference, so loading needs the tonetune package
importable (`make setup` installs it in editable mode).

Not here: evaluation metrics (pipeline.evaluate), promotion (registry.promote).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from pipeline.core.errors import TonetuneError
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, chat_messages

BASE_REFERENCE_FILE = "base_model.json"
BASE_PROVENANCE_FILE = "tonetune_base.json"
BASE_MODEL_DIR_ENV = "TONETUNE_BASE_MODEL_DIR"
ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base_model"
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BATCH_SIZE = 8
QUESTION_COLUMN = "question"


# --------------------------------------------------------------------------- base model identity
def weights_files(base_dir: Path) -> list[Path]:
    """The files that define the base model's weights: config.json and every *.safetensors."""
    files = [base_dir / "config.json", *sorted(base_dir.glob("*.safetensors"))]
    return [path for path in files if path.is_file()]


def weights_sha256(base_dir: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 over the names and bytes of config.json + *.safetensors (~1 s for 260 MB).

    Provenance files and timestamps are left out on purpose: rebuilding the same weights
    gives the same hash, so an adapter stays loadable after `dvc repro base_model`.
    """
    base_dir = Path(base_dir)
    files = weights_files(base_dir)
    if not any(path.suffix == ".safetensors" for path in files):
        raise TonetuneError(f"{base_dir}: no *.safetensors weights found (run `dvc repro base_model`)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_size), b""):
                digest.update(chunk)
    return digest.hexdigest()


def base_model_reference(base_dir: str | Path) -> dict[str, Any]:
    """What an adapter records about its base: absolute path, weights hash, model id, provenance."""
    base_dir = Path(base_dir).resolve()
    provenance_file = base_dir / BASE_PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    model_id = provenance.get("hub_id") or provenance.get("upstream")
    if not model_id:
        config = json.loads((base_dir / "config.json").read_text())
        model_id = config.get("_name_or_path") or base_dir.name
    return {
        "path": str(base_dir),
        "sha256": weights_sha256(base_dir),
        "model_id": model_id,
        "provenance": provenance,
    }


def resolve_base_model(reference: dict[str, Any], verify: bool = True) -> Path:
    """The base folder to load for `reference`: $TONETUNE_BASE_MODEL_DIR, else the recorded path,
    else (when that is gone) ./models/base; checked to hold exactly the weights the adapter was
    trained on."""
    override = os.environ.get(BASE_MODEL_DIR_ENV)
    base_dir = Path(override) if override else Path(reference["path"])
    if not override and not (base_dir / "config.json").is_file() and (Path("models/base") / "config.json").is_file():
        base_dir = Path("models/base")  # a moved project or another clone (`dvc pull`): hash-checked below
    hint = (
        f"the adapter references its base model by path; rebuild it (`dvc repro base_model` or "
        f"`dvc pull models/base`) or set {BASE_MODEL_DIR_ENV} to a copy"
    )
    if not (base_dir / "config.json").is_file():
        raise TonetuneError(f"base model {reference.get('model_id')} not found at {base_dir}: {hint}")
    if verify:
        actual = weights_sha256(base_dir)
        if actual != reference["sha256"]:
            raise TonetuneError(
                f"base model at {base_dir} has weights sha256 {actual[:12]}..., but the adapter was "
                f"trained on {reference['sha256'][:12]}...: {hint}"
            )
    return base_dir


# --------------------------------------------------------------------------- loading and answering
def cast_adapter_weights(model, dtype) -> None:
    """Put every LoRA weight (and trainable parameter) in `dtype`.

    PEFT creates LoRA weights in float32 for an 8-bit base and upcasts bf16 ones unless told
    not to (autocast_adapter_dtype); the paper keeps adapters in bf16. Training and loading
    both call this, so a reloaded model computes exactly what the trained one did.
    """
    for name, parameter in model.named_parameters():
        if ("lora_" in name or parameter.requires_grad) and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def load_adapter_model(base_dir: str | Path, adapter_dir: str | Path, precision: str, int8_threshold: float = 6.0):
    """Base model in its training precision with the adapter applied, in eval mode; + tokenizer.

    The tokenizer (and chat template) come from the adapter folder: the ones it was trained with.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from pipeline.train import adapter_dtype, load_base_model

    base = load_base_model(Path(base_dir), precision, int8_threshold)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False, autocast_adapter_dtype=False)
    cast_adapter_weights(model, adapter_dtype(precision))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    return model.eval(), tokenizer


def generate_answers(
    model,
    tokenizer,
    questions: list[str],
    system_prompt: str = CONCISE_SYSTEM_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Greedy answers, in order, with the chat template and the given system prompt.

    Left padding so every prompt ends where generation starts; batches are formed in input
    order, so the same questions always meet the same batch-mates (same numerics, same text).
    """
    import torch

    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(chat_messages(q, system_prompt), tokenize=False, add_generation_prompt=True)
                for q in batch
            ]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                output = model.generate(
                    **encoded,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        if was_training:
            model.train()
    return answers


def questions_from_input(model_input: Any) -> list[str]:
    """Questions from what a pyfunc caller passes: a DataFrame (column `question`, else its only
    column), a Series, a list of strings, one string, or {"question": ...}."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if QUESTION_COLUMN in model_input.columns:
            values = model_input[QUESTION_COLUMN]
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0]
        else:
            raise TonetuneError(
                f"expected a column {QUESTION_COLUMN!r} (or a single column); got {list(model_input.columns)}"
            )
        return questions_from_input(values)
    if isinstance(model_input, pd.Series):
        # {"question": [q1, q2]} reaches predict as one row holding the whole list
        values = model_input.tolist()
        flat = [item for value in values for item in (value if isinstance(value, (list, tuple)) else [value])]
        return [str(value) for value in flat]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict) and QUESTION_COLUMN in model_input:
        return questions_from_input(model_input[QUESTION_COLUMN])
    if isinstance(model_input, (list, tuple)):
        return [str(value) for value in model_input]
    raise TonetuneError(f"cannot read questions from a {type(model_input).__name__}")


class ConversationalAdapterModel(mlflow.pyfunc.PythonModel):
    """LoRA adapter + referenced base model, answering questions in the fine-tuned tone."""

    def load_context(self, context) -> None:
        """Resolve and verify the base, load it in the training precision, apply the adapter."""
        config = dict(context.model_config or {})
        reference = json.loads(Path(context.artifacts[BASE_ARTIFACT]).read_text())
        base_dir = resolve_base_model(reference)
        self.precision = config.get("precision", "fp32")
        self.system_prompt = config.get("system_prompt_text") or config.get("system_prompt") or CONCISE_SYSTEM_PROMPT
        self.max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        self.model, self.tokenizer = load_adapter_model(
            base_dir, context.artifacts[ADAPTER_ARTIFACT], self.precision, float(config.get("int8_threshold", 6.0))
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        """One greedy answer per question; params may override max_new_tokens and batch_size."""
        params = params or {}
        return generate_answers(
            self.model,
            self.tokenizer,
            questions_from_input(model_input),
            system_prompt=self.system_prompt,
            max_new_tokens=int(params.get("max_new_tokens") or self.max_new_tokens),
            batch_size=int(params.get("batch_size") or self.batch_size),
        )


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc (explicit: inferring them would load the model)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "pandas", "mlflow", "safetensors"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def model_config(precision: str, max_new_tokens: int, batch_size: int, int8_threshold: float) -> dict[str, Any]:
    """How the pyfunc loads and answers. MLflow also copies model_config into the active run's
    params and drops the whole batch if one key would change a param the train stage logged, so
    keys match those params: `int8_threshold` only for int8 (train logs None otherwise) and
    `system_prompt_text` (train's `system_prompt` is the short name "concise")."""
    config: dict[str, Any] = {
        "precision": precision,
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
        "system_prompt_text": CONCISE_SYSTEM_PROMPT,
    }
    if precision == "int8":
        config["int8_threshold"] = float(int8_threshold)
    return config


def log_adapter_model(
    adapter_dir: str | Path,
    base_reference: dict[str, Any],
    precision: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    int8_threshold: float = 6.0,
    name: str = "adapter",
):
    """Log the adapter folder + base reference as a pyfunc model of the active run; ModelInfo.

    No input_example on purpose: MLflow would load the model and predict to validate it.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    # One unnamed string column: MLflow then accepts a DataFrame with a `question` column, a
    # plain list of questions and a single string alike (a named column rejects the list).
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", int(max_new_tokens)),
            ParamSpec("batch_size", "long", int(batch_size)),
        ]),
    )
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        # The signature above is explicit; MLflow still suggests type hints on `predict` instead.
        warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method", category=UserWarning)
        reference_file = Path(scratch) / BASE_REFERENCE_FILE
        reference_file.write_text(json.dumps(base_reference, indent=2) + "\n")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=ConversationalAdapterModel(),
            artifacts={ADAPTER_ARTIFACT: str(adapter_dir), BASE_ARTIFACT: str(reference_file)},
            model_config=model_config(precision, max_new_tokens, batch_size, int8_threshold),
            signature=signature,
            pip_requirements=pip_requirements(),
        )
