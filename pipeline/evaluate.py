"""Stage `evaluate`: answer every validation question with every model and score the answers.

One stage for all models so the base model loads once (paper section 2.4, appendix A.5):

- `base`: the base model with the paper's verbose system prompt (the prompting condition);
- each adapter in models/adapters/<run-name>/ of the current `train.grid`, with the concise
  prompt it was trained with (the one recorded in its tonetune_adapter.json). Folders left over
  from an older grid (DVC does not delete them) are skipped with a note; `--all-adapters`
  evaluates them too.

Adapters are loaded into one PeftModel wrapped around the already loaded base: the previous
adapter is deleted (and any biases it wrote into the base restored), then load_adapter +
set_adapter, so switching costs milliseconds and memory stays flat however large the grid is. The base is answered first, before any LoRA layer exists.

Generation is greedy, batched (left padding, batches of prompts of similar token length, the
original order restored) and stops at the end of the assistant turn. The stop ids are derived,
not hard-coded: the chat template is rendered around a marker answer and the special token that
closes the assistant turn is read off (<|im_end|> for SmolLM2, <|eot_id|> for Llama 3), together
with the model's generation_config and tokenizer eos ids. Without this, models whose eos is not
the end-of-turn token run on to max_new_tokens and distort both Flesch and similarity. Answers
are cut at the first stop id and decoded without special tokens.

Scoring (pipeline.core.evalmetrics, shared with the OpenAI arm): Flesch reading ease per answer
(pipeline.core.textmetrics), cosine similarity of answer and reference answer embeddings (the
`embeddings` params), then % conversational with a bootstrap interval, mean/median Flesch, mean
similarity and answer length.

Writes, per model: reports/predictions/<model>.parquet (question, reference, answer, flesch,
similarity, n_tokens, stopped) and metrics/eval/<model>.json (evalmetrics.metrics_record, with
precision, lora_r, learning_rate, n_train of the adapter). MLflow: metrics (prefixed `eval_`) and
the predictions table go on the adapter's training run (the run id recorded in the adapter's
tonetune_adapter.json, else the newest run named like the adapter folder) so `mlflow ui` shows training params and evaluation side by side; the base model
gets a run of its own, `eval-base`, and so does an adapter without a training run.

Not done here: int8/bf16 adapters are all evaluated on one base in `evaluate.dtype` (float32 on
CPU by default), not re-quantised the way each was trained; that keeps one base load.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import (
    ADAPTERS_DIR,
    BASE_MODEL_DIR,
    VAL_SPLIT_PATH,
    Config,
    EvaluateConfig,
    load_config,
)
from pipeline.core.contracts import ADAPTER_METADATA_FILE, ADAPTER_NAME_PATTERN, grid_adapter_names
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.predictions import (
    EVAL_METRICS_DIR,
    MLFLOW_METRIC_PREFIX,
    PREDICTIONS_DIR,
    GenerationResult,
    predictions_artifact_path,
    read_validation,
    score_answers,
    write_metrics,
    write_predictions,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

BASE_NAME = "base"
BASE_RUN_NAME = "eval-base"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MARKER_ANSWER = "tonetune-end-of-turn-probe"


@dataclass
class ModelSpec:
    """One model to evaluate: its name (file names, MLflow), prompt and optional adapter."""

    name: str
    kind: str  # "base" or "lora"
    system_prompt_name: str  # "verbose" or "concise"
    system_prompt: str
    adapter_dir: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs


def discover_adapters(adapters_dir: Path) -> list[Path]:
    """Adapter folders (those holding adapter_config.json) under `adapters_dir`, sorted by name."""
    if not adapters_dir.is_dir():
        return []
    return sorted(p for p in adapters_dir.iterdir() if (p / ADAPTER_CONFIG_FILE).is_file())


def select_adapters(found: Sequence[Path], grid_names: set[str], include_all: bool) -> tuple[list[Path], list[Path]]:
    """(adapters to evaluate, leftovers skipped): those of the current grid, or all of them."""
    if include_all:
        return list(found), []
    return [p for p in found if p.name in grid_names], [p for p in found if p.name not in grid_names]


def check_base_model(model_dir: Path) -> None:
    """Fail in one line when the base model folder is missing (before torch is imported)."""
    if not (model_dir / "config.json").is_file():
        raise TonetuneError(f"{model_dir}: base model not found (run `dvc repro base_model` first)")


def system_prompts() -> tuple[str, str]:
    """The paper's (verbose, concise) system prompts, appendix A.5."""
    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, VERBOSE_SYSTEM_PROMPT

    return VERBOSE_SYSTEM_PROMPT, CONCISE_SYSTEM_PROMPT


