"""Stage `score`: metrics of every model from the saved predictions (no model is loaded).

    python -m pipeline.score [--no-mlflow]

Reads reports/predictions/<model>.parquet + .json (the predict stage) and, per model:

- scores each answer (pipeline.core.predictions.score_answers: the tone's style metrics, cosine
  similarity to the reference answer under the `embeddings` model) and its repetition (share of
  repeated word 4-grams, pipeline.core.textmetrics.repeated_ngram_rate);
- summarises (pipeline.core.evalmetrics.summarize_predictions, the same code as the OpenAI arm):
  % on-style (`pct_<tone.name>`) with a bootstrap interval, the style metrics, similarity, length, and degeneration:
  `stopped_pct` (% of answers that ended their turn) and `repetition_rate`;
- the decoding ablation, when predict ran it: the same summary under plain greedy and under the
  policy, on the same first `evaluate.ablation_limit` questions (keys `ablation_*`);
- writes reports/scores/<model>.parquet (the scored table) and metrics/eval/<model>.json: one flat
  record of scalars (no lists, no nulls: an unknown value is left out), what `dvc metrics show`,
  the report and the promotion read;
- logs to MLflow without re-opening any run (MlflowClient.log_batch / log_table on a run id), so a
  run's start and end times stay what they were: an adapter's metrics (prefixed `eval_`), tags
  (`eval.precision`, `eval.decoding`, ...) and predictions table go on its training run; the base
  model (or an adapter without a training run) gets an `eval-<model>` run whose start and end
  times are those of its inference in the predict stage.

Changing the tone's `on_style` criteria, `bootstrap_samples` or `embeddings` re-runs only this stage.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.adapterinfo import merge_metadata
from pipeline.core.config import VAL_SPLIT_PATH, Config, ToneConfig, load_config
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.evalmetrics import metrics_record, summarize_predictions
from pipeline.core.modeling import DecodingPolicy
from pipeline.core.predictions import (
    EVAL_METRICS_DIR,
    MLFLOW_METRIC_PREFIX,
    PREDICTIONS_DIR,
    SCORES_DIR,
    GenerationResult,
    content_similarity,
    predictions_artifact_path,
    score_answers,
    write_metrics,
)
from pipeline.core.tables import read_table, write_table
from pipeline.core.textmetrics import load_embedder, repeated_ngram_rate
from pipeline.core.tone import on_style, style_key, style_label, tone_tags
from pipeline.core.tracking import code_version_tags, configure_mlflow, find_run, log_dataset_input_to

if TYPE_CHECKING:
    import pandas as pd

ABLATION_DIRNAME = "ablation"
REPETITION_N = 4
ABLATION_KEYS = ("similarity_mean", "stopped_pct", "repetition_rate")  # after the tone's pct_<name>
PREDICTION_COLUMNS = ("question", "reference", "answer", "n_tokens", "stopped")
OPTIONAL_COLUMNS = ("id", "factual")
RUN_NAME_PREFIX = "eval-"


@dataclass
class Scorer:
    """The embedder and the reference vectors (embedded once per distinct reference list)."""

    config: Config
    embedder: Any
    _references: dict[tuple[str, ...], Any]

    def score(self, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
        """(scored table, summary) of one predictions table."""
        import numpy as np

        references = tuple(frame["reference"].astype(str))
        if references not in self._references:
            self._references[references] = self.embedder.encode(list(references))
        result = GenerationResult(frame["answer"].fillna("").astype(str).tolist(), frame["n_tokens"].astype(int).tolist(),
                                  frame["stopped"].astype(bool).tolist(), 0.0)
        validation = frame[[c for c in ("id", "question") if c in frame.columns]].assign(answer=frame["reference"])
        criteria = on_style(self.config.tone, self.config.judge)
        scored = score_answers(validation, result, self._references[references], self.embedder, criteria)
        scored[f"repeated_{REPETITION_N}gram_rate"] = [repeated_ngram_rate(a, REPETITION_N) for a in result.answers]
        settings = self.config.evaluate
        summary = summarize_predictions(scored, criteria, settings.bootstrap_samples, settings.seed,
                                        style_key=style_key(self.config.tone))
        if "repetition_rate" not in summary:  # pipeline.core.evalmetrics may compute it itself
            summary["repetition_rate"] = float(scored[f"repeated_{REPETITION_N}gram_rate"].mean())
        if "factual" in frame.columns:  # the content metric: similarity to the factual answer
            scored["content_similarity"] = content_similarity(result.answers, frame["factual"].astype(str).tolist(),
                                                              self.embedder)
            summary["content_similarity_mean"] = float(np.nanmean(scored["content_similarity"]))
        return scored, summary


def read_prediction_record(path: Path) -> dict[str, Any]:
    """reports/predictions/<model>.json, checked."""
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{path}: not valid JSON ({error.msg}); re-run `dvc repro predict`") from None
    missing = [key for key in ("model", "kind", "precision", "decoding") if key not in record]
    if missing:
        raise TonetuneError(f"{path}: missing {missing}; re-run `dvc repro predict`")
    return record


def scalars_only(record: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics hold scalars: drop None (unknown) and anything that is not a number/str/bool."""
    return {key: value for key, value in record.items()
            if value is not None and isinstance(value, int | float | str | bool)
            and not (isinstance(value, float) and not math.isfinite(value))}


