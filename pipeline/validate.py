"""Stage `validate`: the data-quality gate between generation and training.

A great-expectations (GX Core 1.x) suite over data/generated/pairs.parquet that recomputes the
paper's rules instead of trusting the numbers generation wrote:

- every answer passes the tone's gate, recomputed (tone.gate; default Flesch reading ease >= 75)
  (recomputed with textstat into `flesch_recomputed`);
- no question is a near duplicate of an EARLIER question in file order: the max cosine of its
  embedding with every earlier question's (`question_max_prior_cosine`) is <= generate.dedup_threshold
  (the paper rejects "greater than 0.8");
- faithfulness: cos(embedding(factual_answer), embedding(answer)) >= generate.faithfulness_threshold
  (`faithfulness_recomputed`);
- no nulls or blank strings in id/question/answer/factual_answer; unique ids; questions end with
  '?'; question and answer lengths within the `validate` section's bounds.

Thresholds are read from the `generate` section, so generation and validation cannot disagree.
Data Docs (HTML) go to reports/data_quality/, with the full summary beside them in
reports/data_quality/summary.json (per-check results with example rows, thresholds, the
expectations). The DVC metrics file metrics/data_quality.json holds only scalars a person reads in
`dvc metrics show`/`dvc exp show`: success, rows, checks evaluated/failed (and their names as one string), the
recomputed Flesch/cosine extremes and the md5 of pairs.parquet (`split` and `promote` refuse unless
it says success for the same md5). On any failed check the stage prints one line per failed check
with example rows (id and value) on stderr and exits 1 -- after writing the summary and the Data
Docs, so the evidence is there to read while `dvc repro` stops before `split`. Bad input (missing
file, missing columns) exits 2 with one line before any model is loaded.

What it does not do: judge content (a fluent answer about the wrong topic passes if it is close
enough to its factual answer), or fix anything; regenerate instead.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import (
    DATA_QUALITY_PATH,
    PAIRS_PATH,
    REPORTS_DIR,
    GenerateConfig,
    ValidateConfig,
    load_config,
)
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import write_json
from pipeline.core.tone import Criteria, describe_criteria
from pipeline.core.tone import gate as tone_gate

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipeline.core.textmetrics import Embedder

DATA_DOCS_DIR = REPORTS_DIR / "data_quality"
SUMMARY_PATH = DATA_QUALITY_PATH
REPORT_NAME = "summary.json"  # the full summary, inside the Data Docs folder
REQUIRED_COLUMNS = ("id", "question", "answer", "factual_answer")
SUITE_NAME = "pairs_quality"
GATE_FAILED_EXIT_CODE = 1
# Embeddings of the same text differ by ~1e-6 between batch compositions (padding, BLAS order),
# so a pair that generation measured at exactly the threshold must not flip to a failure here.
# Flesch is deterministic (same textstat, same text) and gets no tolerance.
EMBEDDING_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Check:
    """One rule of the gate: a stable name (used in messages and the summary), the column it
    looks at, and a sentence a person reads in the failure message and the Data Docs."""

    name: str
    column: str
    rule: str
    expectation: Any = field(compare=False, repr=False)


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check: how many rows broke it, and a few of them (id + value)."""

    name: str
    expectation_type: str
    column: str
    rule: str
    success: bool
    unexpected_count: int
    examples: list[dict[str, Any]]


# --------------------------------------------------------------------------- input


def read_pairs(path: Path) -> pd.DataFrame:
    """Read pairs.parquet and check it has the columns the gate needs (cheap, before any model)."""
    from pipeline.core.tables import read_table

    frame = read_table(path, REQUIRED_COLUMNS, "run the generate stage first (dvc repro generate)")
    for column in REQUIRED_COLUMNS:
        values = frame[column].dropna()
        bad = values[~values.map(lambda value: isinstance(value, str))]
        if len(bad):
            raise TonetuneError(
                f"{path}: column {column!r} must hold text, row {bad.index[0]} holds {bad.iloc[0]!r}"
            )
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------- recomputation


