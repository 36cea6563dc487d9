"""`python -m registry replay`: does the served model give the answers that were evaluated?

A registry is for audit: "version 3 answered X to question Q" must be reproducible from version 3
and Q alone. This command re-asks every question a model was evaluated on (validation, in
reports/predictions/<model>.parquet, and the test set, in reports/heldout/<model>.parquet when the
model was the finalist) through the model as MLflow serves it (`mlflow.pyfunc.load_model`), once
with each question sent alone and once with all of them in one shuffled request, and counts the
answers that are byte-identical to the evaluated ones.

The target is a registered version (`models:/<name>@<alias>`, `models:/<name>/<version>`) or the
name of an evaluated adapter (`lora-fp32-r32-lr0.0003-n150`): its training run logged the same
pyfunc, so a model that the rule never registered can be audited too.

Answers are promised identical for the same machine facts (pipeline.core.machine.numerics_facts:
library versions, threads, CPU ISA and its caps); where the evaluation recorded different facts,
the report says which differ before it counts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.config import HELDOUT_DIR, PREDICTIONS_DIR
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError
from pipeline.core.machine import differing_facts
from registry.model_lineage import parse_model_uri
from registry.store import get_version, version_by_alias

SHUFFLE_SEED = 0


@dataclass
class EvaluatedSet:
    """The questions one model was evaluated on, in one split, with the answers it gave then."""

    split: str
    ids: list[str]
    questions: list[str]
    answers: list[str]
    numerics: dict[str, Any]


@dataclass
class ReplayCount:
    """How many replayed answers are byte-identical to the evaluated ones, per split and mode."""

    split: str
    n: int
    same_alone: int | None = None
    same_shuffled: int | None = None
    differing_ids: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.same_alone is not None:
            parts.append(f"{self.same_alone}/{self.n} identical sent alone")
        if self.same_shuffled is not None:
            parts.append(f"{self.same_shuffled}/{self.n} identical in one shuffled request of {self.n}")
        shown = ", ".join(self.differing_ids[:10]) + (" ..." if len(self.differing_ids) > 10 else "")
        return f"{self.split}: " + ", ".join(parts) + (f"; differing ids: {shown}" if self.differing_ids else "")


def _read_set(split: str, table_path: Path, record_path: Path, limit: int | None) -> EvaluatedSet:
    import pandas as pd

    table = pd.read_parquet(table_path)
    if limit is not None:
        table = table.head(limit)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    return EvaluatedSet(split, table["id"].astype(str).tolist(), table["question"].astype(str).tolist(),
                        table["answer"].astype(str).tolist(), record.get("numerics") or {})


def evaluated_sets(model: str, limit: int | None = None, predictions_dir: Path = PREDICTIONS_DIR,
                   heldout_dir: Path = HELDOUT_DIR) -> list[EvaluatedSet]:
    """Validation (always) and test (when this model was the heldout finalist) answers of `model`."""
    val_table = Path(predictions_dir) / f"{model}.parquet"
    if not val_table.is_file():
        raise TonetuneError(f"{val_table} not found: `{model}` has no evaluated answers here (run `dvc repro predict`)")
    sets = [_read_set("validation", val_table, Path(predictions_dir) / f"{model}.json", limit)]
    test_table = Path(heldout_dir) / f"{model}.parquet"
    if test_table.is_file():
        sets.append(_read_set("test", test_table, Path(heldout_dir) / f"{model}.json", limit))
    return sets


def resolve_target(client, target: str, predictions_dir: Path = PREDICTIONS_DIR) -> tuple[str, str]:
    """(model URI to load, evaluated model name) for a registry URI or an evaluated adapter's name."""
    if target.startswith("models:/"):
        version = registered_version(client, target)
        name = version.name
        run = client.get_run(version.run_id)
        model = run.data.tags.get("mlflow.runName") or version.tags.get(Tags.TRAINING_RUN_NAME)
        if not model:
            raise TonetuneError(f"{target}: its training run {version.run_id} has no run name to find its answers by")
        return f"models:/{name}/{version.version}", model
    return adapter_model_uri(client, target, predictions_dir), target


