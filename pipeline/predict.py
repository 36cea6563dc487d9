"""Stage `predict`: every model answers every validation question, as it will be served.

    python -m pipeline.predict [--models a,b] [--limit N] [--all-adapters]

Models (paper section 2.4, appendix A.5):

- `base`: the base model with the paper's verbose system prompt (the prompting condition), in
  `evaluate.base_precision`;
- each adapter in models/adapters/<run-name>/ of the current `train.grid`, with the prompt it was
  trained with (recorded in its tonetune_adapter.json), in the precision it was trained in, which
  is the precision the registered model serves it in (int8 adapters on the 8-bit base, bf16 on
  the bf16 base). Folders left over from an older grid are skipped (`--all-adapters` includes them).

The base is loaded once per precision group and adapters are switched on it
(pipeline.core.modeling.AdapterSwitcher). Every model decodes under the one policy
(`evaluate.decoding` + `evaluate.max_new_tokens`) and the one decoding shape (`evaluate.batch_size`
rows per forward, prompts padded to a multiple of `evaluate.bucket_tokens`) through
pipeline.core.modeling.generate_answers, the call the registered model's `predict` makes. That
path is batch-invariant: each answer depends only on the model, the question and the policy (on
this machine, kernel path and thread count), so the registered model gives a question the
evaluated answer whether it comes alone or with any other questions. An adapter whose training
recorded another serving policy or shape is refused (re-run train: the logged model carries them).

Decoding ablation (`evaluate.ablation_limit` > 0 and a policy other than plain greedy): every model
also answers the first N questions under plain greedy decoding, to
reports/predictions/ablation/<model>.parquet; the score stage puts both side by side. Both come
from one call per model (`answer_question_sets`), whose slabs mix the two policies' rows: no
answer changes, and fewer filler rows are decoded. Each record's `seconds` is its share of the
slabs.

Writes, per model: reports/predictions/<model>.parquet (id, question, reference, answer, n_tokens,
stopped) and reports/predictions/<model>.json (who answered how: kind, precision, prompt, decoding
policy and shape, timing, grid point, training run id, and `numerics`: the machine facts that
change the numbers, pipeline.core.machine.numerics_facts). No scoring and no MLflow here: the
score stage reads these files, so changing a scoring param re-runs only scoring.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.adapterinfo import (
    adapter_metadata,
    discover_adapters,
    model_family,
    select_adapters,
)
from pipeline.core.config import ADAPTERS_DIR, BASE_MODEL_DIR, VAL_SPLIT_PATH, Config, load_config
from pipeline.core.contracts import grid_adapter_names
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.machine import numerics_facts
from pipeline.core.modeling import (
    DEFAULT_BUCKET_TOKENS,
    AdapterSwitcher,
    DecodingPolicy,
    answer_question_sets,
    end_of_turn_ids,
    load_for_inference,
    require_bitsandbytes,
)
from pipeline.core.modelspec import ModelSpec, adapter_spec, base_spec, check_base_model, precision_groups
from pipeline.core.predictions import PREDICTIONS_DIR, GenerationResult, read_validation
from pipeline.core.prompts import TonePrompts, prompt_version, system_prompts
from pipeline.core.system_prompts import DEFAULT_DESCRIPTION, DEFAULT_PROMPTS_DIR
from pipeline.core.tables import write_table

if TYPE_CHECKING:
    import pandas as pd

ABLATION_DIRNAME = "ablation"


def model_specs(adapters: Sequence[Path], only: set[str] | None, base_precision: str,
                texts: TonePrompts | None = None) -> list[ModelSpec]:
    """The base model first (with the tone's verbose prompt), then each adapter (with the prompt
    it recorded), filtered by `--models` if given."""
    texts = texts or TonePrompts.load(DEFAULT_PROMPTS_DIR, DEFAULT_DESCRIPTION, ("system_verbose", "system_concise"))
    specs = [base_spec(base_precision, texts.system_prompt("verbose"))]
    specs += [adapter_spec(path, texts.system_prompt("concise")) for path in adapters]
    if only:
        unknown = only - {spec.name for spec in specs}
        if unknown:
            raise TonetuneError(f"--models: no such model(s) {sorted(unknown)}; available: {[s.name for s in specs]}")
        specs = [spec for spec in specs if spec.name in only]
    return specs


def check_serving_policy(spec: ModelSpec, policy: DecodingPolicy, batch_size: int, bucket_tokens: int) -> None:
    """Refuse an adapter whose logged model would answer differently from this evaluation."""
    recorded = spec.record.get("decoding")
    if recorded is not None and DecodingPolicy.from_dict(recorded) != policy:
        raise TonetuneError(
            f"{spec.adapter_dir}: its registered model decodes with ({DecodingPolicy.from_dict(recorded).describe()}), "
            f"but evaluate.decoding is ({policy.describe()}); re-run `dvc repro train` so serving and evaluation agree"
        )
    if spec.record.get("batch_size") not in (None, batch_size):
        raise TonetuneError(
            f"{spec.adapter_dir}: its registered model answers in batches of {spec.record['batch_size']}, but "
            f"evaluate.batch_size is {batch_size}; re-run `dvc repro train` so serving and evaluation agree"
        )
    if spec.record.get("bucket_tokens", DEFAULT_BUCKET_TOKENS) != bucket_tokens and "batch_size" in spec.record:
        raise TonetuneError(
            f"{spec.adapter_dir}: its registered model pads prompts to multiples of "
            f"{spec.record.get('bucket_tokens', DEFAULT_BUCKET_TOKENS)} tokens, but evaluate.bucket_tokens is "
            f"{bucket_tokens}; re-run `dvc repro train` so serving and evaluation agree"
        )


def clear_outputs(folder: Path = PREDICTIONS_DIR) -> None:
    """Remove the previous run's files so a deleted adapter leaves no stale predictions behind."""
    for pattern in ("*.parquet", "*.json", f"{ABLATION_DIRNAME}/*.parquet"):
        for path in folder.glob(pattern):
            path.unlink()


