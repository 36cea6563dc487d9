"""What promotion reads as evidence, and what a registered version records about where it came from.

Owns: reading metrics/eval/<model>.json into policy candidates (`load_eval_records`), the
held-out test evidence (`read_heldout`: the heldout stage's decision record and per-question
scores), the current Production version's scores on the same test questions (`incumbent_scores`:
decoded once through its registered model and cached), the
data-quality verdict for the exact pairs.parquet an adapter's training split came from
(`data_quality_verdict`: training-run tags, else the `split` run that logged the same training
file, else dvc.lock through pipeline.core.dvcmeta), and the tags a version carries
(`version_tags`, cleaned of secrets by `redact` / `clean_tags`). Does not own: the rules
(registry/policy.py), the card text (registry/card.py) or any write to the store
(registry/store.py). Reads the store through a client it is given; never writes.

Keys read from metrics/eval/<model>.json (written by the score stage through
pipeline.core.evalmetrics.metrics_record): model, kind ("base" / "lora"), mlflow_run_id,
pct_<tone.name> (+ _ci_low/_ci_high; pct_conversational for the default tone), similarity_mean,
content_similarity_mean, <style column>_mean/_median (flesch_mean, flesch_median for the default tone),
answer_words_mean, n_eval, repetition_rate, stopped_pct, n_train, lora_r, family.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import (  # noqa: F401 (promote reads DATA_QUALITY_PATH here)
    DATA_QUALITY_PATH,
    EVAL_METRICS_DIR,
    HELDOUT_DIR,
    PAIRS_PATH,
    TEST_SPLIT_PATH,
    Config,
)
from pipeline.core.contracts import Tags
from pipeline.core.decision import Scores
from pipeline.core.dvcmeta import lock_digest, locked_md5, read_lock
from pipeline.core.errors import TonetuneError
from pipeline.core.tone import on_style, tone_tags
from pipeline.core.tracking import git_commit, logged_datasets
from registry.policy import Candidate

EVAL_DIR = EVAL_METRICS_DIR
INCUMBENTS_DIR = Path("reports/incumbents")  # the Production version's test answers, decoded once per version
BASE_KIND, ADAPTER_KIND = "base", "lora"
OTHER_METRIC_KEYS = ("similarity_mean", "content_similarity_mean", "answer_words_mean", "n_eval", "repetition_rate",
                     "stopped_pct")


def metric_keys(tone) -> tuple[str, ...]:
    """The record keys a version carries as `metric.*` tags: the tone's style keys
    (pct_<name> + interval, <column>_mean/_median), then content, length and degeneration."""
    from pipeline.core.tone import style_metric_keys

    return tuple(dict.fromkeys((*style_metric_keys(tone), *OTHER_METRIC_KEYS)))


def base_metric_keys(tone) -> tuple[str, ...]:
    """The base model's record keys a version carries as `base.*` tags."""
    from pipeline.core.tone import style_metric_keys

    style = style_metric_keys(tone)
    return (style[0], *(key for key in style[3:] if key.endswith("_mean")), *(
        key for key in OTHER_METRIC_KEYS if key not in ("n_eval",)))
PARAM_KEYS = (
    "precision", "lora_r", "lora_alpha", "learning_rate", "n_train", "epochs", "effective_batch_size",
    "target_modules", "system_prompt", "seed", "base_model_id", "base_model_sha256",
)
MAX_TAG_CHARS = 5000
SECRET_NAME = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)


# --------------------------------------------------------------------------- metrics/eval


def load_eval_records(eval_dir: Path, tone_name: str = "conversational") -> tuple[dict[str, Any], list[Candidate]]:
    """(base record, adapter candidates) from metrics/eval/*.json; `tone_name`: the tone whose
    pct_<name> the records carry."""
    files = sorted(Path(eval_dir).glob("*.json"))
    if not files:
        raise TonetuneError(f"{eval_dir}: no metrics files (run `dvc repro score` first)")
    base, candidates = None, []
    for path in files:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise TonetuneError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        if record.get("kind") == BASE_KIND:
            base = record
        elif record.get("kind") == ADAPTER_KIND:
            candidates.append(Candidate.from_record(record, tone_name))
    if base is None:
        raise TonetuneError(f"{eval_dir}: no base model metrics (kind 'base')")
    if not candidates:
        raise TonetuneError(f"{eval_dir}: no adapter metrics (kind 'lora'): nothing to promote")
    return base, candidates


# --------------------------------------------------------------------------- the test set


@dataclass(frozen=True)
class Heldout:
    """What the heldout stage wrote: its decision record and the per-question test scores."""

    record: dict[str, Any]
    base: Scores
    finalist: Scores
    table: Any  # the base's scored table: the test questions, references and ids, in id order


