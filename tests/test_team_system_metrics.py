"""System metrics: `tracking.system_metrics` (params.yaml) switches MLflow's system metrics on for
the runs a stage starts (pipeline.core.tracking.configure_mlflow calls the switch); the Ray grid
test checks them on real training runs."""

from __future__ import annotations

import time

import pytest
import yaml

from tests.conftest import REPO_ROOT


def busy_run(tracking) -> dict:
    import mlflow

    from pipeline.core.tracking import configure_mlflow

    configure_mlflow(tracking)
    with mlflow.start_run() as run:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            sum(i * i for i in range(10_000))
    return mlflow.get_run(run.info.run_id).data.metrics


@pytest.mark.parametrize("enabled", [True, False])
def test_runs_get_system_metrics_when_the_param_says_so(mlflow_uri, monkeypatch, enabled):
    from pipeline.core.config import TrackingConfig

    # MLflow keeps the switch in these variables: set them so that monkeypatch restores them after
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", str(not enabled).lower())
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10")
    metrics = busy_run(TrackingConfig(experiment="sysmetrics", system_metrics=enabled, system_metrics_interval_s=0.5))
    system = sorted(key for key in metrics if key.startswith("system/"))
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/system_memory_usage_percentage"} <= set(system), system
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    else:
        assert system == []


def test_the_switch_is_on_in_the_demo_params():
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert params["tracking"]["system_metrics"] is True and params["tracking"]["system_metrics_interval_s"] > 0