def predictions_frame(validation: pd.DataFrame, result: GenerationResult) -> pd.DataFrame:
    """The unscored predictions table: [id,] question, reference, answer, n_tokens, stopped[, factual]."""
    import pandas as pd

    frame = pd.DataFrame({
        "question": validation["question"].astype(str).tolist(),
        "reference": validation["answer"].astype(str).tolist(),
        "answer": result.answers,
        "n_tokens": result.n_tokens,
        "stopped": result.stopped,
    })
    if "factual_answer" in validation.columns:  # the content without the tone: what the content metric reads
        frame["factual"] = validation["factual_answer"].astype(str).tolist()
    if "id" in validation.columns:
        frame.insert(0, "id", validation["id"].astype(str).tolist())
    return frame


def prediction_record(spec: ModelSpec, family: str, policy: DecodingPolicy, batch_size: int,
                      result: GenerationResult, started: float, ablation: dict[str, Any] | None,
                      bucket_tokens: int = DEFAULT_BUCKET_TOKENS) -> dict[str, Any]:
    """reports/predictions/<model>.json: everything the score stage and MLflow need to know."""
    record: dict[str, Any] = {
        "model": spec.name,
        "kind": spec.kind,
        "family": family,
        "precision": spec.precision,
        "system_prompt": spec.system_prompt_name,
        "system_prompt_version": prompt_version(spec.system_prompt),
        "decoding": policy.to_dict(),
        "batch_size": batch_size,
        "bucket_tokens": bucket_tokens,
        "n_questions": len(result.answers),
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_second, 3),
        "started_at_ms": int(started * 1000),
        "ended_at_ms": int(time.time() * 1000),
        "numerics": numerics_facts(),
    }
    if spec.adapter_dir is not None:
        record["adapter_dir"] = spec.adapter_dir.as_posix()
        record["metadata"] = adapter_metadata(spec.adapter_dir)
        if spec.record.get("mlflow_run_id"):
            record["training_run_id"] = spec.record["mlflow_run_id"]
    if ablation:
        record["ablation"] = ablation
    return record


def describe(spec: ModelSpec, result: GenerationResult) -> str:
    """One progress line per model."""
    ended = 100.0 * sum(result.stopped) / max(len(result.stopped), 1)
    return (f"predict: {spec.name} ({spec.precision}): {len(result.answers)} answers, {ended:.0f}% ended their turn, "
            f"{result.seconds:.0f} s, {result.tokens_per_second:.1f} tokens/s")