def usable_text(series: pd.Series) -> pd.Series:
    """True where a cell holds a non-blank string: only those are scored and embedded; nulls
    and blanks are left NaN here and caught by their own checks."""
    return series.map(lambda value: isinstance(value, str) and bool(value.strip()))


def embed_usable(texts: pd.Series, embedder: Embedder) -> np.ndarray:
    """Embeddings of a column, with all-zero rows where the text is null or blank."""
    import numpy as np

    mask = usable_text(texts).to_numpy()
    vectors = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    if mask.any():
        vectors[mask] = embedder.encode(texts[mask].tolist())
    return vectors


def max_cosine_to_earlier(vectors: np.ndarray, block_rows: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the max cosine with any EARLIER row and that row's position.

    Independent of generation's incremental index on purpose: it compares with every earlier
    row (also rows that should have been rejected), which is what "no two questions above the
    threshold" means for the file as it is. Row 0 has no earlier row: NaN and -1. Works in
    blocks of `block_rows` so 10,000 questions need a 1024 x 10,000 matrix, not 10,000^2.
    """
    import numpy as np

    count = len(vectors)
    best = np.full(count, np.nan, dtype=np.float64)
    nearest = np.full(count, -1, dtype=np.int64)
    for start in range(1, count, block_rows):
        stop = min(start + block_rows, count)
        similarity = vectors[start:stop] @ vectors[:stop].T
        rows = np.arange(start, stop)
        # Hide the row itself and every later row: only earlier questions count.
        earlier = np.arange(stop)[None, :] < rows[:, None]
        similarity = np.where(earlier, similarity, -np.inf)
        nearest[start:stop] = np.argmax(similarity, axis=1)
        best[start:stop] = similarity[np.arange(stop - start), nearest[start:stop]]
    return best, nearest


def recompute_columns(frame: pd.DataFrame, embedder: Embedder, gate: Criteria | None = None) -> pd.DataFrame:
    """Add the gate's recomputed columns (the stored flesch/faithfulness are never read).

    flesch_recomputed, <column>_recomputed for each other metric of the tone's gate,
    question_max_prior_cosine, question_nearest_prior_id and faithfulness_recomputed; NaN where
    the text needed is null or blank.
    """
    import numpy as np

    from pipeline.core.textmetrics import cosine_similarity, flesch_reading_ease_batch

    frame = frame.copy()
    answers_ok = usable_text(frame["answer"]).to_numpy()
    flesch = np.full(len(frame), np.nan)
    flesch[answers_ok] = flesch_reading_ease_batch(frame.loc[answers_ok, "answer"])
    frame["flesch_recomputed"] = flesch
    for column, values in (gate.score(frame.loc[answers_ok, "answer"].tolist()).items() if gate else ()):
        if column != "flesch":
            recomputed = np.full(len(frame), np.nan)
            recomputed[answers_ok] = values
            frame[f"{column}_recomputed"] = recomputed

    questions_ok = usable_text(frame["question"]).to_numpy()
    best, nearest = max_cosine_to_earlier(embed_usable(frame["question"], embedder))
    best[~questions_ok] = np.nan
    frame["question_max_prior_cosine"] = best
    ids = frame["id"].astype(object).to_numpy()
    frame["question_nearest_prior_id"] = [ids[i] if i >= 0 and questions_ok[row] else None for row, i in enumerate(nearest)]

    paired_ok = answers_ok & usable_text(frame["factual_answer"]).to_numpy()
    faithfulness = cosine_similarity(
        embed_usable(frame["factual_answer"], embedder), embed_usable(frame["answer"], embedder)
    ).astype(np.float64)
    faithfulness[~paired_ok] = np.nan
    frame["faithfulness_recomputed"] = faithfulness
    return frame


# --------------------------------------------------------------------------- the suite


def gate_checks(gate: Criteria) -> list[tuple[str, str, str, Any]]:
    """One expectation per criterion of the tone's gate, on the recomputed column: `answer_flesch`
    for Flesch reading ease (its name since the first release), `answer_<column>` otherwise."""
    import great_expectations.expectations as gxe

    from pipeline.core.tone import FLESCH, describe_criterion, metric_column

    checks = []
    for criterion in gate.criteria:
        column = f"{metric_column(criterion.metric)}_recomputed"
        bound = {"min_value" if criterion.direction == "higher" else "max_value": criterion.threshold}
        if criterion.metric == FLESCH and criterion.direction == "higher":
            rule = f"conversational answer Flesch reading ease (recomputed) >= {criterion.threshold:g}"
        else:
            rule = f"answer {describe_criterion(criterion)} (recomputed)"
        checks.append((f"answer_{metric_column(criterion.metric)}", column, rule,
                       gxe.ExpectColumnValuesToBeBetween(column=column, **bound)))
    return checks


def build_checks(thresholds: GenerateConfig, bounds: ValidateConfig, gate: Criteria | None = None) -> list[Check]:
    """The gate's rules as GX expectations, each tagged with a stable check name in `meta`."""
    from pipeline.core.tone import Criteria

    gate = gate or Criteria.flesch_at_least(75.0)
    import great_expectations.expectations as gxe

    checks: list[tuple[str, str, str, Any]] = [
        ("rows_present", "", "the file has at least one row",
         gxe.ExpectTableRowCountToBeBetween(min_value=1)),
    ]
    for column in REQUIRED_COLUMNS:
        checks.append((f"{column}_not_null", column, f"{column} is never null",
                       gxe.ExpectColumnValuesToNotBeNull(column=column)))
        checks.append((f"{column}_not_blank", column, f"{column} is never an empty or blank string",
                       gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=r"^\s*$")))
    checks += [
        ("id_unique", "id", "ids are unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        ("question_ends_with_question_mark", "question", "every question ends with '?'",
         gxe.ExpectColumnValuesToMatchRegex(column="question", regex=r"\?$")),
        ("question_length", "question",
         f"question length is {bounds.min_question_chars}..{bounds.max_question_chars} characters",
         gxe.ExpectColumnValueLengthsToBeBetween(
             column="question", min_value=bounds.min_question_chars, max_value=bounds.max_question_chars)),
        ("answer_length", "answer",
         f"answer length is {bounds.min_answer_chars}..{bounds.max_answer_chars} characters",
         gxe.ExpectColumnValueLengthsToBeBetween(
             column="answer", min_value=bounds.min_answer_chars, max_value=bounds.max_answer_chars)),
        *gate_checks(gate),
        ("question_not_near_duplicate", "question_max_prior_cosine",
         f"max cosine of a question with any earlier question (recomputed) <= {thresholds.dedup_threshold:g}",
         gxe.ExpectColumnValuesToBeBetween(
             column="question_max_prior_cosine", max_value=thresholds.dedup_threshold + EMBEDDING_TOLERANCE)),
        ("answer_faithful", "faithfulness_recomputed",
         f"cosine(factual_answer, answer) (recomputed) >= {thresholds.faithfulness_threshold:g}",
         gxe.ExpectColumnValuesToBeBetween(
             column="faithfulness_recomputed", min_value=thresholds.faithfulness_threshold - EMBEDDING_TOLERANCE)),
    ]
    result = []
    for name, column, rule, expectation in checks:
        expectation.meta = {"check": name}
        expectation.description = f"{name}: {rule}"
        result.append(Check(name, column, rule, expectation))
    return result


