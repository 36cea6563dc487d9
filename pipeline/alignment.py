"""The optional `alignment` stage: the "alignment tax" of fine-tuning on a multiple-choice benchmark.

Seed 002 checks its fine-tunes on ARC-Challenge: does tuning for tone cost reasoning? Off by
default (`alignment.enabled: false`, it needs the Hugging Face hub): the stage then writes
reports/alignment/status.json {"status": "not_run"} and metrics/alignment/summary.yaml. On, it loads
`alignment.dataset` (default allenai/ai2_arc, config ARC-Challenge, split test, first `limit`
questions; a local folder works too) with `datasets` and scores the base model and every current
adapter (models/adapters, the folders `train.grid` names) by log-likelihood, as
lm-evaluation-harness does for ARC: context "Question: <q>\\nAnswer:", continuation " <choice>";
a choice's score is the sum of its tokens' log-probabilities given the context (`accuracy_sum`)
or their mean per token (`accuracy_mean`, which does not favour short choices); the predicted
choice is the best-scoring one (ties: the first). `alignment.score` says which one is the
headline `accuracy`. No chat template: the benchmark measures the model's knowledge, not its tone.

Every model is scored in float32 on one base load (adapters applied and removed in turn).
Writes metrics/alignment/<model>.json (numbers: n_questions, accuracy, accuracy_sum,
accuracy_mean, and for adapters `tax` = base accuracy - adapter accuracy, positive when
fine-tuning cost accuracy), reports/alignment/<model>.parquet (per question: the choices' scores,
the prediction, the answer) and reports/alignment/status.json; logs a run `alignment` in MLflow
(the metrics per model) and `alignment_*` metrics on each adapter's training run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import (
    ADAPTERS_DIR,
    ALIGNMENT_METRICS_DIR,
    BASE_MODEL_DIR,
    REPORTS_DIR,
    AlignmentConfig,
    Config,
    load_config,
)
from pipeline.core.contracts import ADAPTER_METADATA_FILE, Tags, grid_adapter_names
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import clear_model_outputs, write_json, write_metrics_summary
from pipeline.core.tables import write_table
from pipeline.core.tracking import code_version_tags, configure_mlflow

if TYPE_CHECKING:
    import pandas as pd

ALIGNMENT_REPORTS_DIR = REPORTS_DIR / "alignment"
STATUS_FILE = "status.json"
BASE_NAME = "base"


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: the correct choice is choices[answer]."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int


def context_text(question: str) -> str:
    return f"Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------------- data
def items_from_rows(rows, source: str) -> list[Item]:
    """ARC's schema: id, question, choices {text, label}, answerKey (a label: "A".."E" or "1".."5")."""
    items = []
    for index, row in enumerate(rows):
        try:
            labels, texts = list(row["choices"]["label"]), [str(text) for text in row["choices"]["text"]]
            answer = labels.index(row["answerKey"])
        except (KeyError, TypeError, ValueError):
            raise TonetuneError(f"{source}: row {index} is not an ARC-style item (id, question, choices "
                                "{text, label}, answerKey among the labels)") from None
        if len(texts) < 2:
            raise TonetuneError(f"{source}: row {index} has fewer than two choices")
        items.append(Item(str(row.get("id", index)), str(row["question"]), tuple(texts), answer))
    return items


def load_items(settings: AlignmentConfig) -> list[Item]:
    """The benchmark's first `limit` questions, via `datasets` (hub id or local folder)."""
    import datasets

    source = f"{settings.dataset} ({settings.dataset_config or 'default'}, {settings.split})"
    try:
        dataset = datasets.load_dataset(settings.dataset, settings.dataset_config, split=settings.split)
    except Exception as error:  # offline, unknown id, bad config/split: all one line for the user
        message = " ".join(str(error).split())[:300]
        raise TonetuneError(f"alignment.dataset {source}: cannot load it ({type(error).__name__}: {message}); "
                            "it needs the Hugging Face hub or a local copy") from None
    if settings.limit:
        dataset = dataset.select(range(min(settings.limit, len(dataset))))
    return items_from_rows(dataset, source)


