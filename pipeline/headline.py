"""Stage `headline`: the few numbers experiments are compared by, first in `dvc exp show`.

Reads metrics/eval/<model>.json (written by `score`) and writes metrics/headline.json: per
model, % on-style (pct_<tone.name>; % conversational for the default tone) and mean similarity to the reference answer, and first the test-set
decision against the base (metrics/heldout.json: verdict, style-gain and content bounds):

    {"base": {"pct_conversational": 28.0, "similarity_mean": 0.591},
     "lora-bf16-r32-lr0.0003-n150": {"pct_conversational": 81.0, "similarity_mean": 0.572}}

DVC has no setting for which metric columns `dvc exp show` shows first: it lists them in the
order the stages that declare them are defined in dvc.yaml. This stage is defined first there,
so `dvc exp show --csv` leads with these columns instead of the data-quality counters; the
per-model records (about 100 columns) follow. It reads JSON only: no model, no MLflow.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.core.config import EVAL_METRICS_DIR, HEADLINE_METRICS_PATH, METRICS_DIR
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import write_json

HEADLINE_KEYS = ("pct_conversational", "similarity_mean")
HELDOUT_METRICS_PATH = METRICS_DIR / "heldout.json"  # heldout -> here: the test-set decision's evidence
DECISION_KEYS = ("verdict_vs_base", "style_gain_bound", "content_non_inferiority_bound")


def decision_headline(path: Path) -> dict[str, Any]:
    """The finalist's verdict against the base on the test set (1 promote, 0 inconclusive, -1
    refuse) and the two bounds it rests on; {} before the heldout stage has run."""
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    return {"test": {key: record.get(key) for key in DECISION_KEYS}}


def headline(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """{model: {pct_conversational, similarity_mean}}, the base first, then by model name."""
    rows = sorted(records, key=lambda record: (record.get("kind") != "base", str(record.get("model"))))
    return {str(record["model"]): {key: record.get(key) for key in (style_key_of(record), *HEADLINE_KEYS[1:])}
            for record in rows}


def style_key_of(record: dict[str, Any]) -> str:
    """The record's on-style key, pct_<tone.name> (pct_conversational for the default tone)."""
    return next((key for key in record if key.startswith("pct_") and not key.endswith(("_ci_low", "_ci_high"))),
                HEADLINE_KEYS[0])


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Every metrics/eval/<model>.json record (one line when there is none)."""
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not paths:
        raise TonetuneError(f"{folder}: no per-model metrics (run `dvc repro score` first)")
    records = []
    for path in paths:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "model" not in record:
            raise TonetuneError(f"{path}: not a metrics record of the score stage (no `model` key)")
        records.append(record)
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.headline",
        description=f"Write {HEADLINE_METRICS_PATH} (per model: {', '.join(HEADLINE_KEYS)}) from "
        f"{EVAL_METRICS_DIR}/*.json, the columns `dvc exp show` leads with.",
    )
    parser.add_argument("--eval-dir", type=Path, default=EVAL_METRICS_DIR, help="per-model metrics folder")
    parser.add_argument("--heldout", type=Path, default=HELDOUT_METRICS_PATH, help="the heldout stage's metrics")
    parser.add_argument("--output", type=Path, default=HEADLINE_METRICS_PATH, help="headline metrics file")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = {**decision_headline(args.heldout), **headline(read_records(args.eval_dir))}
    write_json(args.output, summary, nan_as_null=True)
    print(f"headline: {len(summary)} model(s) -> {args.output}")


if __name__ == "__main__":
    main()