def ablation_summary(scorer: Scorer, scored: pd.DataFrame, greedy_frame: pd.DataFrame) -> dict[str, float]:
    """`ablation_greedy_*` and `ablation_policy_*` on the same first N questions."""
    n = len(greedy_frame)
    _, greedy = scorer.score(greedy_frame)
    _, policy = scorer.score(scored.head(n)[list(PREDICTION_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in scored]])
    values: dict[str, float] = {"ablation_n_eval": n}
    for key in (style_key(scorer.config.tone), *ABLATION_KEYS):
        values[f"ablation_greedy_{key}"] = greedy.get(key)
        values[f"ablation_policy_{key}"] = policy.get(key)
    return values


# --------------------------------------------------------------------------- MLflow


def find_training_run(client, experiment_id: str, name: str, run_id: str | None = None):
    """The adapter's training run: `run_id` from its tonetune_adapter.json when this store has
    it, else the newest run named `name` (the train stage names runs after the adapter folder)."""
    run = find_run(client, run_id)
    if run is not None and run.info.experiment_id == experiment_id:
        return run
    # not recorded here (e.g. a copied adapter, another store): fall back to the name
    escaped = name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.run_name = '{escaped}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def evaluation_tags(prediction: dict[str, Any], config: Config, n_eval: int) -> dict[str, str]:
    """What the evaluation ran with, as tags (a re-evaluation may change them; params may not)."""
    policy = DecodingPolicy.from_dict(prediction["decoding"])
    tags = {
        "eval.system_prompt": str(prediction.get("system_prompt")),
        "eval.system_prompt_version": str(prediction.get("system_prompt_version")),
        "eval.precision": str(prediction["precision"]),
        "eval.decoding": policy.describe(),
        "eval.decoding_json": json.dumps(policy.to_dict(), sort_keys=True),
        "eval.batch_size": str(prediction.get("batch_size")),
        "eval.bucket_tokens": str(prediction.get("bucket_tokens")),
        "eval.max_new_tokens": str(policy.max_new_tokens),
        **tone_tags(config.tone, "eval.", "eval.conversational_threshold"),
        "eval.embeddings_model": config.embeddings.model,
        "eval.n_eval": str(n_eval),
        **{f"eval.{key}": value for key, value in code_version_tags().items() if not key.startswith("mlflow.")},
    }
    if prediction.get("numerics"):
        tags["eval.numerics"] = json.dumps(prediction["numerics"], sort_keys=True)
    if "ablation" in prediction:
        tags["eval.ablation"] = f"plain greedy on the first {prediction['ablation']['n_questions']} questions"
    return tags


def log_evaluation(client, experiment_id: str, run_id: str | None, record: dict[str, Any], prediction: dict[str, Any],
                   scored: pd.DataFrame, config: Config) -> str:
    """Log metrics, tags and the scored table on `run_id` without re-opening it, or on a new
    run `eval-<model>` spanning the model's inference; returns the run id."""
    import time

    import mlflow
    from mlflow.entities import Metric, RunTag

    if run_id is None:
        run = client.create_run(
            experiment_id, start_time=prediction.get("started_at_ms"), run_name=f"{RUN_NAME_PREFIX}{record['model']}",
            tags={Tags.STAGE: "score", "model": record["model"], "kind": record["kind"], **code_version_tags()},
        )
        run_id, created = run.info.run_id, True
    else:
        created = False
    now = int(time.time() * 1000)
    numbers = {f"{MLFLOW_METRIC_PREFIX}{key}": float(value) for key, value in record.items()
               if isinstance(value, int | float) and not isinstance(value, bool)
               and key not in ("lora_r", "lora_alpha", "learning_rate", "n_train")}
    numbers[f"{MLFLOW_METRIC_PREFIX}seconds"] = float(prediction.get("seconds", 0.0))
    numbers[f"{MLFLOW_METRIC_PREFIX}tokens_per_s"] = float(prediction.get("tokens_per_s", 0.0))
    tags = evaluation_tags(prediction, config, len(scored))
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in numbers.items()],
                     tags=[RunTag(key, value) for key, value in tags.items()])
    log_validation_input(client, run_id)
    mlflow.log_table(scored, artifact_file=predictions_artifact_path(client, run_id), run_id=run_id)
    if created:
        client.set_terminated(run_id, end_time=prediction.get("ended_at_ms"))
    return run_id