def model_family(model_dir: Path) -> str:
    """Display name of the base model (e.g. SmolLM2-135M-Instruct), from its provenance file."""
    provenance = model_dir / "tonetune_base.json"
    if provenance.is_file():
        record = json.loads(provenance.read_text())
        name = record.get("upstream") or record.get("hub_id")
        if name:
            return str(name).rstrip("/").split("/")[-1]
    return model_dir.resolve().name


# --------------------------------------------------------------------------- adapter metadata


def _number(value: Any, kind: type) -> Any:
    """params come back from MLflow as strings; None stays None."""
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def read_adapter_record(adapter_dir: Path) -> dict[str, Any]:
    """The train stage's tonetune_adapter.json (grid point, MLflow run id, system prompt), or {}."""
    path = adapter_dir / ADAPTER_METADATA_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{path}: not valid JSON ({error.msg}); re-run the train stage for this adapter") from None
    return record if isinstance(record, dict) else {}


def adapter_metadata(adapter_dir: Path, run_params: dict[str, str] | None = None) -> dict[str, Any]:
    """precision, lora_r, lora_alpha, learning_rate, n_train of an adapter.

    Sources, most trusted first: the training run's params, tonetune_adapter.json (written by
    the train stage next to the adapter), adapter_config.json (r, alpha), and the folder name
    (lora-<precision>-r<r>-lr<lr>-n<n>). Missing values stay None ("unknown" in the report).
    """
    found: dict[str, Any] = {}
    match = ADAPTER_NAME_PATTERN.match(adapter_dir.name)
    if match:
        found.update(match.groupdict())
    config_file = adapter_dir / ADAPTER_CONFIG_FILE
    if config_file.is_file():
        adapter_config = json.loads(config_file.read_text())
        found.update(lora_r=adapter_config.get("r"), lora_alpha=adapter_config.get("lora_alpha"))
    record = read_adapter_record(adapter_dir)
    found.update({k: record[k] for k in ("precision", "lora_r", "lora_alpha", "learning_rate", "n_train") if k in record})
    for key in ("precision", "lora_r", "lora_alpha", "learning_rate", "n_train"):
        if run_params and run_params.get(key) not in (None, ""):
            found[key] = run_params[key]
    return {
        "precision": found.get("precision"),
        "lora_r": _number(found.get("lora_r"), int),
        "lora_alpha": _number(found.get("lora_alpha"), int),
        "learning_rate": _number(found.get("learning_rate"), float),
        "n_train": _number(found.get("n_train"), int),
    }


# --------------------------------------------------------------------------- model and prompts


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    """`auto` -> float32 on CPU (fast everywhere; bf16 only with AVX512-BF16/AMX), bf16 on GPU."""
    import torch

    if name == "auto":
        name = "float32" if device == "cpu" else "bfloat16"
    return getattr(torch, name)