def read_heldout(folder: Path = HELDOUT_DIR) -> Heldout:
    """reports/heldout: decision.json and the base's and the finalist's per-question scores."""
    import pandas as pd

    path = Path(folder) / "decision.json"
    if not path.is_file():
        raise TonetuneError(f"{path} not found: run `dvc repro heldout` (the base and the finalist answer the test set)")
    record = json.loads(path.read_text())
    tables = {}
    for name in ("base", record["finalist"]):
        table_path = Path(folder) / f"{name}.parquet"
        if not table_path.is_file():
            raise TonetuneError(f"{table_path} not found: re-run `dvc repro heldout`")
        tables[name] = pd.read_parquet(table_path).sort_values("id", kind="stable").reset_index(drop=True)
    return Heldout(record, Scores.from_frame("base", tables["base"]),
                   Scores.from_frame(record["finalist"], tables[record["finalist"]]), tables["base"])


def incumbent_cache_path(name: str, version: str, heldout: Heldout, numerics: dict[str, Any],
                         folder: Path = INCUMBENTS_DIR) -> Path:
    """Where a version's scored test answers are cached: one file per version, test set and machine."""
    import hashlib

    facts = hashlib.sha256(json.dumps(numerics, sort_keys=True).encode()).hexdigest()[:10]
    return Path(folder) / f"{name}-v{version}-test{str(heldout.record.get('test_md5'))[:10]}-{facts}.parquet"


def incumbent_scores(name: str, version: str, heldout: Heldout, config: Config, numerics: dict[str, Any],
                     folder: Path = INCUMBENTS_DIR) -> Scores:
    """The Production version's per-question scores on the same test questions: decoded once through
    its registered model (what it serves) and cached under `folder`, keyed by version, test set and
    the machine facts that change numerics, so a re-run with nothing changed decodes nothing."""
    import pandas as pd

    from pipeline.core.predictions import per_question_scores
    from pipeline.core.tables import write_table
    from pipeline.core.textmetrics import load_embedder

    cache = incumbent_cache_path(name, version, heldout, numerics, folder)
    if cache.is_file():
        return Scores.from_frame(f"v{version}", pd.read_parquet(cache))
    import mlflow

    questions = heldout.table["question"].astype(str).tolist()
    print(f"promote: decoding {len(questions)} test questions with Production v{version} (cached in {cache})", flush=True)
    answers = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(questions)
    frame = heldout.table[["id", "question", "reference", "factual"]].assign(
        answer=[str(answer) for answer in answers], n_tokens=-1, stopped=False)
    scored = per_question_scores(frame, load_embedder(config.embeddings), on_style(config.tone, config.judge))
    write_table(scored, cache)
    return Scores.from_frame(f"v{version}", scored)


# --------------------------------------------------------------------------- data quality


@dataclass(frozen=True)
class DataQuality:
    """The data-quality verdict for the pairs.parquet an adapter's training split came from."""

    success: bool | None  # None: no evidence found
    pairs_md5: str | None
    source: str
    generation_run_id: str | None = None

    @classmethod
    def from_version_tags(cls, tags: dict[str, str]) -> DataQuality:
        """The verdict promotion recorded on a version."""
        return cls({"true": True, "false": False}.get(tags.get(Tags.DQ_SUCCESS, "")),
                   tags.get(Tags.DQ_PAIRS_MD5), tags.get(Tags.DQ_SOURCE, "version tags"))


def training_dataset(run) -> tuple[str, str] | None:
    """(path, DVC md5) of the split the run trained on: its dataset input logged with context
    `training` (pipeline.core.tracking.log_dataset_input), None if it logged none."""
    return next(((d.path, d.dvc_md5) for d in logged_datasets(run) if d.training and d.dvc_md5), None)


def split_run_for(client, experiment_id: str, stem: str, md5: str):
    """The newest `split` run that logged a training file `stem` with this md5 (None if none)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.{Tags.STAGE} = 'split' and tags.`{Tags.dataset(stem, 'dvc_md5')}` = '{md5}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def pairs_md5_from_lock(train_path: str, md5: str, lock_path: Path) -> str | None:
    """pairs.parquet md5 that dvc.lock's `split` stage read, if dvc.lock records this train file."""
    locked = locked_md5(train_path, lock_path)
    if not locked or locked[0] != md5:
        return None
    deps = ((read_lock(lock_path).get("stages") or {}).get(locked[1]) or {}).get("deps") or []
    return next((str(dep.get("md5")) for dep in deps if dep.get("path") == PAIRS_PATH.as_posix()), None)