# ----------------------------------------------------------------------------------- scoring
def choice_logprobs(model, tokenizer, items: list[Item], batch_size: int = 8) -> list[list[tuple[float, int]]]:
    """Per item, per choice: (sum of the continuation tokens' log-probs, number of tokens).

    Context and continuation are tokenized apart and concatenated (the harness's way: the
    boundary never merges into one token), right-padded; only continuation positions count."""
    import torch

    requests = []
    for item_index, item in enumerate(items):
        context = tokenizer(context_text(item.question), add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            context = [tokenizer.bos_token_id, *context]
        for choice_index, choice in enumerate(item.choices):
            continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            requests.append((item_index, choice_index, context, continuation))
    scores: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(item.choices) for item in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        sequences = [context + continuation for _, _, context, continuation in batch]
        width = max(len(sequence) for sequence in sequences)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (item_index, choice_index, context, continuation) in enumerate(batch):
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
            targets = torch.tensor(continuation)
            total = logprobs[row, positions.to(device), targets.to(device)].sum().item()
            scores[item_index][choice_index] = (total, len(continuation))
    return scores


def score_items(items: list[Item], logprobs: list[list[tuple[float, int]]]) -> tuple[pd.DataFrame, dict[str, float]]:
    """The per-question table and accuracy by summed and by per-token mean log-likelihood."""
    import pandas as pd

    rows = []
    for item, choices in zip(items, logprobs, strict=True):
        sums = [total for total, _ in choices]
        means = [total / max(count, 1) for total, count in choices]
        by_sum, by_mean = sums.index(max(sums)), means.index(max(means))
        rows.append({"id": item.id, "question": item.question, "choices": list(item.choices), "answer": item.answer,
                     "logprob_sum": sums, "logprob_mean": means, "predicted_sum": by_sum, "predicted_mean": by_mean,
                     "correct_sum": by_sum == item.answer, "correct_mean": by_mean == item.answer})
    frame = pd.DataFrame(rows)
    record = {"n_questions": len(frame), "accuracy_sum": float(frame["correct_sum"].mean()),
              "accuracy_mean": float(frame["correct_mean"].mean())}
    return frame, record


# ----------------------------------------------------------------------------------- models
def current_adapters(config: Config, adapters_dir: Path) -> list[Path]:
    """The adapter folders the current train.grid names (leftovers of an older grid skipped)."""
    names = grid_adapter_names(config.train)
    if not adapters_dir.is_dir():
        return []
    return sorted(path for path in adapters_dir.iterdir()
                  if path.name in names and (path / "adapter_config.json").is_file())


def score_models(config: Config, items: list[Item], base_dir: Path, adapters: list[Path]) -> dict[str, tuple[Any, dict]]:
    """{model: (table, record)} for the base and each adapter, on one float32 base load."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (base_dir / "config.json").is_file():
        raise TonetuneError(f"base model not found at {base_dir} (run `dvc repro base_model`)")
    settings = config.alignment
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    results = {BASE_NAME: score_items(items, choice_logprobs(model, tokenizer, items, settings.batch_size))}
    for adapter_dir in adapters:
        print(f"alignment: scoring {adapter_dir.name}", flush=True)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        peft_model = peft_model.float().eval()  # adapters saved in bf16 are computed in float32 like the base
        results[adapter_dir.name] = score_items(items, choice_logprobs(peft_model, tokenizer, items, settings.batch_size))
        model = peft_model.unload()
    headline = f"accuracy_{settings.score}"
    base_accuracy = results[BASE_NAME][1][headline]
    for name, (_, record) in results.items():
        record["accuracy"] = record[headline]
        if name != BASE_NAME:
            record["tax"] = base_accuracy - record["accuracy"]
    return results


# ----------------------------------------------------------------------------------- outputs
def log_to_mlflow(config: Config, results: dict[str, tuple[Any, dict]], adapters: list[Path]) -> str:
    """A run `alignment` (metrics `<model>.<key>`, per-question tables) + metrics on training runs."""
    import mlflow


    configure_mlflow(config.tracking)
    settings = config.alignment
    with mlflow.start_run(run_name="alignment", tags={Tags.STAGE: "alignment", **code_version_tags()}) as run:
        mlflow.log_params({"dataset": settings.dataset, "dataset_config": settings.dataset_config,
                           "split": settings.split, "limit": settings.limit, "score": settings.score})
        for name, (frame, record) in results.items():
            mlflow.log_metrics({f"{name}.{key}": float(value) for key, value in record.items()})
            mlflow.log_table(frame.astype({"choices": str, "logprob_sum": str, "logprob_mean": str}),
                             artifact_file=f"alignment/{name}.json")
    client = mlflow.MlflowClient()
    for adapter_dir in adapters:
        metadata_file = adapter_dir / ADAPTER_METADATA_FILE
        run_id = json.loads(metadata_file.read_text()).get("mlflow_run_id") if metadata_file.is_file() else None
        if not run_id:
            continue
        try:
            for key, value in results[adapter_dir.name][1].items():
                client.log_metric(run_id, f"alignment_{key}", float(value))
        except mlflow.exceptions.MlflowException as error:  # the training run lives in another store
            print(f"alignment: {adapter_dir.name}: training run {run_id} not updated ({error.message[:120]})")
    return run.info.run_id


def run_alignment(config: Config, base_dir: Path = BASE_MODEL_DIR, adapters_dir: Path = ADAPTERS_DIR,
                  metrics_dir: Path = ALIGNMENT_METRICS_DIR, reports_dir: Path = ALIGNMENT_REPORTS_DIR,
                  items: list[Item] | None = None, log_mlflow: bool = True) -> dict[str, dict]:
    settings = config.alignment
    adapters = current_adapters(config, adapters_dir)
    items = items if items is not None else load_items(settings)
    if not items:
        raise TonetuneError(f"alignment.dataset {settings.dataset}: no questions to score")
    print(f"alignment: {len(items)} questions of {settings.dataset}, base + {len(adapters)} adapter(s)", flush=True)
    results = score_models(config, items, base_dir, adapters)
    clear_model_outputs(metrics_dir, reports_dir)
    for name, (frame, record) in results.items():
        write_table(frame, reports_dir / f"{name}.parquet")
        write_json(metrics_dir / f"{name}.json", record)
    status = {"status": "scored", "dataset": settings.dataset, "dataset_config": settings.dataset_config,
              "split": settings.split, "n_questions": len(items), "score": settings.score, "models": sorted(results)}
    if log_mlflow:
        status["mlflow_run_id"] = log_to_mlflow(config, results, adapters)
    write_json(reports_dir / STATUS_FILE, status)
    for name, (_, record) in results.items():
        tax = f", tax {record['tax'] * 100:+.1f} points" if "tax" in record else ""
        print(f"alignment: {name}: accuracy {record['accuracy'] * 100:.1f}% ({settings.score}){tax}")
    return {name: record for name, (_, record) in results.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.alignment",
        description="Alignment tax: base vs every adapter on a multiple-choice benchmark scored by "
        "log-likelihood (ARC-Challenge by default). Params: section `alignment`.",
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parse_args(argv)
    config = load_config()
    if not config.alignment.enabled:
        clear_model_outputs(ALIGNMENT_METRICS_DIR, ALIGNMENT_REPORTS_DIR)
        write_metrics_summary(ALIGNMENT_METRICS_DIR, enabled=False)
        write_json(ALIGNMENT_REPORTS_DIR / STATUS_FILE, {"status": "not_run", "reason": "alignment.enabled is false"})
        print("alignment: not run (alignment.enabled is false; it needs the Hugging Face hub: "
              "`dvc exp run -S alignment.enabled=true`)")
        return
    run_alignment(config)
    write_metrics_summary(ALIGNMENT_METRICS_DIR, enabled=True)


if __name__ == "__main__":
    main()