def load_base(model_dir: Path, dtype_name: str = "auto", device_name: str = "auto"):
    """(model, tokenizer) of the base model, in eval mode, tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device_name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype_name, device))
    return model.to(device).eval(), tokenizer


def _as_id_list(value) -> list[int]:
    """An eos_token_id field (None, int or list) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def template_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, if any."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARKER_ANSWER}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template without an assistant role; fall back to eos ids
        return None
    if MARKER_ANSWER not in rendered:
        return None
    after = rendered.split(MARKER_ANSWER, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return ids[0] if ids and ids[0] in special else None


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends an assistant answer: the template's end-of-turn token plus the
    eos ids of the generation config and tokenizer (Llama 3 lists several), deduplicated."""
    ids = []
    template_id = template_end_of_turn_id(tokenizer)
    if template_id is not None:
        ids.append(template_id)
    if generation_config is not None:
        ids += _as_id_list(generation_config.eos_token_id)
    ids += _as_id_list(tokenizer.eos_token_id)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise TonetuneError("cannot tell where an answer ends: the tokenizer has no chat template end-of-turn or eos token")
    return ids


def build_prompts(tokenizer, system_prompt: str, questions: Sequence[str]) -> list[str]:
    """Chat-formatted prompts (system + user turn + the assistant header) as text, built by the
    same `chat_messages` the train stage uses, so an adapter sees the prompt it was trained on."""
    from pipeline.core.system_prompts import chat_messages

    return [
        tokenizer.apply_chat_template(chat_messages(question, system_prompt), tokenize=False, add_generation_prompt=True)
        for question in questions
    ]


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    Similar lengths waste little compute on left padding; longest first makes the memory peak
    happen in the first batch, so an out-of-memory batch size fails at once, not at the end.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop id, and whether a stop id was found."""
    stops = set(stop_ids)
    for position, token_id in enumerate(token_ids):
        if token_id in stops:
            return list(token_ids[:position]), True
    return list(token_ids), False


def greedy_config(tokenizer, stop_ids: Sequence[int], max_new_tokens: int):
    """Greedy decoding that stops at any end-of-turn id; sampling knobs cleared so a model's
    own generation_config (temperature, top_p) cannot switch sampling on or warn."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
) -> GenerationResult:
    """Greedy answers to chat-formatted `prompts`, batched by length, returned in input order."""
    import torch

    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    generation_config = greedy_config(tokenizer, stop_ids, max_new_tokens)
    answers: list[str] = [""] * len(prompts)
    n_tokens = [0] * len(prompts)
    stopped = [False] * len(prompts)
    device = next(model.parameters()).device
    started = time.perf_counter()
    for batch in length_sorted_batches([len(ids) for ids in encoded], batch_size):
        # Left padding whatever the tokenizer's default: new tokens must follow the prompt directly.
        inputs = tokenizer.pad(
            {"input_ids": [encoded[i] for i in batch]}, padding=True, padding_side="left", return_tensors="pt"
        )
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=generation_config)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        for index, tokens in zip(batch, new_tokens, strict=True):
            kept, ended = cut_at_stop(tokens, stop_ids)
            answers[index] = tokenizer.decode(kept, skip_special_tokens=True).strip()
            n_tokens[index] = len(kept)
            stopped[index] = ended
    return GenerationResult(answers, n_tokens, stopped, time.perf_counter() - started)


class AdapterSwitcher:
    """Activates each model on one loaded base: the bare base, or one LoRA adapter at a time.

    The first adapter wraps the base in a PeftModel. To switch, the active adapter is deleted
    *before* the next one is loaded: PEFT refuses a second adapter next to one trained with
    biases (`lora_bias: lora_only`, the paper's setting), and such an adapter writes its biases
    into the base layers, which deleting it does not undo. So the base's bias tensors are copied
    once (they are small) and put back before each adapter loads and before the base answers.
    """

    def __init__(self, base_model):
        self.base_model = base_model
        self.peft_model = None
        self.active: str | None = None
        self._base_biases = [
            (parameter, parameter.detach().clone())
            for name, parameter in base_model.named_parameters() if name.endswith(".bias")
        ]

    @staticmethod
    def adapter_key(name: str) -> str:
        """PEFT keeps adapters in a ModuleDict, whose keys may not contain '.'."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", name)

    def restore_base_biases(self) -> None:
        """Put back the biases the base had before any adapter (a no-op for bias-free models)."""
        import torch

        with torch.no_grad():
            for parameter, original in self._base_biases:
                parameter.copy_(original)

    def unload_active(self) -> None:
        """Delete the active adapter and undo what it wrote into the base."""
        if self.peft_model is not None and self.active is not None:
            self.peft_model.delete_adapter(self.active)
            self.active = None
        self.restore_base_biases()

    def load(self, name: str, adapter_dir: Path):
        """Make `adapter_dir` the only loaded, active adapter; returns the model to generate with."""
        key = self.adapter_key(name)
        if key == self.active:
            return self.peft_model.eval()
        self.unload_active()
        if self.peft_model is None:
            from peft import PeftModel

            self.peft_model = PeftModel.from_pretrained(self.base_model, str(adapter_dir), adapter_name=key)
        else:
            self.peft_model.load_adapter(str(adapter_dir), adapter_name=key)
            self.peft_model.set_adapter(key)
        self.active = key
        return self.peft_model.eval()

    @contextmanager
    def activate(self, spec: ModelSpec) -> Iterator[Any]:
        """Context in which the returned model answers as `spec` (base or adapter)."""
        if spec.adapter_dir is not None:
            yield self.load(spec.name, spec.adapter_dir)
            return
        self.unload_active()  # no adapter left in the LoRA layers, base biases back: the bare base
        yield self.base_model.eval()


def answer_all(
    base_model, tokenizer, specs: Sequence[ModelSpec], questions: Sequence[str], config: EvaluateConfig
) -> Iterator[tuple[ModelSpec, GenerationResult]]:
    """Generate every model's answers on one base, one model at a time (yields as it goes)."""
    stop_ids = end_of_turn_ids(tokenizer, base_model.generation_config)
    switcher = AdapterSwitcher(base_model)
    for spec in specs:
        prompts = build_prompts(tokenizer, spec.system_prompt, questions)
        with switcher.activate(spec) as model:
            result = generate_answers(model, tokenizer, prompts, stop_ids, config.max_new_tokens, config.batch_size)
        yield spec, result


# --------------------------------------------------------------------------- scoring


# --------------------------------------------------------------------------- MLflow


def find_training_run(client, experiment_id: str, name: str, run_id: str | None = None):
    """The adapter's training run: `run_id` from its tonetune_adapter.json when this store has
    it, else the newest run named `name` (the train stage names runs after the adapter folder)."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.experiment_id == experiment_id:
                return run
        except MlflowException:
            pass  # recorded in another store (e.g. a copied adapter): fall back to the name
    escaped = name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.run_name = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def log_evaluation(
    spec: ModelSpec,
    run_id: str | None,
    record: dict[str, Any],
    predictions: pd.DataFrame,
    validation: pd.DataFrame,
    result: GenerationResult,
    config: Config,
) -> str:
    """Log metrics, settings (as tags: a re-evaluation may change them) and the predictions
    table on `run_id`, or on a new run `eval-<model>` when there is none; returns the run id."""
    import mlflow

    from pipeline.core.tracking import code_version_tags, log_dataset_input

    client = mlflow.MlflowClient()
    metrics = {
        f"{MLFLOW_METRIC_PREFIX}{key}": value
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("lora_r", "lora_alpha", "learning_rate", "n_train")
    }
    metrics[f"{MLFLOW_METRIC_PREFIX}tokens_per_s"] = result.tokens_per_second
    metrics[f"{MLFLOW_METRIC_PREFIX}seconds"] = result.seconds
    tags = {
        "eval.system_prompt": spec.system_prompt_name,
        "eval.max_new_tokens": str(config.evaluate.max_new_tokens),
        "eval.conversational_threshold": str(config.evaluate.conversational_threshold),
        "eval.embeddings_model": config.embeddings.model,
        "eval.n_eval": str(len(predictions)),
        **{f"eval.{key}": value for key, value in code_version_tags().items() if not key.startswith("mlflow.")},
    }
    run_name = None if run_id else f"eval-{spec.name}"
    with mlflow.start_run(run_id=run_id, run_name=run_name) as run:
        if run_name:
            mlflow.set_tags({"stage": "evaluate", "model": spec.name, "kind": spec.kind, **code_version_tags()})
        mlflow.set_tags(tags)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        log_dataset_input(validation, VAL_SPLIT_PATH, context="evaluation", name="val")
        mlflow.log_table(predictions, artifact_file=predictions_artifact_path(client, run.info.run_id))
        return run.info.run_id


# --------------------------------------------------------------------------- outputs


def clear_outputs(predictions_dir: Path = PREDICTIONS_DIR, metrics_dir: Path = EVAL_METRICS_DIR) -> None:
    """Remove the previous run's files so a deleted adapter leaves no stale metrics behind."""
    for path in [*predictions_dir.glob("*.parquet"), *metrics_dir.glob("*.json")]:
        path.unlink()


def base_precision(config: EvaluateConfig) -> str:
    """The dtype the base was evaluated in, in the grid's naming (fp32/bf16/fp16)."""
    device = resolve_device(config.device)
    dtype = str(resolve_dtype(config.dtype, device)).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


# --------------------------------------------------------------------------- wiring


def adapter_spec(path: Path, concise: str) -> ModelSpec:
    """An adapter, prompted with the system prompt its training recorded (the concise one)."""
    trained_with = read_adapter_record(path).get("system_prompt") or concise
    return ModelSpec(path.name, "lora", "concise" if trained_with == concise else "as-trained", trained_with, adapter_dir=path)


def model_specs(adapters: Sequence[Path], only: set[str] | None) -> list[ModelSpec]:
    """The base model first, then each adapter, filtered by `--models` if given."""
    verbose, concise = system_prompts()
    specs = [ModelSpec(BASE_NAME, "base", "verbose", verbose)]
    specs += [adapter_spec(path, concise) for path in adapters]
    if only:
        unknown = only - {spec.name for spec in specs}
        if unknown:
            raise TonetuneError(f"--models: no such model(s) {sorted(unknown)}; available: {[s.name for s in specs]}")
        specs = [spec for spec in specs if spec.name in only]
    return specs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate",
        description="Stage evaluate: answer the validation split with the base model (verbose prompt) and "
        f"every adapter in {ADAPTERS_DIR} (concise prompt); write {PREDICTIONS_DIR}/<model>.parquet and "
        f"{EVAL_METRICS_DIR}/<model>.json, log to MLflow (params: evaluate.*, embeddings.*).",
    )
    parser.add_argument("--models", help="comma-separated subset of models to evaluate (default: all)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions (overrides evaluate.limit)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--all-adapters", action="store_true",
                        help="also evaluate adapter folders that the current train.grid does not produce")
    return parser.parse_args(argv)


