"""Store a real demo's test-set evidence in tests/data/demo_heldout/<NAME>/, for tests/test_decision.py.

    .venv/bin/python -m scripts.store_demo_evidence /path/to/demo/workspace epyc_fp32_default-1a037d2

Copies, from a workspace where `make demo` ran: the base's and the finalist's per-question test
scores (reports/heldout/<model>.parquet, as CSV at 8 decimals), the heldout stage's decision
record (finalist, reason, n, test md5), the promotion scalars (metrics/promotion.json), the
workspace's commit, and the machine facts the test answers were decoded under, taken from the
run's own records (reports/heldout/<model>.json `numerics`), never typed by hand: a stored CPU
that was typed once described another machine than the one that ran.

Refuses, in one line and before writing anything, a workspace without those files, records
without numerics, or a base and finalist decoded under different machine facts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline.core.machine import differing_facts

OUT_ROOT = Path("tests/data/demo_heldout")
SCORE_COLUMNS = ["id", "on_style", "similarity", "content_similarity", "repetition_rate", "stopped"]


class EvidenceError(Exception):
    """A workspace that cannot give a stored record: the message names the file and what is wrong."""


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise EvidenceError(f"{path} not found: run `make demo` in that workspace first")
    return json.loads(path.read_text())


def kernel_path(numerics: dict) -> str:
    """The kernel-path variables a run set (`default` when none), as the stored folders name them."""
    chosen = [f"{key}={numerics[key]}" for key in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if numerics.get(key)]
    return " ".join(chosen) or "default"


def evidence_record(workspace: Path) -> tuple[dict, dict[str, Path]]:
    """(the decision.json to store, {role: per-question parquet}) from a demo workspace."""
    heldout = workspace / "reports/heldout"
    decision = read_json(heldout / "decision.json")
    promotion = read_json(workspace / "metrics/promotion.json")
    models = {"base": "base", "finalist": decision["finalist"]}
    numerics = {}
    for role, model in models.items():
        facts = read_json(heldout / f"{model}.json").get("numerics")
        if not facts:
            raise EvidenceError(f"{heldout / f'{model}.json'}: no `numerics` record (decoded before machine facts were recorded)")
        numerics[role] = facts
    differing = differing_facts(numerics["base"], numerics["finalist"])
    if differing:
        raise EvidenceError(f"{heldout}: the base and the finalist were decoded under different machine facts ({', '.join(differing)})")
    commit = subprocess.run(["git", "-C", str(workspace), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    if not commit:
        raise EvidenceError(f"{workspace}: not a git checkout (the stored record names the commit that ran)")
    record = {"commit": commit, "kernel_path": kernel_path(numerics["base"]), "numerics": numerics["base"],
              "finalist": decision["finalist"], "finalist_reason": decision["finalist_reason"],
              "n_test": decision["n_test"], "test_md5": decision["test_md5"], "promotion": promotion}
    tables = {role: heldout / f"{model}.parquet" for role, model in models.items()}
    for path in tables.values():
        if not path.is_file():
            raise EvidenceError(f"{path} not found: the heldout stage did not finish in that workspace")
    return record, tables


def store(workspace: Path, name: str, out_root: Path = OUT_ROOT) -> Path:
    """Write tests/data/demo_heldout/<name>/ (refusing to overwrite one that exists); its path."""
    import pandas as pd

    out = out_root / name
    if out.exists():
        raise EvidenceError(f"{out} exists: stored evidence is not overwritten (choose another NAME)")
    record, tables = evidence_record(workspace)
    frames = {role: pd.read_parquet(path)[SCORE_COLUMNS] for role, path in tables.items()}
    out.mkdir(parents=True)
    for role, frame in frames.items():
        frame.to_csv(out / f"{role}.csv", index=False, float_format="%.8f")
    (out / "decision.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.store_demo_evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path, help="a checkout where `make demo` ran to the end")
    parser.add_argument("name", help="folder name: <machine>_<recipe>_<kernel path>[-<commit>], e.g. epyc_fp32_default-1a037d2")
    args = parser.parse_args(argv)
    try:
        out = store(args.workspace, args.name)
    except EvidenceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"stored {out}: " + json.dumps(json.loads((out / 'decision.json').read_text())["promotion"]))


if __name__ == "__main__":
    main()
