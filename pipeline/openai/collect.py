"""`python -m pipeline.openai --collect`: the metrics records of the models params name, for the report.

Owns: copying `reports/openai/<model>/metrics.json` of every evaluated model to
`metrics/openai/<model>.json` and naming the others as not run. Does not own: evaluation.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.io import atomic_write_bytes
from pipeline.openai.spec import COLLECTED_DIR, RUNS_DIR, model_name


def collect(config: Config, runs_dir: Path = RUNS_DIR, out_dir: Path = COLLECTED_DIR) -> list[Path]:
    """Copy the metrics records of the models params name (and that were evaluated) to
    metrics/openai/, which the report reads; models without one are shown there as not run.
    metrics/openai/summary.yaml counts them (scalars for `dvc metrics show`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.json"):
        stale.unlink()
    settings = config.openai
    names = [model_name(base) for base in settings.base_models]
    names += [model_name(base, n) for base, n in itertools.product(settings.base_models, settings.n_train)]
    written, missing = [], []
    for name in names:
        source, status_file = runs_dir / name / "metrics.json", runs_dir / name / "status.json"
        status = json.loads(status_file.read_text()).get("status") if status_file.is_file() else None
        if settings.enabled and status == "evaluated" and source.is_file():
            written.append(atomic_write_bytes(out_dir / f"{name}.json", source.read_bytes()))
        else:
            missing.append(f"{name} ({status or 'no status'})")
    # Always written, so the DVC metrics folder is never empty (an empty one reads as deleted in a
    # fresh clone); .yaml (JSON is YAML) so the report's *.json records loader skips it.
    summary = {"enabled": settings.enabled, "models_expected": len(names), "models_evaluated": len(written)}
    atomic_write_bytes(out_dir / "summary.yaml", (json.dumps(summary) + "\n").encode())
    reason = "" if settings.enabled else " (openai.enabled is false)"
    print(f"openai: {len(written)} model(s) evaluated -> {out_dir}; not run{reason}: {', '.join(missing) or 'none'}")
    return written
