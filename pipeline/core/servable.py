"""The fine-tuned model as an MLflow pyfunc: a LoRA adapter plus a reference to its base model.

Why not `mlflow.transformers`: with a PeftModel over a LOCAL base it reloads wrong weights
(logits off by ~0.6) with only a warning. This model is explicit instead:

- artifacts: `adapter` (the folder the train stage wrote: adapter weights, adapter_config.json,
  the tokenizer with its chat template) and `base_model` (a small JSON reference: absolute path
  and SHA-256 of the base weights, see pipeline.core.modeling.base_model_reference);
- model_config (MODEL_CONFIG_KEYS): `precision` (the base is loaded in the adapter's training
  precision, the precision it was evaluated in), `int8_threshold` (int8 only), the decoding
  shape `batch_size` (rows per forward) and `bucket_tokens` (a version logged before it existed
  decodes with pipeline.core.modeling.DEFAULT_BUCKET_TOKENS), `max_new_tokens`, `decoding` (the
  evaluation's decoding policy, a dict of pipeline.core.modeling.DecodingPolicy fields),
  `system_prompt_text` (the prompt it was trained with; not `system_prompt`, which the training
  run already holds as the short param "concise", and MLflow copies model_config into the
  run's params);
- `predict(questions)` answers through pipeline.core.modeling.answer_questions, the code the
  predict stage evaluated it with: same precision, stop ids, decoding policy and shape. That
  path is batch-invariant, so every evaluated question gets its evaluated answer byte for byte,
  alone or in any request, greedy or sampled (same machine, kernel path and threads). A
  `batch_size` request param (older signatures list it) is ignored: the shape is part of the
  model's numerics, not a speed knob.

The model is logged from code (pipeline/core/servable_model.py, no pickling) with type hints on
`predict` (list[str] -> list[str]) and an input example, so MLflow infers and checks the signature.
The base model is referenced, not copied (260 MB here, GBs at paper scale);
`TONETUNE_BASE_MODEL_DIR` points at a relocated copy, still hash-checked. Loading needs the
tonetune package importable (`make setup` installs it in editable mode).

mlflow is imported only inside `log_adapter_model` and by servable_model.py, so code that only
loads or runs a model (train, bench) does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.core.modeling import (
    DEFAULT_BUCKET_TOKENS,
    DEFAULT_ROWS,
    DecodingPolicy,
    answer_questions,
    end_of_turn_ids,
    load_adapter_model,
    resolve_base_model,
)
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT

BASE_REFERENCE_FILE = "base_model.json"
ADAPTER_ARTIFACT = "adapter"
BASE_ARTIFACT = "base_model"
MODEL_CODE_PATH = Path(__file__).with_name("servable_model.py")
MODEL_CONFIG_KEYS = ("precision", "int8_threshold", "batch_size", "bucket_tokens", "max_new_tokens", "decoding",
                     "system_prompt_text")
logger = logging.getLogger(__name__)
INPUT_EXAMPLE = ["What is a prime number?"]


def model_config(precision: str, policy: DecodingPolicy, batch_size: int, int8_threshold: float,
                 system_prompt: str = CONCISE_SYSTEM_PROMPT,
                 bucket_tokens: int = DEFAULT_BUCKET_TOKENS) -> dict[str, Any]:
    """How the pyfunc loads and answers. MLflow also copies model_config into the active run's
    params and drops the whole batch if one key would change a param the train stage logged, so
    keys avoid those params: `int8_threshold` only for int8 (train logs None otherwise),
    `system_prompt_text` (train's `system_prompt` is the short name "concise")."""
    config: dict[str, Any] = {
        "precision": precision,
        "max_new_tokens": int(policy.max_new_tokens),
        "batch_size": int(batch_size),
        "bucket_tokens": int(bucket_tokens),
        "decoding": policy.to_dict(),
        "system_prompt_text": system_prompt,
    }
    if precision == "int8":
        config["int8_threshold"] = float(int8_threshold)
    return config


class AdapterServer:
    """What the pyfunc does, without MLflow: load from (model_config, artifact paths), answer."""

    def __init__(self, config: dict[str, Any], adapter_dir: str | Path, base_reference_file: str | Path):
        reference = json.loads(Path(base_reference_file).read_text())
        base_dir = resolve_base_model(reference)
        self.precision = str(config.get("precision", "fp32"))
        self.system_prompt = config.get("system_prompt_text") or CONCISE_SYSTEM_PROMPT
        self.rows = int(config.get("batch_size", DEFAULT_ROWS))
        self.bucket_tokens = int(config.get("bucket_tokens", DEFAULT_BUCKET_TOKENS))
        recorded = dict(config.get("decoding") or {"strategy": "greedy", "no_repeat_ngram_size": 0})
        recorded["max_new_tokens"] = int(config.get("max_new_tokens", recorded.get("max_new_tokens", 128)))
        self.policy = DecodingPolicy.from_dict(recorded)
        self.model, self.tokenizer = load_adapter_model(
            base_dir, adapter_dir, self.precision, float(config.get("int8_threshold", 6.0))
        )
        self.stop_ids = end_of_turn_ids(self.tokenizer, self.model.generation_config)

    def answer(self, questions: list[str], params: dict[str, Any] | None = None) -> list[str]:
        """One answer per question, in order, each independent of the others in the request;
        params may override max_new_tokens. `batch_size` is ignored (with a warning when it
        differs): rows per forward are part of the recorded decoding shape."""
        params = params or {}
        policy = self.policy
        if params.get("max_new_tokens"):
            policy = DecodingPolicy(**{**policy.to_dict(), "max_new_tokens": int(params["max_new_tokens"])})
        if params.get("batch_size") and int(params["batch_size"]) != self.rows:
            logger.warning("ignoring params batch_size=%s: this model always decodes %d rows per forward, so an "
                           "answer does not depend on the request", params["batch_size"], self.rows)
        return answer_questions(self.model, self.tokenizer, [str(q) for q in questions], self.system_prompt, policy,
                                self.rows, self.stop_ids, bucket_tokens=self.bucket_tokens).answers


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


def log_adapter_model(
    adapter_dir: str | Path,
    base_reference: dict[str, Any],
    precision: str,
    policy: DecodingPolicy,
    batch_size: int,
    int8_threshold: float = 6.0,
    name: str = "adapter",
    bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
    system_prompt: str = CONCISE_SYSTEM_PROMPT,
):
    """Log the adapter folder + base reference as a pyfunc model of the active run; ModelInfo.

    The input example (one question, with the default params) makes MLflow load the model and
    answer it once: the signature is checked against a real answer, at the cost of one load.
    """
    quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow reloads the model it logs to answer the example
    previous = os.environ.get(quiet)
    os.environ[quiet] = "false"
    try:
        return _log(adapter_dir, base_reference, precision, policy, batch_size, int8_threshold, name, bucket_tokens,
                    system_prompt)
    finally:
        if previous is None:
            os.environ.pop(quiet, None)
        else:
            os.environ[quiet] = previous


def _log(adapter_dir, base_reference, precision, policy, batch_size, int8_threshold, name, bucket_tokens,
         system_prompt=CONCISE_SYSTEM_PROMPT):
    """log_adapter_model's work, with MLflow's download bars already off."""
    import mlflow

    # MLflow announces at INFO that it runs predict on the input example (that is the check we
    # want, not news for the user of a training stage): quiet for this call only.
    signature_logger = logging.getLogger("mlflow.models.signature")
    previous_level = signature_logger.level
    signature_logger.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            reference_file = Path(scratch) / BASE_REFERENCE_FILE
            reference_file.write_text(json.dumps(base_reference, indent=2) + "\n")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE_PATH),
                artifacts={ADAPTER_ARTIFACT: str(adapter_dir), BASE_ARTIFACT: str(reference_file)},
                model_config=model_config(precision, policy, batch_size, int8_threshold, system_prompt=system_prompt,
                                          bucket_tokens=bucket_tokens),
                input_example=(INPUT_EXAMPLE, {"max_new_tokens": int(policy.max_new_tokens)}),
                pip_requirements=pip_requirements(),
            )
    finally:
        signature_logger.setLevel(previous_level)
    mlflow.set_tag("serve_precision", precision)
    return info