def run_group(precision: str, specs: Sequence[ModelSpec], config: Config, validation: pd.DataFrame,
              policy: DecodingPolicy, family: str, folder: Path) -> None:
    """Load the base once in `precision` and answer with each of `specs` on it."""
    settings = config.evaluate
    if precision == "int8":
        require_bitsandbytes()
    model, tokenizer = load_for_inference(BASE_MODEL_DIR, precision, config.train.int8_threshold, settings.device)
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    switcher = AdapterSwitcher(model, precision)
    questions = validation["question"].astype(str).tolist()
    greedy = DecodingPolicy.greedy(policy.max_new_tokens)
    n_ablation = min(settings.ablation_limit, len(questions)) if policy != greedy else 0
    for spec in specs:
        started = time.time()
        requests = [(questions, policy)] + ([(questions[:n_ablation], greedy)] if n_ablation else [])
        label = f"predict {spec.name}" + (f" (+{n_ablation} ablation)" if n_ablation else "")
        with switcher.activate(spec.name, spec.adapter_dir) as active:
            # one call: the ablation's plain-greedy rows share slabs with the policy's rows
            # (pipeline.core.modeling.plan_slabs); no answer depends on its neighbours
            result, *ablated = answer_question_sets(active, tokenizer, requests, spec.system_prompt,
                                                    settings.batch_size, stop_ids, progress=label,
                                                    bucket_tokens=settings.bucket_tokens)
        ablation = None
        if ablated:
            greedy_result = ablated[0]
            write_table(predictions_frame(validation.head(n_ablation), greedy_result),
                        folder / ABLATION_DIRNAME / f"{spec.name}.parquet")
            ablation = {"decoding": greedy.to_dict(), "n_questions": n_ablation,
                        "seconds": round(greedy_result.seconds, 3)}
        write_table(predictions_frame(validation, result), folder / f"{spec.name}.parquet")
        record = prediction_record(spec, family, policy, settings.batch_size, result, started, ablation,
                                   settings.bucket_tokens)
        (folder / f"{spec.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(describe(spec, result), flush=True)
    del switcher, model
    gc.collect()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Stage predict: answer the validation split with the base model (verbose prompt) and "
        f"every adapter in {ADAPTERS_DIR} (concise prompt), each in its serving precision, under the decoding "
        f"policy evaluate.decoding; write {PREDICTIONS_DIR}/<model>.parquet + .json (params: evaluate.*).",
    )
    parser.add_argument("--models", help="comma-separated subset of models to run (default: all)")
    parser.add_argument("--limit", type=int, help="only the first N questions (overrides evaluate.limit)")
    parser.add_argument("--all-adapters", action="store_true",
                        help="also run adapter folders that the current train.grid does not produce")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    policy = DecodingPolicy.for_evaluation(config.evaluate)
    check_base_model(BASE_MODEL_DIR)
    validation = read_validation(VAL_SPLIT_PATH, args.limit or config.evaluate.limit)
    only = {name.strip() for name in args.models.split(",") if name.strip()} if args.models else None
    adapters, leftovers = select_adapters(
        discover_adapters(ADAPTERS_DIR), grid_adapter_names(config.train), args.all_adapters or bool(only)
    )
    if leftovers:
        print(f"predict: skipping {len(leftovers)} adapter(s) not in train.grid (--all-adapters to include): "
              + ", ".join(p.name for p in leftovers))
    specs = model_specs(adapters, only, config.evaluate.base_precision, system_prompts(config.tone))
    for spec in specs:
        if spec.adapter_dir is not None:
            check_serving_policy(spec, policy, config.evaluate.batch_size, config.evaluate.bucket_tokens)
    family = model_family(BASE_MODEL_DIR)
    if only is None:
        clear_outputs()
    PREDICTIONS_DIR.mkdir(parents=True, exist_ok=True)
    print(f"predict: {len(validation)} questions x {len(specs)} model(s) on {family}, decoding: {policy.describe()}")
    for precision, group in precision_groups(specs):
        run_group(precision, group, config, validation, policy, family, PREDICTIONS_DIR)


if __name__ == "__main__":
    main()
