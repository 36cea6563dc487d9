"""Stage `heldout`: the base and the one finalist answer the held-out test set; nothing else does.

    python -m pipeline.heldout [--no-decode]

1. The finalist is chosen on validation (metrics/eval from the score stage) by
   pipeline.core.decision.choose_finalist: exactly one adapter, so no correction for several
   comparisons is needed, and no other grid point ever answers a test question.
2. The promotion rule (params.yaml `promote`) must be committed: a margin changed after looking at
   test answers is no margin. The stage refuses to decode when the working tree's rule is not
   the one in HEAD, and records the declaring commit (pipeline.core.declaration).
3. The base (verbose prompt, `evaluate.base_precision`) and the finalist (its training prompt and
   precision, as served) answer data/splits/test.parquet through pipeline.core.modeling, under the
   one decoding policy; each answer is scored per question (pipeline.core.predictions.
   per_question_scores: on-style, similarity to the reference and to the factual answer,
   repetition, ended turn).
4. The finalist's checks against the base (pipeline.core.decision.checks_against_base) and the
   power of this test set at the validation SDs are written for the report and promotion.

Writes reports/heldout/<model>.parquet (per-question scores), reports/heldout/<model>.json (who
answered how, with the machine facts that change numerics), reports/heldout/decision.json (the
finalist, why, the rule, its declaring commit, the test set's md5, the checks, the power) and
metrics/heldout.json (scalars for `dvc exp show`). No MLflow here: promotion records the decision.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pipeline.core.adapterinfo import model_family
from pipeline.core.config import (
    ADAPTERS_DIR,
    BASE_MODEL_DIR,
    HELDOUT_DIR,
    METRICS_DIR,
    TEST_SPLIT_PATH,
    Config,
    load_config,
)
from pipeline.core.decision import (
    VERDICT_CODES,
    Rule,
    Scores,
    checks_against_base,
    choose_finalist,
    design_power,
    verdict,
)
from pipeline.core.declaration import declared_rule
from pipeline.core.dvcmeta import file_md5
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import write_json
from pipeline.core.machine import numerics_facts
from pipeline.core.modeling import (
    AdapterSwitcher,
    DecodingPolicy,
    answer_questions,
    end_of_turn_ids,
    load_for_inference,
    require_bitsandbytes,
)
from pipeline.core.modelspec import (
    BASE_NAME,
    ModelSpec,
    adapter_spec,
    base_spec,
    check_base_model,
    precision_groups,
)
from pipeline.core.predictions import EVAL_METRICS_DIR, SCORES_DIR, per_question_scores
from pipeline.core.prompts import prompt_version, system_prompts
from pipeline.core.tables import read_table, write_table
from pipeline.core.textmetrics import load_embedder
from pipeline.core.tone import Criteria, on_style, style_key

DECISION_FILE = "decision.json"
HELDOUT_METRICS_PATH = METRICS_DIR / "heldout.json"
TEST_COLUMNS = ("id", "question", "answer", "factual_answer")


def read_eval_metrics(folder: Path = EVAL_METRICS_DIR) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(base record, adapter records) of the validation scores (metrics/eval/*.json)."""
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    base = next((r for r in records if r.get("kind") == "base"), None)
    if base is None:
        raise TonetuneError(f"{folder}: no base model metrics (run `dvc repro score` first)")
    return base, [r for r in records if r.get("kind") == "lora"]


