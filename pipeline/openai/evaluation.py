"""Evaluation of an OpenAI model (base or fine-tuned) on the validation split, scored like the
LoRA adapters.

Owns: answering every validation question through chat completions (pipeline.core.llmclient:
concurrency, rate limits, retries, the durable response cache `data/openai/responses.jsonl`),
scoring with pipeline.core.predictions / evalmetrics, writing predictions.parquet and
metrics.json, and logging them to the active MLflow run (a re-run keeps the first run's
cost/call metrics). Does not own: fine-tuning, the job ledger's contents beyond the re-paid note.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import Config
from pipeline.core.contracts import openai_family
from pipeline.core.evalmetrics import metrics_record, summarize_predictions
from pipeline.core.io import write_json
from pipeline.core.llmclient import (
    Budget,
    ChatClient,
    OpenAIBackend,
    RequestSettings,
    StepKey,
    raise_on_failed_replies,
)
from pipeline.core.predictions import (
    MLFLOW_METRIC_PREFIX,
    GenerationResult,
    predictions_artifact_path,
    score_answers,
    write_predictions,
)
from pipeline.core.prompts import system_prompts, tone_prompts
from pipeline.core.responsecache import ResponseCache
from pipeline.core.system_prompts import chat_messages
from pipeline.core.textmetrics import load_embedder
from pipeline.core.tone import on_style, style_key, style_label, tone_tags
from pipeline.core.tracking import log_dataset_input, log_prompts
from pipeline.openai.api import FineTuningAPI
from pipeline.openai.ledger import JobLedger
from pipeline.openai.spec import CACHE_PATH, CLIENT_SECTION
from pipeline.openai.tracking import first_or_rerun_keys, is_number

if TYPE_CHECKING:
    import pandas as pd


def ask_all(model: str, system_prompt: str, questions: list[str], config: Config, api_key: str, endpoint: str,
            cache_path: Path = CACHE_PATH):
    """(GenerationResult, call stats): every question answered by `model` through the generator's
    client (cache, concurrency, rate limits, retries). A question still unanswered after its
    retries fails the stage in one line; the answers received are cached, so a re-run pays only
    for the rest. `stopped` is finish_reason == "stop" (not cut off at max_tokens)."""

    settings = config.openai
    client_config = settings.client
    # Unpriced (an ft: name is priced as its base) -> one line, nothing sent; the evaluation's
    # own cap (openai.client.max_cost_usd) is reserved before every attempt.
    budget = Budget.for_model(client_config, model, CLIENT_SECTION)
    request = RequestSettings(model, settings.eval_temperature, config.evaluate.max_new_tokens, settings.seed,
                              client_config.request_timeout_s)

    async def run() -> tuple[list, dict[str, int]]:
        backend = OpenAIBackend(endpoint, api_key, client_config.concurrency, client_config.request_timeout_s)
        client = ChatClient(backend, cache, request, client_config, budget=budget)
        try:
            replies = await asyncio.gather(*(
                client.complete(chat_messages(question, system_prompt), StepKey(f"val{index:06d}", "evaluate", 0))
                for index, question in enumerate(questions)
            ), return_exceptions=True)
        finally:
            await client.aclose()
        stats = client.stats.as_dict()
        stats["repaid_keys"] = [f"{step.source_id}/{step.step}" for step in client.repaid_steps]
        if budget.priced:
            stats["cost_usd"] = budget.paid_usd
        return replies, stats

    cache = ResponseCache(cache_path)
    if damage := cache.damage_report():
        print(f"openai: {damage}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        replies, stats = asyncio.run(run())
    finally:
        cache.close()
    raise_on_failed_replies(replies, "evaluation", model)
    result = GenerationResult(
        answers=[reply.content.strip() for reply in replies],
        n_tokens=[reply.output_tokens for reply in replies],
        stopped=[reply.finish_reason in (None, "stop") for reply in replies],
        seconds=time.perf_counter() - started,
    )
    return result, stats


def score(name: str, kind: str, base_model: str, answers, validation: pd.DataFrame, config: Config,
          extra: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame]:
    """The predictions table and metrics record, computed exactly as for the LoRA adapters."""

    embedder = load_embedder(config.embeddings)
    references = embedder.encode(validation["answer"].astype(str).tolist())
    criteria = on_style(config.tone, config.judge)
    predictions = score_answers(validation, answers, references, embedder, criteria)
    settings = config.evaluate
    summary = summarize_predictions(predictions, criteria, settings.bootstrap_samples, settings.seed,
                                    style_key=style_key(config.tone))
    record = metrics_record(name, kind, summary, family=openai_family(base_model), base_model=base_model, **extra)
    return record, predictions


def evaluate_model(name: str, kind: str, base_model: str, model_id: str, prompt_name: str, validation: pd.DataFrame,
                   val_path: Path, config: Config, api: FineTuningAPI, ledger: JobLedger, out_dir: Path,
                   extra: dict[str, Any]) -> dict[str, Any]:
    """Answer, score, write predictions.parquet + metrics.json, and log both to the active run.

    Quality metrics (`eval_pct_conversational`, ...) describe the predictions on disk and are
    logged every time. Cost/call metrics (`eval_api_calls`, `eval_cache_hits`, `eval_retries`,
    tokens, `eval_repaid`, `eval_cost_usd`, `eval_seconds`) are the first run's: a re-run logs
    its own as `rerun_eval_*` (tracking.first_or_rerun_keys)."""
    import mlflow

    questions = validation["question"].astype(str).tolist()
    print(f"openai: evaluating {model_id} ({prompt_name} prompt) on {len(questions)} validation questions", flush=True)
    texts = system_prompts(config.tone)
    answers, stats = ask_all(model_id, texts.system_prompt(prompt_name), questions, config, api.api_key, api.endpoint)
    repaid = stats.pop("repaid_keys")
    if repaid:
        ledger.append({"kind": "eval_repaid", "endpoint": api.endpoint, "model": model_id, "requests": repaid})
        print(f"openai: {len(repaid)} evaluation request(s) in flight when an earlier run died were sent (and paid) "
              f"again (recorded in {ledger.path})", file=sys.stderr, flush=True)
    record, predictions = score(name, kind, base_model, answers, validation, config,
                                {"system_prompt": prompt_name, "evaluated_model": model_id, **extra})
    write_predictions(predictions, "predictions", folder=out_dir)
    write_json(out_dir / "metrics.json", record)
    metrics = {f"{MLFLOW_METRIC_PREFIX}{key}": float(value) for key, value in record.items()
               if is_number(value) and key not in ("n_train", "trained_tokens")}
    mlflow.log_metrics(metrics)
    calls = {f"{MLFLOW_METRIC_PREFIX}{key}": float(value) for key, value in stats.items()
             if key in ("api_calls", "cache_hits", "retries", "input_tokens", "output_tokens", "repaid")}
    calls[f"{MLFLOW_METRIC_PREFIX}seconds"] = answers.seconds
    if "cost_usd" in stats:  # this run's paid replies at the model's price (ft: priced as its base)
        calls[f"{MLFLOW_METRIC_PREFIX}cost_usd"] = stats["cost_usd"]
    run_id = mlflow.active_run().info.run_id
    calls, step = first_or_rerun_keys(run_id, calls)
    mlflow.log_metrics(calls, step=step)
    log_prompts(tone_prompts(config.tone, (f"system_{prompt_name}",)), config.tone.name)
    mlflow.set_tags({"eval.system_prompt": prompt_name, "eval.model": model_id,
                     "eval.max_new_tokens": str(config.evaluate.max_new_tokens),
                     "eval.temperature": str(config.openai.eval_temperature),
                     **tone_tags(config.tone, "eval.", "eval.conversational_threshold"),
                     "eval.embeddings_model": config.embeddings.model, "eval.n_eval": str(len(predictions))})
    log_dataset_input(validation, val_path, context="evaluation", name="val")
    mlflow.log_table(predictions, artifact_file=predictions_artifact_path(mlflow.MlflowClient(), run_id))
    def number(key: str, digits: int) -> str:
        return f"{record[key]:.{digits}f}" if is_number(record.get(key)) else "n/a"

    key = style_key(config.tone)
    print(f"openai: {name}: {number(key, 1)}{style_label(config.tone)} "
          f"[{number(key + '_ci_low', 1)}, {number(key + '_ci_high', 1)}], "
          f"Flesch {number('flesch_mean', 1)}, similarity {number('similarity_mean', 3)}, "
          f"{stats['api_calls']} API calls, {stats['cache_hits']} cached", flush=True)
    return record