def describe(record: dict[str, Any], result: GenerationResult) -> str:
    """One progress line per model."""

    def number(key: str, digits: int) -> str:
        value = record.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    return (
        f"evaluate: {record['model']}: {number('pct_conversational', 1)}% conversational "
        f"[{number('pct_conversational_ci_low', 1)}, {number('pct_conversational_ci_high', 1)}], "
        f"Flesch {number('flesch_mean', 1)} (median {number('flesch_median', 1)}), "
        f"similarity {number('similarity_mean', 3)}, {number('answer_words_mean', 0)} words, "
        f"{number('stopped_pct', 0)}% ended their turn; {result.seconds:.0f} s, {result.tokens_per_second:.1f} tokens/s"
    )


@dataclass
class Evaluation:
    """What every model's scoring shares: the validation rows, their reference embeddings, the
    embedder, the MLflow client (None with --no-mlflow) and the base model's description."""

    config: Config
    validation: pd.DataFrame
    reference_vectors: np.ndarray
    embedder: Any
    family: str
    precision: str
    client: Any = None
    experiment_id: str | None = None

    def record(self, spec: ModelSpec, result: GenerationResult) -> dict[str, Any]:
        """Score one model's answers, write its predictions and metrics, log them; return the record."""
        from pipeline.core.evalmetrics import metrics_record, summarize_predictions

        settings = self.config.evaluate
        predictions = score_answers(self.validation, result, self.reference_vectors, self.embedder)
        summary = summarize_predictions(predictions, settings.conversational_threshold, settings.bootstrap_samples, settings.seed)
        training_run = None
        if self.client is not None and spec.adapter_dir is not None:
            recorded_run = read_adapter_record(spec.adapter_dir).get("mlflow_run_id")
            training_run = find_training_run(self.client, self.experiment_id, spec.name, recorded_run)
        if spec.adapter_dir is not None:
            spec.metadata = adapter_metadata(spec.adapter_dir, training_run.data.params if training_run else None)
        else:
            spec.metadata = {"precision": self.precision}
        record = metrics_record(
            spec.name, spec.kind, summary, family=self.family, system_prompt=spec.system_prompt_name, **spec.metadata
        )
        if self.client is not None:
            run_id = training_run.info.run_id if training_run else None
            record["mlflow_run_id"] = log_evaluation(spec, run_id, record, predictions, self.validation, result, self.config)
        write_predictions(predictions, spec.name)
        write_metrics(record, spec.name)
        return record