def read_test(path: Path = TEST_SPLIT_PATH):
    """The test split, in id order (the order every model's scores are paired in)."""
    frame = read_table(path, TEST_COLUMNS, "the test split; run `dvc repro split` first")
    if frame.empty:
        raise TonetuneError(f"{path}: the test split is empty")
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def decode(specs: list[ModelSpec], config: Config, questions: list[str]) -> dict[str, Any]:
    """Answers of each spec to `questions` (one base load per precision, adapters switched on it)."""
    policy = DecodingPolicy.for_evaluation(config.evaluate)
    results = {}
    for precision, group in precision_groups(specs):
        if precision == "int8":
            require_bitsandbytes()
        model, tokenizer = load_for_inference(BASE_MODEL_DIR, precision, config.train.int8_threshold,
                                              config.evaluate.device)
        stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
        switcher = AdapterSwitcher(model, precision)
        for spec in group:
            with switcher.activate(spec.name, spec.adapter_dir) as active:
                results[spec.name] = answer_questions(active, tokenizer, questions, spec.system_prompt, policy,
                                                      config.evaluate.batch_size, stop_ids,
                                                      progress=f"heldout {spec.name}",
                                                      bucket_tokens=config.evaluate.bucket_tokens)
            print(f"heldout: {spec.name} ({precision}) answered {len(questions)} test questions in "
                  f"{results[spec.name].seconds:.0f} s", flush=True)
    return results


def answers_frame(test, result):
    """The unscored table every model's test answers go into (the pairing key is `id`)."""
    import pandas as pd

    return pd.DataFrame({
        "id": test["id"].astype(str).tolist(),
        "question": test["question"].astype(str).tolist(),
        "reference": test["answer"].astype(str).tolist(),
        "factual": test["factual_answer"].astype(str).tolist(),
        "answer": result.answers,
        "n_tokens": result.n_tokens,
        "stopped": result.stopped,
    })


def validation_sds(finalist: str, criteria: Criteria | float, content_metric: str,
                   folder: Path = SCORES_DIR) -> tuple[float, float]:
    """Per-question SDs of the paired differences (finalist minus base) on validation, where
    looking is allowed: what the power statement assumes for the content metric and for style
    (points). Read from the score stage's tables."""
    import numpy as np

    if not isinstance(criteria, Criteria):
        criteria = Criteria.flesch_at_least(float(criteria))
    columns = ("id", *criteria.columns, "similarity", "content_similarity")
    base = read_table(folder / f"{BASE_NAME}.parquet", columns, "run `dvc repro score`").set_index("id")
    other = read_table(folder / f"{finalist}.parquet", columns, "run `dvc repro score`").set_index("id")
    other = other.loc[base.index]
    content = (other[content_metric] - base[content_metric]).to_numpy(dtype=float)
    style = 100.0 * (criteria.mask(other).astype(float) - criteria.mask(base).astype(float))
    return float(np.nanstd(content, ddof=1)), float(np.std(style, ddof=1))


