"""The optional `judge` stage: every evaluated model's validation answers scored by an LLM judge.

Off by default (`judge.enabled: false`): the stage then writes reports/judge/status.json
{"status": "not_run"} and metrics/judge/summary.yaml (enabled: false) in a second, like the OpenAI arm. On, it reads
reports/predictions/<model>.parquet of every evaluated model and asks any OpenAI-compatible
endpoint, through the project's client (pipeline.core.llmclient: durable cache, concurrency,
rate limits, retries, token counts for the cost):

- G-Eval (Liu et al. 2023, as Barnett et al. use it in "Fine-Tuning or Fine-Failing? Debunking
  Performance Myths in Large Language Models", Deakin University, 2024,
  https://arxiv.org/abs/2406.11201): accuracy and completeness on 1-5 with that paper's
  criteria, chain-of-thought form filling (evaluation steps in the prompt, the judge writes its
  reasoning then the score, as JSON). The reference answer of the validation pair is given as
  the evidence (Barnett et al. give the retrieved context). Each judgement is asked `judge.repeats`
  times (default 10) at `judge.temperature`, each repeat with its own seed (`seed + i`, so the
  cache keeps them apart and a re-run pays nothing); a model's score is the mean over questions
  of the per-answer mean, its spread the mean per-answer std over the repeats.
- Pairwise preference (as in the finetuning-llama-instruct repository by JoarP,
  https://github.com/joarp/finetuning-llama-instruct, judged by gpt-4.1-mini): each model vs
  `judge.baseline` on the same question, without the reference (that repository leaves it
  out), asked twice: baseline shown first, then the model shown first. Both orders agree ->
  win / tie / loss for the model; they disagree -> a position-inconsistent verdict (counted
  apart, never as a win). A reply that is not the asked
  JSON counts as invalid (never retried: the same request would hit the cache).

Writes metrics/judge/<model>.json (numbers only: what the report reads), reports/judge/<model>.parquet
(one row per question: every score, the reasoning, the verdicts) and reports/judge/status.json
(calls, cache hits, tokens, cost). MLflow: a run `judge` with, per model, a child run evaluated
with `mlflow.genai.evaluate` and custom scorers (accuracy, completeness, pairwise, plus the
stage-independent Flesch and similarity from the predictions), so the per-answer assessments
appear in MLflow's evaluation (Traces) view. The scorers only look up the judgements made
beforehand through our client: MLflow's own LLM judges would call the provider through LiteLLM,
outside our cache, retries, rate limits and cost accounting.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import JUDGE_METRICS_DIR, REPORTS_DIR, Config, JudgeConfig, load_config
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import clear_model_outputs, write_json, write_metrics_summary
from pipeline.core.llmclient import (
    Budget,
    ChatClient,
    OpenAIBackend,
    RequestSettings,
    StepKey,
    parse_json_object,
    raise_on_failed_replies,
)
from pipeline.core.predictions import PREDICTIONS_DIR
from pipeline.core.responsecache import ResponseCache
from pipeline.core.tables import read_table, write_table
from pipeline.core.tracking import code_version_tags, configure_mlflow, git_commit

if TYPE_CHECKING:
    import pandas as pd

JUDGE_REPORTS_DIR = REPORTS_DIR / "judge"
STATUS_FILE = "status.json"
# The paid replies, a DVC `persist` output. A folder holding the JSONL rather than the bare file:
# DVC warns "'...' is empty" for an empty file output (every demo run, the judge being off), not
# for a folder holding one. Caches written before that live at LEGACY_CACHE_PATH and are moved.
CACHE_PATH = Path("data/cache/judge/responses.jsonl")
LEGACY_CACHE_PATH = Path("data/cache/judge_responses.jsonl")
PROMPT_VERSION = "judge-v1"

# ----------------------------------------------------------------------------------- prompts
# Seed 003's criteria, word for word where it gives them, in G-Eval's form: task, criteria,
# evaluation steps, then the form to fill.
CRITERIA = {
    "accuracy": (
        "Accuracy (1-5): how well the answer addresses the question: its relevance, the sufficiency "
        "of its supporting evidence, and the absence of irrelevant or misleading information. "
        "1 means Poor Accuracy, 5 means Excellent Accuracy."
    ),
    "completeness": (
        "Completeness (1-5): the extent to which the answer covers the topics and details posed by the "
        "question. 1 means Incomplete or Irrelevant, 5 means Complete and Comprehensive."
    ),
}
STEPS = {
    "accuracy": (
        "1. Read the question and the reference answer, and note the facts the question asks for.\n"
        "2. Read the answer. Check each claim it makes against the reference: is it supported, "
        "unsupported, or contradicted?\n"
        "3. Note anything irrelevant or misleading.\n"
        "4. Assign an accuracy score from 1 to 5."
    ),
    "completeness": (
        "1. Read the question and list the topics and details it asks about.\n"
        "2. Read the reference answer to see what a complete answer covers.\n"
        "3. Read the answer and check which of those topics and details it covers.\n"
        "4. Assign a completeness score from 1 to 5."
    ),
}
GEVAL_SYSTEM = "You are a careful evaluator of answers to questions. You reply with one JSON object only."
GEVAL_TEMPLATE = """You will be given a question, a reference answer written from the source text, and an answer to evaluate.