def registered_version(client, uri: str, explain_missing_alias: Callable[[str, str], str] | None = None):
    """The ModelVersion `models:/<name>@<alias>` or `models:/<name>/<version>` names; one-line
    errors when there is none. `explain_missing_alias(name, alias)`, called only then, says why
    and what to do instead (default: see the registry's list)."""
    name, alias, number = parse_model_uri(uri)
    if not alias:
        return get_version(client, name, number)
    version = version_by_alias(client, name, alias)
    if version is None:
        why = f": {explain_missing_alias(name, alias)}" if explain_missing_alias else " (see `python -m registry list`)"
        raise TonetuneError(f"{uri}: {name} has no version with alias {alias}{why}")
    return version


def adapter_model_uri(client, adapter: str, predictions_dir: Path = PREDICTIONS_DIR) -> str:
    """The model URI an evaluated adapter's training run logged (its `Tags.ADAPTER_MODEL_URI`),
    found through the run id its predictions record names; one-line errors otherwise."""
    record_path = Path(predictions_dir) / f"{adapter}.json"
    if not record_path.is_file():
        raise TonetuneError(f"{adapter}: neither a models:/ URI nor an evaluated model ({record_path} not found)")
    run_id = json.loads(record_path.read_text()).get("training_run_id")
    if not run_id:
        raise TonetuneError(f"{adapter}: {record_path} names no training run (the base model is not served)")
    uri = client.get_run(run_id).data.tags.get(Tags.ADAPTER_MODEL_URI)
    if not uri:
        raise TonetuneError(f"{adapter}: training run {run_id} logged no model (tag {Tags.ADAPTER_MODEL_URI} missing)")
    return uri


def numerics_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: recorded -> current` for every machine fact that differs (keys missing on one side too)."""
    return [f"{key}: {recorded.get(key)!r} -> {current.get(key)!r}" for key in differing_facts(recorded, current)]


def replay_set(predict, evaluated: EvaluatedSet, alone: bool = True, shuffled: bool = True,
               seed: int = SHUFFLE_SEED, progress: bool = True) -> ReplayCount:
    """Re-ask `evaluated`'s questions through `predict` (list[str] -> list[str]) and count answers
    that are byte-identical to the evaluated ones: one request per question, then one request
    with every question in a seeded random order."""
    count = ReplayCount(evaluated.split, len(evaluated.questions))
    differing: set[str] = set()
    if alone:
        from tqdm.auto import tqdm

        same = 0
        for qid, question, answer in tqdm(list(zip(evaluated.ids, evaluated.questions, evaluated.answers, strict=True)),
                                          desc=f"replay {evaluated.split} alone", unit="q", disable=not progress):
            if str(predict([question])[0]) == answer:
                same += 1
            else:
                differing.add(qid)
        count.same_alone = same
    if shuffled:
        order = list(range(len(evaluated.questions)))
        random.Random(seed).shuffle(order)
        replies = predict([evaluated.questions[i] for i in order])
        same = 0
        for position, index in enumerate(order):
            if str(replies[position]) == evaluated.answers[index]:
                same += 1
            else:
                differing.add(evaluated.ids[index])
        count.same_shuffled = same
    count.differing_ids = sorted(differing)
    return count


def run_replay(target: str, limit: int | None, alone: bool, shuffled: bool, config) -> list[ReplayCount]:
    """Resolve `target`, load its pyfunc, replay every evaluated split, print and return the counts."""
    import mlflow

    from pipeline.core.machine import numerics_facts
    from pipeline.core.tracking import open_client

    if limit is not None and limit < 1:
        raise TonetuneError(f"--limit {limit}: must be a positive number of questions")
    if not (alone or shuffled):
        raise TonetuneError("--no-alone and --no-shuffled together leave nothing to replay")
    client = open_client(config.tracking)
    uri, model = resolve_target(client, target)
    sets = evaluated_sets(model, limit)
    print(f"replay: {uri} (evaluated as {model}); " + ", ".join(f"{s.split} {len(s.questions)} questions" for s in sets),
          flush=True)
    loaded = mlflow.pyfunc.load_model(uri)
    current = numerics_facts()
    counts = []
    for evaluated in sets:
        differences = numerics_differences(evaluated.numerics, current)
        if differences:
            print(f"  {evaluated.split}: evaluated on other machine facts, so answers may differ: " + "; ".join(differences))
        count = replay_set(loaded.predict, evaluated, alone, shuffled)
        print(f"  {count.describe()}", flush=True)
        counts.append(count)
    return counts
