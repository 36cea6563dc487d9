"""Names of the tone's style metrics, and the value types they are scored through.

The layer below pipeline.core.tone: params validation (pipeline.core.config) needs a metric's
column name, and the metric kinds with modules of their own (pipeline.core.hubclassifier,
pipeline.core.rubric) build StyleMetric values, without importing the tone module that resolves
them. Nothing here imports another module of the project.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from pipeline.core.config import JudgeConfig

FLESCH = "flesch_reading_ease"
GRADE = "flesch_kincaid_grade"
WORDS = "words_per_answer"
BUILTIN_METRICS = (FLESCH, GRADE, WORDS)
HUB_PREFIX = "hub:"
RUBRIC_PREFIX = "rubric:"


@dataclass(frozen=True)
class StyleMetric:
    """One metric: its params name, the column/key it is reported under, a label, and f(text).

    `batch` (optional) scores many non-empty texts at once (a classifier's batches, an LLM's
    concurrent requests); `scores` uses it when set."""

    name: str
    column: str
    label: str
    function: Callable[[str], float]
    source_file: Path | None = None
    batch: Callable[[list[str]], np.ndarray] | None = None

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """Scores of many texts (float64, input order); NaN for an empty text."""
        import numpy as np  # not at import: params validation (pipeline.core.config) imports this module

        if self.batch is not None:
            values = np.full(len(texts), math.nan, dtype=np.float64)
            present = [index for index, text in enumerate(texts) if text]
            if present:
                values[present] = np.asarray(self.batch([texts[index] for index in present]), dtype=np.float64)
            return values
        return np.fromiter((float(self.function(text)) if text else math.nan for text in texts),
                           dtype=np.float64, count=len(texts))


@dataclass(frozen=True)
class MetricContext:
    """What a metric may need beyond the text: the tone's prompts folder and description (a
    rubric's file and `{description}`) and the judge's params (a rubric's model and client).
    A caller without a judge (`judge=None`) can score every metric but `rubric:`."""

    prompts: str
    description: str
    judge: JudgeConfig | None = None


def _sanitised(text: str) -> str:
    """`Very Formal!` -> `very_formal`: lower-case letters, digits and `_`, starting with a letter."""
    column = re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")
    return column if column[:1].isalpha() else f"label_{column}".rstrip("_")


def metric_column(metric: str) -> str:
    """The column a metric's scores are stored under, without importing anything: a hub
    classifier's is its label (sanitised), a rubric's `rubric_<name>`, a user function's its name."""
    builtin = {FLESCH: "flesch", GRADE: "fk_grade", WORDS: "words"}.get(metric)
    if builtin:
        return builtin
    if metric.startswith(HUB_PREFIX):
        return _sanitised(metric.rsplit("#", 1)[-1])
    if metric.startswith(RUBRIC_PREFIX):
        return "rubric_" + metric[len(RUBRIC_PREFIX):]
    return metric.rsplit(":", 1)[-1]
