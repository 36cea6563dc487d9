"""Stage `split`: a validation set and nested training subsets of the validated pairs.

One seeded permutation of the rows of data/generated/pairs.parquet decides everything:
validation = its first `split.val_size` rows, the training pool = the rest, and train_N = the
first N rows of the pool. So every training subset is contained in the next larger one (the
paper's 100 in 1,000 in 5,000 in 9,000) and none shares a row with validation, and the same
file and seed always give the same splits. Rows keep their permuted order, so train_N is a
prefix of every larger train file.

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


def plan_split(n_rows: int, val_size: int, train_sizes: list[int], seed: int) -> SplitPlan:
    """Pure: positions for val and nested train subsets from one seeded permutation.

    Raises TonetuneError, giving available vs needed rows, when the file is too small.
    """
    import numpy as np

    largest = max(train_sizes)
    needed = val_size + largest
    if n_rows < needed:
        raise TonetuneError(
            f"split needs {needed} rows (split.val_size {val_size} + largest split.train_sizes "
            f"{largest}) but pairs has only {n_rows}: generate more (generate.target_pairs) "
            "or lower the split sizes"
        )
    order = np.random.default_rng(seed).permutation(n_rows)
    pool = order[val_size:]
    return SplitPlan(val=order[:val_size], train={size: pool[:size] for size in sorted(train_sizes)})


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
    """Name -> rows of that split, in permuted order ("val", "train_<N>")."""
    frames = {"val": pairs.iloc[plan.val].reset_index(drop=True)}
    for size, positions in plan.train.items():
        frames[f"train_{size}"] = pairs.iloc[positions].reset_index(drop=True)
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


def split_metrics(pairs_rows: int, unused_rows: int, stats: dict[str, dict], largest: int) -> dict:
    """The DVC metrics: a few scalars with fixed names (growing split.train_sizes adds no
    columns to `dvc exp show`); the per-split table is in reports/splits.json."""
    val, train = stats["val"], stats[f"train_{largest}"]
    return {
        "pairs_rows": int(pairs_rows),
        "unused_rows": int(unused_rows),
        "val_rows": val["rows"],
        "val_flesch_mean": val["flesch_mean"],
        "train_largest_rows": train["rows"],
        "train_largest_flesch_mean": train["flesch_mean"],
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
                           "seed": split.seed})
        for name, frame in frames.items():
            log_dataset_input(frame, paths[name], context="validation" if name == "val" else "training", name=name)
            mlflow.log_metrics({f"{name}.rows": stats[name]["rows"], f"{name}.flesch_mean": stats[name]["flesch_mean"]})
        return run.info.run_id


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.split",
        description=f"Stage split: seeded validation set and nested training subsets of {PAIRS_PATH} "
        f"into {SPLITS_DIR}/ (params: split.*). Needs a passing {DATA_QUALITY_PATH}.",
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

    pairs = pd.read_parquet(args.pairs)
    plan = plan_split(len(pairs), config.split.val_size, config.split.train_sizes, config.split.seed)
    frames = split_frames(pairs, plan)
    stats = {name: split_stats(frame) for name, frame in frames.items()}
    paths = write_splits(frames, args.splits_dir)
    unused = int(len(pairs) - plan.val.size - max(plan.train))
    write_json(args.report, {"pairs_rows": int(len(pairs)), "unused_rows": unused, "splits": stats})
    write_json(args.metrics, split_metrics(len(pairs), unused, stats, max(plan.train)))
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