def read_summary(path: Path) -> dict[str, Any]:
    """validate's metrics/data_quality.json ({} when absent)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise TonetuneError(f"{path}: not valid JSON ({error.msg})") from None


def data_quality_verdict(client, run, summary_path: Path, lock_path: Path) -> DataQuality:
    """Did the data-quality gate pass for the data this run trained on?

    Evidence, most direct first: pairs_md5/data_quality_success tags on the training run; else
    the `split` run that logged the same training file (its pairs_md5 and verdict tags); else
    dvc.lock (the pairs.parquet md5 the split stage read). The verdict comes from
    metrics/data_quality.json when it is for that same pairs md5 (the file DVC tracks), else
    from the recorded tag (split only runs on data that passed).
    """
    tags = run.data.tags
    pairs_md5, recorded = tags.get(Tags.PAIRS_MD5), tags.get(Tags.DATA_QUALITY_SUCCESS)
    source, generation_run = "training run tags", None
    if not pairs_md5:
        train = training_dataset(run)
        if train is None:
            return DataQuality(None, None, "the training run records no training dataset md5")
        path, md5 = train
        split_run = split_run_for(client, run.info.experiment_id, Path(path).stem, md5)
        if split_run is not None:
            pairs_md5 = split_run.data.tags.get(Tags.PAIRS_MD5)
            recorded = split_run.data.tags.get(Tags.DATA_QUALITY_SUCCESS)
            generation_run = split_run.data.tags.get(Tags.GENERATION_RUN_ID)
            source = f"split run {split_run.info.run_id}"
        else:
            pairs_md5, recorded, source = pairs_md5_from_lock(path, md5, lock_path), None, "dvc.lock"
    if not pairs_md5:
        return DataQuality(None, None, f"no record of which pairs.parquet {run.info.run_id} was trained on")
    summary = read_summary(summary_path)
    if summary.get("pairs_md5") == pairs_md5 and "success" in summary:
        return DataQuality(bool(summary["success"]), pairs_md5, Path(summary_path).as_posix(), generation_run)
    if recorded in ("true", "false"):
        return DataQuality(recorded == "true", pairs_md5, source, generation_run)
    return DataQuality(None, pairs_md5, f"{Path(summary_path).as_posix()} is not for pairs md5 {pairs_md5}", generation_run)


# --------------------------------------------------------------------------- what a version records


def redact(text: str) -> str:
    """Replace the value of any secret-looking environment variable (…API_KEY, TOKEN, SECRET,
    PASSWORD) found in `text`: a reason typed on the command line must not leak a key."""
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 8 and value in text:
            text = text.replace(value, f"[{name} redacted]")
    return text


def clean_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as redacted strings within MLflow's length limit; None values dropped."""
    return {key: redact(str(value))[:MAX_TAG_CHARS] for key, value in tags.items() if value is not None}


def version_tags(candidate: Candidate, base: dict[str, Any], run, quality: DataQuality, config: Config,
                 decision: dict[str, Any] | None = None) -> dict[str, str]:
    """Everything a version records about where it came from (no environment, no secrets):
    validation metrics, training params, dataset md5s (the test set's too), the data-quality
    verdict, commits, and the decision's `decision.*` tags."""
    from pipeline.core.dvcmeta import file_md5

    params, run_tags = run.data.params, run.data.tags
    tags: dict[str, Any] = {
        Tags.TRAINING_RUN_ID: run.info.run_id,
        Tags.TRAINING_RUN_NAME: run.info.run_name,
        Tags.EVAL_MODEL: candidate.model,
        Tags.EXPERIMENT_ID: run.info.experiment_id,
        **{f"{Tags.METRIC_PREFIX}{key}": candidate.record.get(key) for key in metric_keys(config.tone)},
        **{f"{Tags.BASE_PREFIX}{key}": base.get(key) for key in base_metric_keys(config.tone)},
        f"{Tags.BASE_PREFIX}model": base.get("family"),
        **{f"{Tags.PARAM_PREFIX}{key}": params.get(key, candidate.record.get(key)) for key in PARAM_KEYS},
        **{key: value for key, value in run_tags.items() if Tags.parse_dataset(key)},
        # the prompts the adapter was trained with (pipeline.core.tracking.log_prompts on the training run)
        **{key: value for key, value in run_tags.items() if key.startswith(("prompt.", "prompts.", "tone.prompts"))},
        Tags.DQ_SUCCESS: None if quality.success is None else str(quality.success).lower(),
        Tags.DQ_PAIRS_MD5: quality.pairs_md5,
        Tags.DQ_SOURCE: quality.source,
        Tags.GENERATION_RUN_ID: quality.generation_run_id,
        Tags.GIT_COMMIT: run_tags.get(Tags.GIT_COMMIT) or run_tags.get(Tags.MLFLOW_GIT_COMMIT),
        Tags.PROMOTE_GIT_COMMIT: git_commit(),
        Tags.DVC_LOCK_MD5: lock_digest(),
        **tone_tags(config.tone, "", "evaluate.conversational_threshold"),
        **(decision or {}),
    }
    if decision and decision.get(Tags.decision("test_md5")):
        tags[Tags.dataset("test", "path")] = TEST_SPLIT_PATH.as_posix()
        tags[Tags.dataset("test", "dvc_md5")] = decision[Tags.decision("test_md5")]
        if TEST_SPLIT_PATH.is_file() and file_md5(TEST_SPLIT_PATH) != decision[Tags.decision("test_md5")]:
            tags[Tags.dataset("test", "matches_dvc_lock")] = "false"
    if decision and decision.get(Tags.decision("rule")):
        tags[Tags.PROMOTE_POLICY] = decision[Tags.decision("rule")]
    return clean_tags(tags)