Your task is to rate the answer on one metric. Read these instructions carefully and refer back to them as needed.

Evaluation criteria:
{criteria}

Evaluation steps:
{steps}

Question:
{question}

Reference answer:
{reference}

Answer to evaluate:
{answer}

Evaluation form: reply with a JSON object {{"steps": "<your reasoning, following the evaluation steps>", "score": <an integer from 1 to 5>}}."""

PAIRWISE_SYSTEM = "You are an impartial judge of answers to questions. You reply with one JSON object only."
PAIRWISE_TEMPLATE = """Compare two answers to the user's question below and decide which one answers it better: more helpful, correct and clear for the person asking.
Do not let the order in which the answers are presented, or their length, influence your decision.

Question:
{question}

[Answer A]
{first}

[Answer B]
{second}

Reply with a JSON object {{"reasoning": "<a short comparison>", "winner": "A" | "B" | "tie"}}."""

METRICS = ("accuracy", "completeness")
ORDERS = ("baseline_first", "model_first")


def geval_messages(metric: str, question: str, reference: str, answer: str) -> list[dict[str, str]]:
    content = GEVAL_TEMPLATE.format(criteria=CRITERIA[metric], steps=STEPS[metric], question=question,
                                    reference=reference, answer=answer or "(no answer)")
    return [{"role": "system", "content": GEVAL_SYSTEM}, {"role": "user", "content": content}]


def pairwise_messages(question: str, first: str, second: str) -> list[dict[str, str]]:
    content = PAIRWISE_TEMPLATE.format(question=question, first=first or "(no answer)", second=second or "(no answer)")
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": content}]


# ----------------------------------------------------------------------------------- parsing
def parse_score(text: str) -> tuple[int | None, str]:
    """(score 1-5 or None when the reply is not the asked form, reasoning)."""
    value = parse_json_object(text)
    if value is None:
        return None, ""
    score = value.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        return None, str(value.get("steps") or "")
    return score, str(value.get("steps") or "")


def parse_winner(text: str) -> str | None:
    """"A", "B", "tie", or None for anything else."""
    value = parse_json_object(text)
    winner = str((value or {}).get("winner") or "").strip().strip('"').lower()
    return {"a": "A", "b": "B", "tie": "tie", "draw": "tie"}.get(winner)


def verdict_for_model(winner: str | None, order: str) -> str:
    """The verdict of one order from the model's side: model / baseline / tie / invalid."""
    if winner is None:
        return "invalid"
    if winner == "tie":
        return "tie"
    model_slot = "B" if order == "baseline_first" else "A"
    return "model" if winner == model_slot else "baseline"


def combine(first: str, second: str) -> str:
    """Both orders -> win / loss / tie when they agree, inconsistent when not, invalid if either is."""
    if "invalid" in (first, second):
        return "invalid"
    if first != second:
        return "inconsistent"
    return {"model": "win", "baseline": "loss", "tie": "tie"}[first]


# ----------------------------------------------------------------------------------- inputs
@dataclass
class ModelAnswers:
    name: str
    frame: pd.DataFrame  # question, reference, answer (+ flesch, similarity when present)


