"""The predictions table every evaluated model produces, and how it is scored and stored.

Shared by the LoRA evaluation and the OpenAI arm so that every model in the report is scored by
the same code: answers (with token counts and whether the turn ended) -> Flesch reading ease and
similarity to the reference answer per row -> reports/.../<model>.parquet, metrics JSON, and an
MLflow table. Computing the summary metrics from the table is pipeline.core.evalmetrics' job;
generating the answers is the caller's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import EVAL_METRICS_DIR, PREDICTIONS_DIR, SCORES_DIR
from pipeline.core.errors import TonetuneError
from pipeline.core.tables import read_table, write_table

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.core.tone import Criteria

__all__ = ["EVAL_METRICS_DIR", "PREDICTIONS_DIR", "SCORES_DIR"]  # hand-off paths (declared in pipeline.core.config), re-exported
MLFLOW_METRIC_PREFIX = "eval_"


@dataclass
class GenerationResult:
    """Answers in input order, with per-answer token counts and whether the turn ended."""

    answers: list[str]
    n_tokens: list[int]
    stopped: list[bool]
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Generated (kept) tokens per wall-clock second."""
        return sum(self.n_tokens) / self.seconds if self.seconds > 0 else float("nan")


def read_validation(path: Path, limit: int | None) -> pd.DataFrame:
    """The validation split (question + reference answer), first `limit` rows if set."""
    frame = read_table(path, ("question", "answer"), "the validation split; run `dvc repro split` first")
    if frame.empty:
        raise TonetuneError(f"{path}: the validation split is empty")
    if limit is not None:
        frame = frame.head(limit)
    return frame.reset_index(drop=True)


def score_answers(
    validation: pd.DataFrame, result: GenerationResult, reference_vectors: np.ndarray, embedder,
    criteria: Criteria | None = None,
) -> pd.DataFrame:
    """The predictions table: question, reference, answer, one column per style metric of the
    tone's on-style `criteria` (default: flesch; NaN when empty), similarity."""
    import pandas as pd

    from pipeline.core.textmetrics import cosine_similarity
    from pipeline.core.tone import Criteria

    criteria = criteria or Criteria.flesch_at_least(60.0)
    style = criteria.score(result.answers)
    similarity = cosine_similarity(embedder.encode(result.answers), reference_vectors)
    columns = {
        "question": validation["question"].astype(str).tolist(),
        "reference": validation["answer"].astype(str).tolist(),
        "answer": result.answers,
        **style,
        "similarity": similarity.astype(float),
        "n_tokens": result.n_tokens,
        "stopped": result.stopped,
    }
    frame = pd.DataFrame(columns)
    if "id" in validation.columns:
        frame.insert(0, "id", validation["id"].astype(str).tolist())
    return frame


def content_similarity(answers: list[str], factual: list[str], embedder) -> np.ndarray:
    """Per answer: cosine to the factual answer (the content without the tone), which sees content
    that a conversational reference hides; NaN for an empty answer."""
    import numpy as np

    from pipeline.core.textmetrics import cosine_similarity

    values = cosine_similarity(embedder.encode(list(answers)), embedder.encode(list(factual))).astype(float)
    values[[not answer for answer in answers]] = np.nan
    return values


def per_question_scores(frame: pd.DataFrame, embedder, criteria: Criteria | float) -> pd.DataFrame:
    """A predictions table (id, question, reference, factual, answer, n_tokens, stopped) with each
    answer's scores: one column per style metric (flesch for the default tone), on_style (the
    tone's criteria, AND; a number: Flesch >= it), similarity (to the conversational reference,
    the paper's), content_similarity (to the factual answer) and repetition_rate. What the
    promotion rule reads, for every model it compares (pipeline.core.decision.Scores)."""
    import numpy as np

    from pipeline.core.evalmetrics import REPETITION_NGRAM
    from pipeline.core.textmetrics import cosine_similarity, repeated_ngram_rate
    from pipeline.core.tone import Criteria

    if not isinstance(criteria, Criteria):
        criteria = Criteria.flesch_at_least(float(criteria))
    answers = frame["answer"].fillna("").astype(str).tolist()
    scored = frame.copy()
    answer_vectors = embedder.encode(answers)
    for column, values in criteria.score(answers).items():
        scored[column] = values
    scored["on_style"] = criteria.mask(scored)
    scored["similarity"] = cosine_similarity(answer_vectors, embedder.encode(frame["reference"].astype(str).tolist()))
    scored["content_similarity"] = cosine_similarity(answer_vectors,
                                                     embedder.encode(frame["factual"].astype(str).tolist()))
    scored.loc[[not answer for answer in answers], ["similarity", "content_similarity"]] = np.nan
    scored["repetition_rate"] = [repeated_ngram_rate(answer, REPETITION_NGRAM) for answer in answers]
    return scored


def predictions_artifact_path(client, run_id: str) -> str:
    """log_table appends to an existing file, so a re-evaluation of a run gets a new file name."""
    existing = {Path(info.path).name for info in client.list_artifacts(run_id, "eval")}
    if "predictions.json" not in existing:
        return "eval/predictions.json"
    return f"eval/predictions-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"


def write_predictions(predictions: pd.DataFrame, name: str, folder: Path = PREDICTIONS_DIR) -> Path:
    """<folder>/<model>.parquet (default reports/predictions/), written atomically."""
    path = folder / f"{name}.parquet"
    write_table(predictions, path)
    return path


def write_metrics(record: dict[str, Any], name: str, folder: Path = EVAL_METRICS_DIR) -> Path:
    """metrics/eval/<model>.json (what `dvc metrics show` and the report read)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