def heldout_metrics(decision: dict[str, Any]) -> dict[str, Any]:
    """Scalars for `dvc exp show` (strings and lists stay in reports/heldout/decision.json)."""
    values: dict[str, Any] = {"n_test": decision["n_test"],
                              "verdict_vs_base": VERDICT_CODES[decision["verdict_vs_base"]]}
    for check in decision["checks"]:
        values[f"{check['name']}_estimate"] = round(check["estimate"], 4)
        values[f"{check['name']}_bound"] = round(check["bound"], 4)
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.heldout",
        description=f"Stage heldout: choose one finalist on validation ({EVAL_METRICS_DIR}), then the base and "
        f"the finalist answer {TEST_SPLIT_PATH}; per-question scores and the checks of the promotion rule "
        f"(params: promote.*, evaluate.*) -> {HELDOUT_DIR}/ and {HELDOUT_METRICS_PATH}.",
    )
    parser.add_argument("--no-decode", action="store_true",
                        help="re-score the answers already in reports/heldout (no model is loaded)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    rule = Rule.from_config(config.promote)
    declaration = declared_rule(config.promote.model_dump())
    if declaration is None:
        raise TonetuneError(
            "the promotion rule in params.yaml `promote` is not the committed one: commit it (`git commit "
            "params.yaml`) before any model answers a test question"
        )
    base_record, adapter_records = read_eval_metrics()
    key = style_key(config.tone)
    criteria = on_style(config.tone, config.judge).check()
    finalist = choose_finalist(base_record, adapter_records, rule, key)
    if finalist.model is None:
        raise TonetuneError(f"{EVAL_METRICS_DIR}: {finalist.reason}: nothing to test")
    check_base_model(BASE_MODEL_DIR)
    test = read_test()
    texts = system_prompts(config.tone)
    specs = [base_spec(config.evaluate.base_precision, texts.system_prompt("verbose")),
             adapter_spec(ADAPTERS_DIR / finalist.model, texts.system_prompt("concise"))]
    HELDOUT_DIR.mkdir(parents=True, exist_ok=True)
    frames = {}
    if args.no_decode:
        frames = {spec.name: read_table(HELDOUT_DIR / f"{spec.name}.parquet", ("id", "answer", "n_tokens", "stopped"))
                  .drop(columns=[*dict.fromkeys(("flesch", *criteria.columns)), "on_style", "similarity", "content_similarity", "repetition_rate"],
                        errors="ignore") for spec in specs}
    else:
        for stale in [*HELDOUT_DIR.glob("*.parquet"), *HELDOUT_DIR.glob("*.json")]:
            stale.unlink()
        started = time.time()
        results = decode(specs, config, test["question"].astype(str).tolist())
        for spec in specs:
            frames[spec.name] = answers_frame(test, results[spec.name])
            write_json(HELDOUT_DIR / f"{spec.name}.json", {"model": spec.name, "kind": spec.kind, "precision": spec.precision,
                        "system_prompt": spec.system_prompt_name,
                        "system_prompt_version": prompt_version(spec.system_prompt), "role": "base" if spec.name == BASE_NAME else "finalist",
                        "decoding": DecodingPolicy.for_evaluation(config.evaluate).to_dict(),
                        "seconds": round(results[spec.name].seconds, 3), "started_at_ms": int(started * 1000),
                        "numerics": numerics_facts()})
    embedder = load_embedder(config.embeddings)
    scores = {}
    for name, frame in frames.items():
        scored = per_question_scores(frame, embedder, criteria)
        write_table(scored, HELDOUT_DIR / f"{name}.parquet")
        scores[name] = Scores.from_frame(name, scored)
    checks = checks_against_base(scores[finalist.model], scores[BASE_NAME], rule)
    finalist_record = next(r for r in adapter_records if r["model"] == finalist.model)
    content_sd, style_sd = validation_sds(finalist.model, criteria, rule.content_metric)
    style_gain_val = float(finalist_record.get(key) or 0) - float(base_record.get(key) or 0)
    decision = {
        "finalist": finalist.model, "finalist_reason": finalist.reason, "screened": finalist.screened,
        "family": model_family(BASE_MODEL_DIR), "n_test": scores[BASE_NAME].n,
        "test_md5": file_md5(TEST_SPLIT_PATH), "test_path": TEST_SPLIT_PATH.as_posix(),
        "rule": rule.declared(), "rule_text": rule.describe(), "bootstrap_samples": rule.bootstrap_samples,
        "seed": rule.seed, "declared_in": declaration.commit, "declared_at": declaration.date,
        "checks": [check.to_dict() for check in checks], "verdict_vs_base": verdict(checks),
        "power": design_power(scores[BASE_NAME].n, rule, content_sd, style_sd, style_gain_val),
        "power_assumes": {"content_sd": content_sd, "style_sd": style_sd, "style_gain": style_gain_val,
                          "source": "validation (metrics/eval)"},
    }
    write_json(HELDOUT_DIR / DECISION_FILE, decision)
    write_json(HELDOUT_METRICS_PATH, heldout_metrics(decision))
    print(f"heldout: finalist {finalist.model} ({finalist.reason}); {scores[BASE_NAME].n} test questions; "
          f"vs base: {decision['verdict_vs_base']}", flush=True)
    for check in checks:
        print(f"  {check.describe()}", flush=True)


if __name__ == "__main__":
    main()