def log_validation_input(client, run_id: str) -> None:
    """The validation split as a dataset input of `run_id` (with its DVC md5), if it is there."""
    if not VAL_SPLIT_PATH.is_file():
        return
    import pandas as pd

    log_dataset_input_to(client, run_id, pd.read_parquet(VAL_SPLIT_PATH), VAL_SPLIT_PATH, "evaluation", name="val")


# --------------------------------------------------------------------------- wiring


def describe(record: dict[str, Any], tone: ToneConfig) -> str:
    """One line per model."""

    def number(key: str, digits: int) -> str:
        value = record.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    key = style_key(tone)
    means = ", ".join(f"{'Flesch' if column == 'flesch' else column} {number(column + '_mean', 1)}"
                      for column in on_style(tone).columns)
    return (
        f"score: {record['model']}: {number(key, 1)}{style_label(tone)} "
        f"[{number(key + '_ci_low', 1)}, {number(key + '_ci_high', 1)}], "
        f"similarity {number('similarity_mean', 3)}, to the factual answer {number('content_similarity_mean', 3)}, "
        f"{means}, "
        f"{number('stopped_pct', 0)}% ended their turn, repetition {number('repetition_rate', 3)}"
    )


def score_model(scorer: Scorer, path: Path, client, experiment_id: str | None) -> dict[str, Any]:
    """Score one model's predictions, write its scored table and metrics, log them."""
    prediction = read_prediction_record(path)
    name = prediction["model"]
    frame = read_table(path.with_suffix(".parquet"), PREDICTION_COLUMNS, "re-run `dvc repro predict`")
    scored, summary = scorer.score(frame)
    ablation_file = path.parent / ABLATION_DIRNAME / f"{name}.parquet"
    if "ablation" in prediction and ablation_file.is_file():
        summary.update(ablation_summary(scorer, scored, read_table(ablation_file, PREDICTION_COLUMNS)))
    training_run = None
    if client is not None and prediction["kind"] == "lora":
        training_run = find_training_run(client, experiment_id, name, prediction.get("training_run_id"))
    metadata = merge_metadata(prediction.get("metadata") or {}, training_run.data.params if training_run else None)
    metadata["precision"] = prediction["precision"]  # the precision it was evaluated (and is served) in
    record = metrics_record(name, prediction["kind"], summary, family=prediction.get("family"),
                            system_prompt=prediction.get("system_prompt"),
                            **{k: v for k, v in metadata.items() if k != "precision"}, precision=metadata["precision"])
    record = scalars_only(record)
    if client is not None:
        run_id = training_run.info.run_id if training_run else None
        record["mlflow_run_id"] = log_evaluation(client, experiment_id, run_id, record, prediction, scored, scorer.config)
    write_table(scored, SCORES_DIR / f"{name}.parquet")
    write_metrics(record, name)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.score",
        description=f"Stage score: metrics of every model from {PREDICTIONS_DIR}/<model>.parquet; writes "
        f"{EVAL_METRICS_DIR}/<model>.json and {SCORES_DIR}/<model>.parquet, logs to MLflow "
        "(params: tone.on_style, tone.name, tone.language; evaluate.bootstrap_samples, seed; embeddings.*).",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    records = sorted(PREDICTIONS_DIR.glob("*.json"))
    if not records:
        raise TonetuneError(f"{PREDICTIONS_DIR}: no predictions (run `dvc repro predict` first)")
    on_style(config.tone, config.judge).check()  # a hub: or rubric: metric's mistakes: one line, before any model
    client = experiment_id = None
    if not args.no_mlflow:
        import mlflow

        experiment_id = configure_mlflow(config.tracking)
        client = mlflow.MlflowClient()
    scorer = Scorer(config, load_embedder(config.embeddings), {})
    for stale in [*EVAL_METRICS_DIR.glob("*.json"), *SCORES_DIR.glob("*.parquet")]:
        stale.unlink()
    for path in records:
        print(describe(score_model(scorer, path, client, experiment_id), config.tone), flush=True)


if __name__ == "__main__":
    main()