def read_models(folder: Path, limit: int | None) -> list[ModelAnswers]:
    """Every reports/predictions/<model>.parquet, first `limit` rows, sorted by name."""
    paths = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not paths:
        raise TonetuneError(f"{folder}: no predictions to judge (run `dvc repro predict` first)")
    models = []
    for path in paths:
        frame = read_table(path, ("question", "reference", "answer"), "a predictions table written by predict")
        frame = (frame.head(limit) if limit else frame).reset_index(drop=True)
        frame["answer"] = frame["answer"].fillna("").astype(str)
        models.append(ModelAnswers(path.stem, frame))
    return models


def check_aligned(models: list[ModelAnswers], baseline: str) -> ModelAnswers:
    """The baseline's answers; every model must have answered the same questions in the same order."""
    by_name = {model.name: model for model in models}
    if baseline not in by_name:
        raise TonetuneError(f"judge.baseline = {baseline!r}: no {PREDICTIONS_DIR}/{baseline}.parquet "
                            f"(models found: {', '.join(sorted(by_name))})")
    questions = by_name[baseline].frame["question"].tolist()
    for model in models:
        if model.frame["question"].tolist() != questions:
            raise TonetuneError(f"{PREDICTIONS_DIR}/{model.name}.parquet: not the same questions as "
                                f"{baseline}.parquet (re-run `dvc repro predict`)")
    return by_name[baseline]