def quiet_context(docs_dir: Path):
    """An ephemeral GX context (nothing written but the Data Docs) with one local docs site."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(context.list_data_docs_sites()):
        context.delete_data_docs_site(site)  # the default site writes into a temp folder
    context.add_data_docs_site(
        site_name="tonetune",
        site_config={
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def run_suite(frame: pd.DataFrame, checks: list[Check], docs_dir: Path):
    """Validate `frame` with a checkpoint that also writes the Data Docs site to `docs_dir`.

    Failed rows are reported by their `id` (GX's unexpected_index_column_names), so messages
    name rows the way every other file in the project does.
    """
    import great_expectations as gx

    context = quiet_context(docs_dir)
    batch_definition = (
        context.data_sources.add_pandas("generated")
        .add_dataframe_asset("pairs")
        .add_batch_definition_whole_dataframe("pairs.parquet")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for check in checks:
        suite.add_expectation(check.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE_NAME, data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="data_quality_gate",
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["tonetune"])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    return next(iter(result.run_results.values()))


def json_value(value: Any) -> Any:
    """A cell as JSON: floats rounded for reading, NaN as null, numpy scalars as Python ones."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def outcomes_from(validation_result, checks: list[Check], frame: pd.DataFrame, max_examples: int) -> list[CheckOutcome]:
    """Per-check outcomes with up to `max_examples` offending rows as {id, value}.

    For the dedup check the example also names the earlier question it duplicates."""
    by_name = {check.name: check for check in checks}
    order = {check.name: position for position, check in enumerate(checks)}
    nearest_by_id = dict(zip(frame["id"], frame["question_nearest_prior_id"], strict=True))
    outcomes = []
    for result in validation_result.results:
        check = by_name[result.expectation_config.meta["check"]]
        details = result.result or {}
        examples = []
        for entry in (details.get("unexpected_index_list") or [])[:max_examples]:
            example = {"id": json_value(entry.get("id"))}
            if check.column and check.column != "id":
                example["value"] = json_value(entry.get(check.column))
            if check.name == "question_not_near_duplicate":
                example["nearest_earlier_id"] = json_value(nearest_by_id.get(entry.get("id")))
            examples.append(example)
        if check.name == "rows_present" and not result.success:
            examples = [{"rows": details.get("observed_value")}]
        outcomes.append(CheckOutcome(
            name=check.name,
            expectation_type=result.expectation_config.type,
            column=check.column,
            rule=check.rule,
            success=bool(result.success),
            unexpected_count=int(details.get("unexpected_count") or (0 if result.success else 1)),
            examples=examples,
        ))
    return sorted(outcomes, key=lambda outcome: order[outcome.name])  # GX reorders; keep ours


# --------------------------------------------------------------------------- outputs


def build_summary(outcomes: list[CheckOutcome], frame: pd.DataFrame, pairs_path: Path, config) -> dict:
    """The full summary (reports/data_quality/summary.json): gate verdict, counts, the md5 `split`
    checks, thresholds, and per-check results with example rows."""
    from pipeline.core.dvcmeta import file_md5

    failed = [outcome.name for outcome in outcomes if not outcome.success]
    return {
        "success": not failed,
        "rows": int(len(frame)),
        "checks_evaluated": len(outcomes),
        "checks_failed": len(failed),
        "failed_checks": failed,
        "pairs_path": pairs_path.as_posix(),
        "pairs_md5": file_md5(pairs_path),
        "thresholds": {
            "gate": describe_criteria(config.tone.gate),
            "dedup_max_cosine": config.generate.dedup_threshold,
            "faithfulness_min": config.generate.faithfulness_threshold,
            "embedding_tolerance": EMBEDDING_TOLERANCE,
        },
        "embeddings_model": config.embeddings.model,
        "recomputed": {
            "flesch_min": json_value(frame["flesch_recomputed"].min()),
            "flesch_mean": json_value(frame["flesch_recomputed"].mean()),
            "question_max_prior_cosine_max": json_value(frame["question_max_prior_cosine"].max()),
            "faithfulness_min": json_value(frame["faithfulness_recomputed"].min()),
            "faithfulness_mean": json_value(frame["faithfulness_recomputed"].mean()),
        },
        "checks": {
            outcome.name: {"success": outcome.success, "unexpected_count": outcome.unexpected_count,
                           "examples": outcome.examples}
            for outcome in outcomes
        },
        "expectations": [
            {"check": outcome.name, "expectation_type": outcome.expectation_type, "column": outcome.column,
             "rule": outcome.rule}
            for outcome in outcomes
        ],
    }


METRIC_KEYS = ("success", "rows", "checks_evaluated", "checks_failed", "pairs_md5")


def metrics_from(summary: dict) -> dict:
    """The DVC metrics: the summary's scalars only (no lists, no nulls, no per-check details),
    so `dvc exp show` has a handful of readable columns and `dvc metrics diff` parses them all.
    `success` and `pairs_md5` are what `split` and `promote` check."""
    metrics = {key: summary[key] for key in METRIC_KEYS}
    metrics["failed_checks"] = ", ".join(summary["failed_checks"])  # one string: "" when all pass
    metrics["recomputed"] = {key: value for key, value in summary["recomputed"].items() if value is not None}
    return metrics


def failure_lines(outcomes: list[CheckOutcome], rows: int) -> list[str]:
    """One line per failed check: name, rule, expectation, how many rows, example ids/values."""
    lines = []
    for outcome in outcomes:
        if outcome.success:
            continue
        examples = ", ".join(
            " ".join(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in example.items())
            for example in outcome.examples
        )
        lines.append(
            f"FAILED {outcome.name} ({outcome.rule}; {outcome.expectation_type}): "
            f"{outcome.unexpected_count} of {rows} rows; e.g. {examples or '-'}"
        )
    return lines


def replace_dir(new: Path, target: Path) -> None:
    """Swap a freshly built folder in place of the old one (old Data Docs pages never linger)."""
    if target.exists():
        shutil.rmtree(target)
    new.replace(target)


def run_gate(frame: pd.DataFrame, config, embedder: Embedder, docs_dir: Path) -> tuple[pd.DataFrame, list[CheckOutcome]]:
    """Recompute, validate, and write Data Docs to `docs_dir` (built aside, then swapped in)."""
    gate = tone_gate(config.tone)
    scored = recompute_columns(frame, embedder, gate)
    checks = build_checks(config.generate, config.validate_, gate)
    staging = docs_dir.with_name(f".{docs_dir.name}.building")
    if staging.exists():
        shutil.rmtree(staging)
    validation_result = run_suite(scored, checks, staging)
    replace_dir(staging, docs_dir)
    return scored, outcomes_from(validation_result, checks, scored, config.validate_.max_examples)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.validate",
        description="Stage validate: the great-expectations data-quality gate over "
        f"{PAIRS_PATH} (thresholds: generate.*, bounds: validate.*). Exits 1 when a check fails.",
    )
    parser.add_argument("--pairs", type=Path, default=PAIRS_PATH, help="pairs parquet to validate")
    parser.add_argument("--docs-dir", type=Path, default=DATA_DOCS_DIR, help="Data Docs site folder")
    parser.add_argument("--summary", type=Path, default=SUMMARY_PATH, help="scalar summary JSON (DVC metrics)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    frame = read_pairs(args.pairs)
    tone_gate(config.tone).check()  # a hub: metric's mistakes: one line, before any model

    from pipeline.core.textmetrics import load_embedder

    scored, outcomes = run_gate(frame, config, load_embedder(config.embeddings), args.docs_dir)
    summary = build_summary(outcomes, scored, args.pairs, config)
    write_json(args.docs_dir / REPORT_NAME, summary)
    write_json(args.summary, metrics_from(summary))
    print(
        f"validate: {summary['rows']} rows, {summary['checks_evaluated'] - summary['checks_failed']}/"
        f"{summary['checks_evaluated']} checks passed -> {args.summary}, details {args.docs_dir / REPORT_NAME}, "
        f"Data Docs {args.docs_dir / 'index.html'}"
    )
    if not summary["success"]:
        for line in failure_lines(outcomes, summary["rows"]):
            print(line, file=sys.stderr)
        print(f"error: data-quality gate failed ({', '.join(summary['failed_checks'])}); "
              "fix generation or its params and re-run", file=sys.stderr)
        raise SystemExit(GATE_FAILED_EXIT_CODE)


if __name__ == "__main__":
    main()
