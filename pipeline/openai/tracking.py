"""The MLflow side of the arm: one run per model, re-opened on resume, step metrics logged once.

Owns: `RunLog` (per-step metrics logged at most once per (key, step), even across resumes;
tags), `start_run` (re-open the recorded run or start a named one) and `first_or_rerun_keys`
(a re-run never overwrites the cost/call metrics the first run measured).
Does not own: what is logged when (jobs.py, evaluation.py, stage.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config import Config
from pipeline.core.tracking import code_version_tags, configure_mlflow

STEP_METRICS = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                "full_valid_loss", "full_valid_mean_token_accuracy")
CSV_COLUMN_NAMES = {"train_accuracy": "train_mean_token_accuracy"}  # result CSV -> event names
RERUN_PREFIX = "rerun_"


@dataclass
class RunLog:
    """The MLflow run of one model: step metrics logged once per (key, step), even on resume."""

    run_id: str
    client: Any
    logged: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def open(cls, run_id: str) -> RunLog:
        import mlflow

        client = mlflow.MlflowClient()
        log = cls(run_id, client)
        for key in STEP_METRICS:
            history = client.get_metric_history(run_id, key)
            if history:
                log.logged[key] = {metric.step for metric in history}
        return log

    def steps(self, rows: Iterable[tuple[int, dict[str, Any]]]) -> int:
        """Log {metric: value} at each step unless that (metric, step) is already logged."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for step, values in rows:
            for key, value in values.items():
                key = CSV_COLUMN_NAMES.get(key, key)
                if key not in STEP_METRICS or not is_number(value) or step in self.logged.setdefault(key, set()):
                    continue
                self.logged[key].add(step)
                batch.append(Metric(key, float(value), now, int(step)))
        for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000], synchronous=True)
        return len(batch)

    def tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value)[:5000])


def is_number(value: Any) -> bool:
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def start_run(config: Config, name: str, run_id: str | None, tags: dict[str, str]):
    """Re-open `run_id` when the store still has it, else start a run named `name`."""
    import mlflow

    configure_mlflow(config.tracking)
    if run_id:
        try:
            if mlflow.get_run(run_id).info.lifecycle_stage == "active":
                return mlflow.start_run(run_id=run_id)
        except mlflow.exceptions.MlflowException:
            pass  # deleted or another store: start a new one
    return mlflow.start_run(run_name=name, tags={**tags, **code_version_tags()})


def first_or_rerun_keys(run_id: str, metrics: dict[str, float]) -> tuple[dict[str, float], int]:
    """(metrics to log, step). What a run measured first stays: when any of these keys is already
    logged on the run (a re-run of a finished stage), they are logged as `rerun_<key>` instead,
    at step n for the n-th re-run (step 1, 2, ...), so the re-runs form a series beside the
    first run's values."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data.metrics
    if not any(key in logged for key in metrics):
        return metrics, 0
    probe = f"{RERUN_PREFIX}{next(iter(metrics))}"
    step = len(client.get_metric_history(run_id, probe)) + 1
    return {f"{RERUN_PREFIX}{key}": value for key, value in metrics.items()}, step