# ----------------------------------------------------------------------------------- asking
@dataclass
class Tally:
    """Tokens of the replies a model's judgements used (cached or paid), for its cost."""

    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class JudgeRun:
    """Everything asked, by key: ("geval", model, metric, row, repeat) / ("pair", model, order, row)."""

    replies: dict[tuple, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    tallies: dict[str, Tally] = field(default_factory=dict)


CLIENT_SECTION = "judge.client"


def api_key(settings: JudgeConfig) -> str:
    key_env = settings.client.api_key_env
    key = os.environ.get(key_env, "").strip()
    if not key:
        raise TonetuneError(f"environment variable {key_env} is not set ({CLIENT_SECTION}.api_key_env): "
                            "export the judge endpoint's key; nothing was sent")
    return key


def plan_requests(models: list[ModelAnswers], baseline: ModelAnswers, settings: JudgeConfig):
    """{phase: [(key, messages)]}: one phase per G-Eval repeat (its own seed), one for pairwise."""
    phases: dict[tuple[str, int], list[tuple[tuple, list]]] = {}
    for repeat in range(settings.repeats):
        requests = []
        for model in models:
            for row in model.frame.itertuples(index=True):
                for metric in METRICS:
                    requests.append((("geval", model.name, metric, row.Index, repeat),
                                     geval_messages(metric, row.question, row.reference, row.answer)))
        phases[("geval", settings.seed + repeat)] = requests
    pairs = []
    for model in models:
        if model.name == baseline.name:
            continue
        for index, (question, mine, theirs) in enumerate(zip(model.frame["question"], model.frame["answer"],
                                                             baseline.frame["answer"], strict=True)):
            pairs.append((("pair", model.name, "baseline_first", index), pairwise_messages(question, theirs, mine)))
            pairs.append((("pair", model.name, "model_first", index), pairwise_messages(question, mine, theirs)))
    if pairs:
        phases[("pair", settings.seed)] = pairs
    return phases


def ask(phases, settings: JudgeConfig, key: str, cache_path: Path = CACHE_PATH, budget: Budget | None = None) -> JudgeRun:
    """Send every request through ChatClient (one client per phase: its seed and temperature),
    sharing one backend, one durable cache and one budget (`judge.client.max_cost_usd` covers the
    whole run). A request that fails after its retries, or that the cap refuses, fails the stage
    in one line; what was answered is cached, so a re-run pays only for the rest."""

    client_config = settings.client
    budget = budget if budget is not None else Budget.for_model(client_config, settings.model, CLIENT_SECTION)
    result = JudgeRun()

    async def run() -> None:
        backend = OpenAIBackend(client_config.base_url, key, client_config.concurrency, client_config.request_timeout_s)
        try:
            for (kind, seed), requests in phases.items():
                temperature = settings.temperature if kind == "geval" else settings.pairwise_temperature
                request = RequestSettings(settings.model, temperature, settings.max_tokens, seed,
                                          client_config.request_timeout_s)
                client = ChatClient(backend, cache, request, client_config, budget=budget)
                replies = await asyncio.gather(*(
                    client.complete(messages, StepKey(key_[1], kind, 0)) for key_, messages in requests
                ), return_exceptions=True)
                for name, value in client.stats.as_dict().items():
                    result.stats[name] = result.stats.get(name, 0) + value
                raise_on_failed_replies(replies, "judge", settings.model)
                for (key_, _), reply in zip(requests, replies, strict=True):
                    result.replies[key_] = reply
                    tally = result.tallies.setdefault(key_[1], Tally())
                    tally.input_tokens += reply.input_tokens
                    tally.output_tokens += reply.output_tokens
        finally:
            await backend.aclose()

    cache = ResponseCache(cache_path)
    try:
        asyncio.run(run())
    finally:
        cache.close()
    return result


# ----------------------------------------------------------------------------------- scoring
def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: list[float]) -> float:
    """Population std (the spread of the repeats actually made); NaN without values."""
    if not values:
        return float("nan")
    mean = _mean(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


def score_model(model: ModelAnswers, baseline: ModelAnswers, run: JudgeRun,
                settings: JudgeConfig) -> tuple[pd.DataFrame, dict[str, float]]:
    """The per-question table and the numbers-only metrics record of one model."""
    import pandas as pd

    frame = model.frame[["question", "reference", "answer"]].copy()
    if "id" in model.frame.columns:
        frame.insert(0, "id", model.frame["id"].astype(str))
    record: dict[str, float] = {"n_questions": len(frame), "repeats": settings.repeats}
    for metric in METRICS:
        scores, means, stds, reasons, invalid = [], [], [], [], 0
        for index in range(len(frame)):
            parsed = [parse_score(run.replies[("geval", model.name, metric, index, repeat)].content)
                      for repeat in range(settings.repeats)]
            valid = [score for score, _ in parsed if score is not None]
            invalid += len(parsed) - len(valid)
            scores.append(valid)
            means.append(_mean(valid))
            stds.append(_std(valid))
            reasons.append(next((reason for score, reason in parsed if score is not None), ""))
        frame[f"{metric}_scores"] = scores
        frame[f"{metric}_mean"] = means
        frame[f"{metric}_std"] = stds
        frame[f"{metric}_reasoning"] = reasons
        judged = [value for value in means if not math.isnan(value)]
        record[f"{metric}_mean"] = _mean(judged)
        record[f"{metric}_repeat_std"] = _mean([value for value in stds if not math.isnan(value)])
        record[f"{metric}_question_std"] = _std(judged)
        record[f"{metric}_invalid"] = invalid
    if model.name != baseline.name:
        verdicts = {order: [verdict_for_model(parse_winner(run.replies[("pair", model.name, order, index)].content), order)
                            for index in range(len(frame))] for order in ORDERS}
        frame["pairwise_baseline_first"] = verdicts["baseline_first"]
        frame["pairwise_model_first"] = verdicts["model_first"]
        frame["pairwise"] = [combine(a, b) for a, b in zip(verdicts["baseline_first"], verdicts["model_first"], strict=True)]
        counts = frame["pairwise"].value_counts()
        for outcome, key in (("win", "wins"), ("tie", "ties"), ("loss", "losses"),
                             ("inconsistent", "inconsistent"), ("invalid", "invalid")):
            record[f"pairwise_{key}"] = int(counts.get(outcome, 0))
        decided = len(frame) - record["pairwise_invalid"]
        record["pairwise_win_rate"] = record["pairwise_wins"] / decided if decided else float("nan")
        # position bias: how often the answer shown first won, over every valid single verdict
        first_wins = sum(v == "baseline" for v in verdicts["baseline_first"]) + sum(v == "model" for v in verdicts["model_first"])
        singles = sum(v != "invalid" for order in ORDERS for v in verdicts[order])
        record["pairwise_first_position_rate"] = first_wins / singles if singles else float("nan")
    tally = run.tallies.get(model.name, Tally())
    record["judge_input_tokens"] = tally.input_tokens
    record["judge_output_tokens"] = tally.output_tokens
    cost = settings.client.cost_usd(settings.model, tally.input_tokens, tally.output_tokens)
    if cost is not None:
        record["judge_cost_usd"] = cost
    return pd.DataFrame(frame), record


# ----------------------------------------------------------------------------------- MLflow
def build_scorers(frame: pd.DataFrame, predictions: pd.DataFrame) -> list:
    """mlflow.genai scorers that look up one model's judgements (row = the question's index)."""
    from mlflow.entities import Feedback
    from mlflow.genai.scorers import scorer

    rows = {str(index): row for index, row in frame.iterrows()}

    def feedback(metric: str, inputs: dict) -> Feedback:
        row = rows[inputs["row"]]
        scores = list(row[f"{metric}_scores"])
        return Feedback(value=None if math.isnan(row[f"{metric}_mean"]) else float(row[f"{metric}_mean"]),
                        rationale=f"mean of {len(scores)} judgements {scores} (std {row[f'{metric}_std']:.2f}); "
                                  f"{row[f'{metric}_reasoning']}")

    @scorer(name="accuracy")
    def accuracy(inputs) -> Feedback:
        return feedback("accuracy", inputs)

    @scorer(name="completeness")
    def completeness(inputs) -> Feedback:
        return feedback("completeness", inputs)

    @scorer(name="pairwise_vs_baseline")
    def pairwise(inputs) -> Feedback:
        row = rows[inputs["row"]]
        return Feedback(value=str(row["pairwise"]), rationale=f"baseline shown first: {row['pairwise_baseline_first']}; "
                                                              f"model shown first: {row['pairwise_model_first']}")

    @scorer(name="flesch")
    def flesch(inputs) -> float | None:
        value = predictions.loc[int(inputs["row"]), "flesch"] if "flesch" in predictions else None
        return None if value is None or math.isnan(value) else float(value)

    @scorer(name="similarity")
    def similarity(inputs) -> float | None:
        value = predictions.loc[int(inputs["row"]), "similarity"] if "similarity" in predictions else None
        return None if value is None or math.isnan(value) else float(value)

    return [accuracy, completeness, flesch, similarity] + ([pairwise] if "pairwise" in frame else [])


def log_to_mlflow(config: Config, scored: dict[str, tuple[pd.DataFrame, dict]], models: dict[str, ModelAnswers],
                  stage_record: dict[str, Any]) -> str:
    """A run `judge` with one child per model evaluated by mlflow.genai.evaluate; its run id."""
    import mlflow
    import pandas as pd


    configure_mlflow(config.tracking)
    settings = config.judge
    with mlflow.start_run(run_name="judge", tags={Tags.STAGE: "judge", **code_version_tags()}) as parent:
        mlflow.log_params({"judge_model": settings.model, "baseline": settings.baseline, "repeats": settings.repeats,
                           "temperature": settings.temperature, "pairwise_temperature": settings.pairwise_temperature,
                           "limit": settings.limit, "prompt_version": PROMPT_VERSION, "seed": settings.seed})
        mlflow.log_metrics({key: float(value) for key, value in stage_record.items() if isinstance(value, (int, float))})
        for name, (frame, record) in scored.items():
            scorers = build_scorers(frame, models[name].frame)
            data = pd.DataFrame({
                "inputs": [{"question": q, "row": str(i)} for i, q in enumerate(frame["question"])],
                "outputs": frame["answer"].tolist(),
                "expectations": [{"expected_response": r} for r in frame["reference"]],
            })
            with mlflow.start_run(run_name=f"judge-{name}", nested=True,
                                  tags={Tags.STAGE: "judge", "model": name, Tags.GIT_COMMIT: git_commit() or ""}):
                mlflow.genai.evaluate(data=data, scorers=scorers)
                mlflow.log_metrics({f"judge_{key}": float(value) for key, value in record.items()
                                    if not (isinstance(value, float) and math.isnan(value))})
        return parent.info.run_id


# ----------------------------------------------------------------------------------- stage
def run_judge(config: Config, predictions_dir: Path = PREDICTIONS_DIR, metrics_dir: Path = JUDGE_METRICS_DIR,
              reports_dir: Path = JUDGE_REPORTS_DIR, cache_path: Path = CACHE_PATH, log_mlflow: bool = True) -> dict[str, Any]:
    """Judge every model; write metrics/judge/<model>.json, reports/judge/<model>.parquet, status."""
    settings = config.judge
    budget = Budget.for_model(settings.client, settings.model, CLIENT_SECTION)  # unpriced: one line, nothing sent
    key = api_key(settings)  # before anything is read or sent
    models = read_models(predictions_dir, settings.limit)
    baseline = check_aligned(models, settings.baseline)
    phases = plan_requests(models, baseline, settings)
    n_requests = sum(len(requests) for requests in phases.values())
    print(f"judge: {len(models)} model(s) x {len(baseline.frame)} question(s): {n_requests} judgements "
          f"({settings.repeats} G-Eval repeats x 2 metrics, 2 pairwise orders) by {settings.model}", flush=True)
    started = time.perf_counter()
    run = ask(phases, settings, key, cache_path, budget)
    scored = {model.name: score_model(model, baseline, run, settings) for model in models}
    clear_model_outputs(metrics_dir, reports_dir)
    for name, (frame, record) in scored.items():
        write_table(frame, reports_dir / f"{name}.parquet")
        write_json(metrics_dir / f"{name}.json", record, nan_as_null=True)
    paid = budget.paid_usd if budget.priced else None
    stage = {
        "status": "judged", "judge_model": settings.model, "models": sorted(scored), "requests": n_requests,
        **{key_: run.stats.get(key_, 0) for key_ in ("api_calls", "cache_hits", "retries", "requests_failed",
                                                     "input_tokens", "output_tokens")},
        "cost_usd": paid, "seconds": round(time.perf_counter() - started, 3),
    }
    if log_mlflow:
        stage["mlflow_run_id"] = log_to_mlflow(config, scored, {m.name: m for m in models},
                                               {k: v for k, v in stage.items() if k not in ("models",)})
    write_json(reports_dir / STATUS_FILE, stage, nan_as_null=True)
    for name, (_, record) in scored.items():
        line = ", ".join(f"{metric} {record[f'{metric}_mean']:.2f} (+/- {record[f'{metric}_repeat_std']:.2f})"
                         for metric in METRICS)
        if "pairwise_wins" in record:
            line += (f"; vs {baseline.name}: {record['pairwise_wins']} wins, {record['pairwise_ties']} ties, "
                     f"{record['pairwise_losses']} losses, {record['pairwise_inconsistent']} position-inconsistent")
        print(f"judge: {name}: {line}")
    cost_text = "n/a (no price for the model)" if paid is None else f"${paid:.4f}"
    print(f"judge: {stage['api_calls']} API calls, {stage['cache_hits']} cached, cost {cost_text}")
    return stage


def write_not_run(metrics_dir: Path = JUDGE_METRICS_DIR, reports_dir: Path = JUDGE_REPORTS_DIR,
                  cache_path: Path = CACHE_PATH) -> None:
    """Empty metrics (no stale judge columns), a status, and the cache file DVC expects."""
    clear_model_outputs(metrics_dir, reports_dir)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.touch()
    write_json(reports_dir / STATUS_FILE, {"status": "not_run", "reason": "judge.enabled is false"})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.judge",
        description="Score every evaluated model's answers with an LLM judge (G-Eval accuracy and "
        "completeness, repeated; pairwise vs the baseline in both orders). Params: section `judge`.",
    )
    parser.add_argument("--predictions", type=Path, default=PREDICTIONS_DIR, help="folder of <model>.parquet")
    return parser.parse_args(argv)


def adopt_legacy_cache(legacy: Path = LEGACY_CACHE_PATH, cache_path: Path = CACHE_PATH) -> bool:
    """Move replies cached at the old path into the cache folder (paid work is never dropped).

    Only when the folder holds no replies yet; returns whether anything was moved."""
    if not legacy.is_file() or legacy.stat().st_size == 0:
        return False
    if cache_path.is_file() and cache_path.stat().st_size > 0:
        return False
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(legacy, cache_path)
    print(f"judge: moved the cached replies from {legacy} to {cache_path}")
    return True


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    adopt_legacy_cache()
    if not config.judge.enabled:
        write_not_run()
        write_metrics_summary(JUDGE_METRICS_DIR, enabled=False)
        print("judge: not run (judge.enabled is false; enable with `dvc exp run -S judge.enabled=true` and "
              f"export {config.judge.client.api_key_env})")
        return
    run_judge(config, predictions_dir=args.predictions)
    write_metrics_summary(JUDGE_METRICS_DIR, enabled=True)


if __name__ == "__main__":
    main()
