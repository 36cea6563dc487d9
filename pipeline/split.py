"""Stage `split`: a validation set, nested training subsets and a held-out test set of the pairs.

One seeded permutation of the source sections of data/generated/pairs.parquet decides everything
(rows of one section stay together, so no section is in two splits): validation = the first
`split.val_size` rows, then the training pool (train_N = its first N rows, so every training
subset is contained in the next larger one: the paper's 100 in 1,000 in 5,000 in 9,000), then
the test set = the rows after the largest training subset (`split.test_size` of them; null: all).
The same file and seed always give the same splits, and growing `test_size` never moves a row
between validation and training.

Validation is for recipe work and for choosing among grid points; the test set is read only by the
final decision (the `heldout` stage and promotion). No test question may be a near duplicate of a
validation or training question: a test row whose question has a cosine above
`generate.dedup_threshold` (under the `embeddings` model) to any of theirs is dropped and counted;
a validation/training pair above it stops the stage (generate's dedup makes that impossible for
generated data).

Writes data/splits/val.parquet and data/splits/train_<N>.parquet (all columns of pairs),
reports/splits.json (per split: rows, Flesch mean/median/min recomputed with textstat, mean
answer and question length), metrics/splits.json (a few scalars for `dvc exp show`: rows of
pairs, unused rows, and rows and mean Flesch of val and of the largest train split), and one MLflow run `split` that logs every file as a dataset input
with its DVC md5, tagged with the generation run id (data/generated/manifest.json), the git
commit, the md5 of pairs.parquet and the data-quality verdict.

It refuses to run (one line, nothing written) when metrics/data_quality.json says the gate
failed or was computed for a different pairs.parquet, and when there are fewer rows than
val_size + the largest train size.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import (
    DATA_QUALITY_PATH,
    GENERATION_MANIFEST_PATH,
    METRICS_DIR,
    PAIRS_PATH,
    REPORTS_DIR,
    SPLITS_DIR,
    SplitConfig,
    load_config,
)
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import write_json

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SPLITS_METRICS_PATH = METRICS_DIR / "splits.json"
SPLITS_REPORT_PATH = REPORTS_DIR / "splits.json"
DATA_QUALITY_REPORT_PATH = REPORTS_DIR / "data_quality" / "summary.json"


@dataclass(frozen=True)
class SplitPlan:
    """Row positions (into pairs.parquet) of the validation set and of each training subset."""

    val: np.ndarray
    train: dict[int, np.ndarray]
    test: np.ndarray


def section_order(sections: Sequence[str], seed: int) -> np.ndarray:
    """Row positions ordered by a seeded permutation of the sections (first-appearance order
    before permuting), rows of one section adjacent. One row per section: a row permutation."""
    import numpy as np

    first_seen = list(dict.fromkeys(sections))
    rank = {section: position for position, section in enumerate(np.random.default_rng(seed).permutation(len(first_seen)))}
    order_of_section = {section: rank[index] for index, section in enumerate(first_seen)}
    return np.array(sorted(range(len(sections)), key=lambda row: (order_of_section[sections[row]], row)), dtype=int)


def cut_at_section(order: np.ndarray, sections: Sequence[str], start: int, size: int) -> int:
    """The end of a block of `size` rows from `start`, moved forward to the end of its section."""
    end = min(start + size, len(order))
    while 0 < end < len(order) and sections[order[end]] == sections[order[end - 1]]:
        end += 1
    return end


def plan_split(n_rows: int, val_size: int, train_sizes: list[int], seed: int, test_size: int | None = None,
               min_test_size: int = 1, sections: Sequence[str] | None = None) -> SplitPlan:
    """Pure: positions for val, nested train subsets and test from one seeded permutation of the
    sections (`sections`: the section of each row; None: every row its own section).

    Raises TonetuneError, giving available vs needed rows, when the file is too small.
    """
    sections = [str(i) for i in range(n_rows)] if sections is None else [str(s) for s in sections]
    largest = max(train_sizes)
    needed = val_size + largest + (test_size or min_test_size)
    if n_rows < needed:
        raise TonetuneError(
            f"split needs {needed} rows (split.val_size {val_size} + largest split.train_sizes {largest} + "
            f"test {test_size or min_test_size}) but pairs has only {n_rows}: generate more "
            "(generate.target_pairs) or lower the split sizes"
        )
    order = section_order(sections, seed)
    val_end = cut_at_section(order, sections, 0, val_size)
    train_end = cut_at_section(order, sections, val_end, largest)
    pool = order[val_end:train_end]
    train = {size: pool[:size] for size in sorted(train_sizes)}
    train[largest] = pool  # a section cut at the boundary stays whole in the largest split
    test = order[train_end:] if test_size is None else order[train_end:train_end + test_size]
    return SplitPlan(val=order[:val_end], train=train, test=test)


def near_duplicates(questions: Sequence[str], others: Sequence[str], embedder, threshold: float) -> np.ndarray:
    """Per question: its highest cosine to any of `others` (the dedup rule's metric)."""
    import numpy as np

    if not len(questions) or not len(others):
        return np.zeros(len(questions))
    mine = np.asarray(embedder.encode(list(questions)), dtype=float)
    theirs = np.asarray(embedder.encode(list(others)), dtype=float)
    mine /= np.linalg.norm(mine, axis=1, keepdims=True)
    theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
    return (mine @ theirs.T).max(axis=1)


def drop_test_near_duplicates(pairs: pd.DataFrame, plan: SplitPlan, embedder, threshold: float,
                              min_test_size: int) -> tuple[SplitPlan, dict[str, float]]:
    """The plan without test rows whose question is a near duplicate of a validation or training
    question; stops when validation and training themselves share one, or too few test rows remain."""
    import numpy as np

    questions = pairs["question"].astype(str).to_numpy()
    largest = plan.train[max(plan.train)]
    val_train = near_duplicates(questions[plan.val], questions[largest], embedder, threshold)
    if val_train.size and val_train.max() > threshold:
        worst = int(val_train.argmax())
        raise TonetuneError(
            f"validation question {questions[plan.val][worst]!r} has cosine {val_train.max():.3f} > "
            f"{threshold} to a training question: the pairs were not deduplicated (re-run generate)"
        )
    test_cosine = near_duplicates(questions[plan.test], np.concatenate([questions[plan.val], questions[largest]]),
                                  embedder, threshold)
    keep = test_cosine <= threshold
    test = plan.test[keep]
    if test.size < min_test_size:
        raise TonetuneError(
            f"only {test.size} test rows remain (split.min_test_size {min_test_size}) after dropping "
            f"{int((~keep).sum())} near duplicates: generate more pairs or lower the split sizes"
        )
    facts = {"test_dropped_near_duplicates": int((~keep).sum()),
             "cross_split_max_cosine": round(float(max(val_train.max(initial=0), test_cosine[keep].max(initial=0))), 4)}
    return SplitPlan(plan.val, plan.train, test), facts


def check_gate(summary_path: Path, pairs_path: Path) -> dict:
    """The validate stage's verdict, only if it passed for exactly this pairs.parquet."""
    from pipeline.core.dvcmeta import file_md5

    if not pairs_path.exists():
        raise TonetuneError(f"{pairs_path} not found: run the generate stage first")
    if not summary_path.exists():
        raise TonetuneError(f"{summary_path} not found: run the validate stage first (python -m pipeline.validate)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{summary_path}: not valid JSON ({error}): re-run the validate stage") from None
    if summary.get("success") is not True:
        failed = summary.get("failed_checks") or "unknown checks"
        raise TonetuneError(
            f"data-quality gate failed for {pairs_path} ({failed}; details in {DATA_QUALITY_REPORT_PATH}): "
            "split refuses to run"
        )
    actual = file_md5(pairs_path)
    if summary.get("pairs_md5") != actual:
        raise TonetuneError(
            f"{summary_path} is for pairs md5 {summary.get('pairs_md5')} but {pairs_path} has md5 {actual}: "
            "re-run the validate stage on the current file"
        )
    return summary


def split_frames(pairs: pd.DataFrame, plan: SplitPlan) -> dict[str, pd.DataFrame]:
    """Name -> rows of that split, in permuted order ("val", "train_<N>", "test")."""
    frames = {"val": pairs.iloc[plan.val].reset_index(drop=True)}
    for size, positions in plan.train.items():
        frames[f"train_{size}"] = pairs.iloc[positions].reset_index(drop=True)
    frames["test"] = pairs.iloc[plan.test].reset_index(drop=True)
    return frames


def split_stats(frame: pd.DataFrame) -> dict[str, float | int]:
    """Rows, Flesch (recomputed) mean/median/min and mean answer/question length of one split."""
    import numpy as np

    from pipeline.core.textmetrics import flesch_reading_ease_batch

    flesch = flesch_reading_ease_batch(frame["answer"].tolist())
    return {
        "rows": int(len(frame)),
        "flesch_mean": round(float(flesch.mean()), 3),
        "flesch_median": round(float(np.median(flesch)), 3),
        "flesch_min": round(float(flesch.min()), 3),
        "answer_chars_mean": round(float(frame["answer"].str.len().mean()), 1),
        "question_chars_mean": round(float(frame["question"].str.len().mean()), 1),
    }


def split_metrics(pairs_rows: int, unused_rows: int, stats: dict[str, dict], largest: int,
                  facts: dict[str, float] | None = None) -> dict:
    """The DVC metrics: a few scalars with fixed names (growing split.train_sizes adds no
    columns to `dvc exp show`); the per-split table is in reports/splits.json."""
    val, train, test = stats["val"], stats[f"train_{largest}"], stats["test"]
    return {
        "pairs_rows": int(pairs_rows),
        "unused_rows": int(unused_rows),
        "val_rows": val["rows"],
        "val_flesch_mean": val["flesch_mean"],
        "train_largest_rows": train["rows"],
        "train_largest_flesch_mean": train["flesch_mean"],
        "test_rows": test["rows"],
        **(facts or {}),
    }


def split_path(name: str, splits_dir: Path) -> Path:
    """data/splits/<name>.parquet."""
    return splits_dir / f"{name}.parquet"


def write_splits(frames: dict[str, pd.DataFrame], splits_dir: Path) -> dict[str, Path]:
    """Write each split atomically, then drop train_*.parquet files this config no longer makes
    (left by an earlier run with other sizes, they would otherwise ride along in the DVC out)."""
    splits_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, frame in frames.items():
        path = split_path(name, splits_dir)
        temporary = path.with_name(f".{path.name}.tmp")
        frame.to_parquet(temporary, index=False)
        temporary.replace(path)
        written[name] = path
    for stale in splits_dir.glob("train_*.parquet"):
        if stale not in written.values():
            stale.unlink()
    return written


def read_generation_manifest(path: Path = GENERATION_MANIFEST_PATH) -> dict:
    """Generation's manifest (run id, corpus version...); {} when absent, so split still works
    on hand-made data, and the missing link shows up as 'unknown' in MLflow and lineage."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{path}: not valid JSON ({error})") from None


def log_split_run(config, frames: dict[str, pd.DataFrame], paths: dict[str, Path], tags: dict[str, str],
                  stats: dict) -> str:
    """One MLflow run `split`: each file as a dataset input (DVC md5 as digest), lineage tags."""
    import mlflow

    from pipeline.core.tracking import code_version_tags, configure_mlflow, log_dataset_input

    configure_mlflow(config.tracking)
    # MLflow warns about every pandas dataset: the local path "could be" two source types, and
    # integer columns (attempts) cannot hold NaN. Neither applies to a finished split file.
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
    with mlflow.start_run(run_name="split") as run:
        mlflow.set_tags({**code_version_tags(), Tags.STAGE: "split", **tags})
        split: SplitConfig = config.split
        mlflow.log_params({"val_size": split.val_size, "train_sizes": ",".join(map(str, split.train_sizes)),
                           "test_size": split.test_size, "seed": split.seed})
        for name, frame in frames.items():
            context = {"val": "validation", "test": "test"}.get(name, "training")
            log_dataset_input(frame, paths[name], context=context, name=name)
            mlflow.log_metrics({f"{name}.rows": stats[name]["rows"], f"{name}.flesch_mean": stats[name]["flesch_mean"]})
        return run.info.run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.split",
        description=f"Stage split: seeded validation set, nested training subsets and a held-out test set of "
        f"{PAIRS_PATH} into {SPLITS_DIR}/, disjoint by source section, no cross-split question above "
        f"generate.dedup_threshold (params: split.*). Needs a passing {DATA_QUALITY_PATH}.",
    )
    parser.add_argument("--pairs", type=Path, default=PAIRS_PATH, help="validated pairs parquet")
    parser.add_argument("--data-quality", type=Path, default=DATA_QUALITY_PATH, help="validate's summary JSON")
    parser.add_argument("--splits-dir", type=Path, default=SPLITS_DIR, help="folder for the split files")
    parser.add_argument("--metrics", type=Path, default=SPLITS_METRICS_PATH, help="scalar summary JSON (DVC metrics)")
    parser.add_argument("--report", type=Path, default=SPLITS_REPORT_PATH, help="per-split stats JSON")
    parser.add_argument("--manifest", type=Path, default=GENERATION_MANIFEST_PATH, help="generation manifest")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    verdict = check_gate(args.data_quality, args.pairs)
    manifest = read_generation_manifest(args.manifest)

    import pandas as pd

    from pipeline.core.textmetrics import load_embedder

    pairs = pd.read_parquet(args.pairs)
    split = config.split
    sections = pairs["source_id"].astype(str).tolist() if "source_id" in pairs.columns else None
    plan = plan_split(len(pairs), split.val_size, split.train_sizes, split.seed, split.test_size, split.min_test_size,
                      sections)
    plan, facts = drop_test_near_duplicates(pairs, plan, load_embedder(config.embeddings),
                                            config.generate.dedup_threshold, split.min_test_size)
    frames = split_frames(pairs, plan)
    stats = {name: split_stats(frame) for name, frame in frames.items()}
    paths = write_splits(frames, args.splits_dir)
    unused = int(len(pairs) - plan.val.size - plan.train[max(plan.train)].size - plan.test.size)
    write_json(args.report, {"pairs_rows": int(len(pairs)), "unused_rows": unused, **facts, "splits": stats})
    write_json(args.metrics, split_metrics(len(pairs), unused, stats, max(plan.train), facts))
    tags = {
        "generation_run_id": str(manifest.get("mlflow_run_id") or "unknown"),
        "pairs_md5": verdict["pairs_md5"],
        "pairs_path": args.pairs.as_posix(),
        "data_quality_success": str(verdict["success"]).lower(),
    }
    run_id = log_split_run(config, frames, paths, tags, stats)
    sizes = ", ".join(f"{name}={stat['rows']}" for name, stat in stats.items())
    print(f"split: {sizes} (seed {config.split.seed}) -> {args.splits_dir}/, stats {args.report}, MLflow run {run_id}")


if __name__ == "__main__":
    main()