def prepare(config: Config, validation: pd.DataFrame, use_mlflow: bool) -> Evaluation:
    """Load the embedder, embed the references once, and connect to MLflow."""
    from pipeline.core.textmetrics import load_embedder

    client = experiment_id = None
    if use_mlflow:
        import mlflow

        from pipeline.core.tracking import configure_mlflow

        experiment_id = configure_mlflow(config.tracking)
        client = mlflow.MlflowClient()
    embedder = load_embedder(config.embeddings)
    references = embedder.encode(validation["answer"].astype(str).tolist())
    return Evaluation(config, validation, references, embedder, model_family(BASE_MODEL_DIR),
                      base_precision(config.evaluate), client, experiment_id)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    check_base_model(BASE_MODEL_DIR)
    validation = read_validation(VAL_SPLIT_PATH, args.limit or config.evaluate.limit)
    only = {name.strip() for name in args.models.split(",") if name.strip()} if args.models else None
    adapters, leftovers = select_adapters(
        discover_adapters(ADAPTERS_DIR), grid_adapter_names(config.train), args.all_adapters or bool(only)
    )
    if leftovers:
        print(f"evaluate: skipping {len(leftovers)} adapter(s) not in train.grid (--all-adapters to include): "
              + ", ".join(p.name for p in leftovers))
    specs = model_specs(adapters, only)
    evaluation = prepare(config, validation, use_mlflow=not args.no_mlflow)
    model, tokenizer = load_base(BASE_MODEL_DIR, config.evaluate.dtype, config.evaluate.device)
    if only is None:
        clear_outputs()
    questions = validation["question"].astype(str).tolist()
    print(f"evaluate: {len(questions)} questions x {len(specs)} model(s) on {evaluation.family} ({evaluation.precision})")
    for spec, result in answer_all(model, tokenizer, specs, questions, config.evaluate):
        print(describe(evaluation.record(spec, result), result))


if __name__ == "__main__":
    main()
