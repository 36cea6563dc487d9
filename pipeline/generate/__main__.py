"""Stage `generate`: wire params, backend, cache, engine, outputs and one MLflow run.

    python -m pipeline.generate [--sections PATH] [--output-dir DIR] [--cache PATH]

Reads data/source/sections.parquet and writes data/generated/{pairs.parquet, ledger.jsonl,
manifest.json}; every API response is kept in data/cache/responses.jsonl (never deleted), so
re-running after a crash pays only for the requests that were in flight. With
`generate.backend: openai` the API key is read from the environment variable that
`generate.client.api_key_env` names; it is passed to the HTTP client and nowhere else (not logged,
not in the manifest, not in MLflow).

Money: with the live backend, `generate.model` must have a price in `generate.client.prices`
(else one line at start, nothing sent) unless `generate.client.allow_unpriced: true`;
`generate.client.max_cost_usd` caps the estimated cost of the dataset (answers from the cache
included): every attempt reserves its worst case first (pipeline.core.llmclient.Budget; see
engine.py for where the run stops and how a re-run continues).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.assets import corpus_version
from pipeline.core.config import (
    GENERATE_CACHE_PATH,
    GENERATION_MANIFEST_PATH,
    LEDGER_PATH,
    PAIRS_PATH,
    SECTIONS_PATH,
    Config,
    GenerateConfig,
    load_config,
)
from pipeline.core.contracts import Tags
from pipeline.core.dvcmeta import file_md5
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.llmclient import Backend, Budget, ChatClient, OpenAIBackend, RequestSettings, host_of
from pipeline.core.responsecache import ResponseCache
from pipeline.core.textmetrics import load_embedder
from pipeline.core.tone import Criteria, describe_criteria, tone_tags
from pipeline.core.tone import gate as tone_gate
from pipeline.core.tracking import code_version_tags, configure_mlflow, log_prompts
from pipeline.generate import outputs
from pipeline.generate.engine import NOT_CANDIDATES, REASONS, Engine, GenerationResult, ProgressBar, Section
from pipeline.generate.outputs import read_sections
from pipeline.generate.prompts import DEFAULT as DEFAULT_PROMPTS
from pipeline.generate.prompts import GenerationPrompts
from pipeline.generate.replay import ReplayBackend, load_recordings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.generate",
        description="Stage generate: question/answer pairs in a conversational tone from Wikipedia "
        "sections (params: generate.*, embeddings.*). Resumable: re-run after a crash.",
    )
    parser.add_argument("--sections", type=Path, default=SECTIONS_PATH, help="sections parquet (id, title, text)")
    parser.add_argument("--output-dir", type=Path, default=PAIRS_PATH.parent,
                        help="folder for pairs.parquet, ledger.jsonl, manifest.json")
    parser.add_argument("--cache", type=Path, default=GENERATE_CACHE_PATH, help="durable response cache (JSONL)")
    parser.add_argument("--replay-dir", type=Path, default=None, help="recordings folder (overrides generate.replay_dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


CLIENT_SECTION = "generate.client"


def budget_of(config: GenerateConfig) -> Budget:
    """The live backend's budget: refuses an unpriced model (one line, nothing sent) unless
    allow_unpriced. Replay pays nothing: no price needed, no cap."""
    if config.backend != "openai":
        return Budget()
    return Budget.for_model(config.client, config.model, CLIENT_SECTION)


def make_backend(config: GenerateConfig, replay_dir: Path | None) -> Backend:
    """The backend params ask for. Checks the key / recordings before anything is sent."""
    if config.backend == "replay":
        return ReplayBackend(load_recordings(replay_dir or Path(config.replay_dir)))
    client = config.client
    api_key = os.environ.get(client.api_key_env, "").strip()
    if not api_key:
        raise TonetuneError(
            f"environment variable {client.api_key_env} is not set: export the API key for "
            f"{host_of(client.base_url)} ({CLIENT_SECTION}.api_key_env names the variable)"
        )

    return OpenAIBackend(client.base_url, api_key, client.concurrency, client.request_timeout_s)


def request_settings(config: GenerateConfig) -> RequestSettings:
    return RequestSettings(config.model, config.temperature, config.max_tokens, config.seed,
                           config.client.request_timeout_s)


async def run_engine(config: GenerateConfig, backend: Backend, cache, embedder, sections: list[Section],
                     show_progress: bool = True, budget: Budget | None = None,
                     gate: Criteria | None = None, texts: GenerationPrompts | None = None) -> GenerationResult:
    """One generation run over `sections`; the backend is closed at the end, whatever happens."""
    from threadpoolctl import threadpool_limits

    budget = budget if budget is not None else budget_of(config)
    client = ChatClient(backend, cache, request_settings(config), config.client, budget=budget)
    progress = ProgressBar(config.target_pairs, enabled=show_progress)
    ticker = asyncio.create_task(progress.tick(client.stats))
    try:
        # The dedup/faithfulness matrix products are small: a multi-threaded BLAS spends more on
        # waking its threads than on the work (measured 30 ms vs 4 ms per block on a busy
        # 2-core machine), and it would compete with the event loop for the cores.
        with threadpool_limits(limits=1, user_api="blas"):
            return await Engine(client, embedder, config, progress, gate=gate, texts=texts or DEFAULT_PROMPTS).run(sections)
    finally:
        ticker.cancel()
        progress.close()
        await client.aclose()


def run_metrics(config: GenerateConfig, result: GenerationResult, budget: Budget | None = None) -> dict[str, float]:
    """Counts, acceptance rate, calls, tokens, cost and speed of a run (MLflow metrics).

    With the live backend the cost is the budget's (reported usage, or the full reservation of a
    reply without usage or an attempt that may have been billed); with replay it is what the
    same replies would cost live at `client.prices` (`live_cost_estimate_usd`)."""
    counts = result.counts()
    stats = result.stats
    candidates = len(result.ledger) - sum(counts[reason] for reason in NOT_CANDIDATES)
    metrics: dict[str, float] = {"accepted": counts["accepted"], "candidates": candidates,
                                 "not_recorded": counts["not_recorded"],
                                 "stopped_by_budget": float(result.stop_reason == "budget_exhausted")}
    metrics |= {f"rejected_{reason}": counts[reason] for reason in REASONS
                if reason != "accepted" and reason not in NOT_CANDIDATES}
    metrics["acceptance_rate"] = counts["accepted"] / candidates if candidates else 0.0
    metrics |= {key: value for key, value in stats.as_dict().items()}
    metrics["wall_time_s"] = result.wall_time_s
    metrics["calls_per_s"] = stats.api_calls / result.wall_time_s if result.wall_time_s > 0 else 0.0
    if config.backend == "openai":
        if budget is not None and budget.priced:
            metrics["estimated_cost_usd"] = budget.paid_usd
            metrics["dataset_cost_usd"] = budget.spent
    else:
        whole = config.client.cost_usd(config.model, stats.input_tokens + stats.cached_input_tokens,
                                       stats.output_tokens + stats.cached_output_tokens)
        if whole is not None:  # replay pays nothing; what the same requests would cost live is worth knowing
            metrics |= {"estimated_cost_usd": 0.0, "dataset_cost_usd": 0.0, "live_cost_estimate_usd": whole}
    if result.pairs:
        metrics["mean_flesch"] = sum(p.flesch for p in result.pairs) / len(result.pairs)
        metrics["mean_faithfulness"] = sum(p.faithfulness for p in result.pairs) / len(result.pairs)
    return metrics


def run_params(config: Config, sections_total: int) -> dict[str, Any]:
    """What decided this dataset (MLflow params): never the API key, never the environment."""
    generate = config.generate
    return {
        "backend": generate.backend,
        "model": generate.model,
        "base_url_host": host_of(generate.client.base_url) if generate.backend == "openai" else "none (replay)",
        "replay_dir": generate.replay_dir if generate.backend == "replay" else "none",
        "prompt_version": GenerationPrompts.of(config.tone).prompt_version,
        "temperature": generate.temperature,
        "max_tokens": generate.max_tokens,
        "seed": generate.seed,
        "target_pairs": generate.target_pairs,
        "max_cost_usd": generate.client.max_cost_usd,
        "allow_unpriced": generate.client.allow_unpriced,
        "concurrency": generate.client.concurrency,
        "requests_per_minute": generate.client.requests_per_minute,
        "tokens_per_minute": generate.client.tokens_per_minute,
        "max_retries": generate.client.max_retries,
        "max_json_attempts": generate.max_json_attempts,
        "tone": config.tone.name,
        "gate": describe_criteria(config.tone.gate),
        "max_simplify_attempts": generate.max_simplify_attempts,
        "dedup_threshold": generate.dedup_threshold,
        "faithfulness_threshold": generate.faithfulness_threshold,
        "embeddings_model": config.embeddings.model,
        "sections_available": sections_total,
    }


def build_manifest(config: Config, result: GenerationResult, run_id: str, sections_path: Path,
                   metrics: dict[str, float]) -> dict[str, Any]:
    """Lineage of the dataset: the run, prompts, model, thresholds, source version, counts."""

    generate = config.generate
    try:
        corpus = corpus_version(config.source)
    except Exception as error:  # package metadata missing: record that instead of failing
        corpus = f"unknown ({type(error).__name__})"
    return {
        "mlflow_run_id": run_id,
        "experiment": config.tracking.experiment,
        "prompt_version": GenerationPrompts.of(config.tone).prompt_version,
        "tone": config.tone.name,
        "prompts": GenerationPrompts.of(config.tone).prompts.versions(),
        "backend": generate.backend,
        "model": generate.model,
        "base_url_host": host_of(generate.client.base_url) if generate.backend == "openai" else None,
        "replay_dir": generate.replay_dir if generate.backend == "replay" else None,
        "seed": generate.seed,
        "temperature": generate.temperature,
        "target_pairs": generate.target_pairs,
        "thresholds": {
            "gate": describe_criteria(config.tone.gate),
            "max_simplify_attempts": generate.max_simplify_attempts,
            "dedup_cosine": generate.dedup_threshold,
            "faithfulness_cosine": generate.faithfulness_threshold,
        },
        "embeddings_model": config.embeddings.model,
        "source_corpus": corpus,
        "sections_path": sections_path.as_posix(),
        "sections_md5": file_md5(sections_path),
        "stop_reason": result.stop_reason,
        "max_cost_usd": generate.client.max_cost_usd,
        "counts": {key: int(value) for key, value in metrics.items()
                   if key in ("accepted", "candidates", "not_recorded") or key.startswith("rejected_")},
        "calls": result.stats.as_dict(),
        "wall_time_s": round(result.wall_time_s, 3),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_outputs_and_log(config: Config, result: GenerationResult, args: argparse.Namespace,
                          budget: Budget | None = None) -> tuple[str, dict]:
    """Write pairs, ledger and manifest, and record the run in MLflow (one run per generation).

    The run is opened only now, after generation: a crashed generation leaves no half-filled
    RUNNING run behind, and the re-run that completes it logs the whole story (cache hits
    included)."""
    import mlflow

    pairs_path = args.output_dir / PAIRS_PATH.name
    ledger_path = args.output_dir / LEDGER_PATH.name
    manifest_path = args.output_dir / GENERATION_MANIFEST_PATH.name
    metrics = run_metrics(config.generate, result, budget)
    configure_mlflow(config.tracking)
    texts = GenerationPrompts.of(config.tone)
    with mlflow.start_run(run_name=f"generate-{config.generate.backend}-{len(result.pairs)}") as run:
        mlflow.set_tags({**code_version_tags(), Tags.STAGE: "generate", "prompt_version": texts.prompt_version,
                         "stop_reason": result.stop_reason, **tone_tags(config.tone)})
        log_prompts(texts.prompts, config.tone.name)
        mlflow.log_params(run_params(config, result.sections_total))
        mlflow.log_metrics(metrics)
        manifest = build_manifest(config, result, run.info.run_id, args.sections, metrics)
        outputs.write_pairs(result.pairs, pairs_path)
        outputs.write_ledger(result.ledger, ledger_path)
        outputs.write_manifest(manifest, manifest_path)
        mlflow.log_artifact(str(ledger_path), artifact_path="generate")
        mlflow.log_artifact(str(manifest_path), artifact_path="generate")
        mlflow.log_text(texts.text(), "generate/prompts.txt")
    return run.info.run_id, metrics


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    generate = config.generate
    budget = budget_of(generate)  # unpriced model -> one line, nothing sent
    backend = make_backend(generate, args.replay_dir)  # no key -> one line, nothing sent

    texts = GenerationPrompts.of(config.tone)  # a missing or unfillable prompt file: one line, nothing sent
    texts.qa_messages("title", "text", [("reply", "problem")]), texts.simplify_messages("q", "a", [("x", 0.0, [])], 0.0)
    sections = read_sections(args.sections)
    recorded = sum(backend.has_source(section.source_id) for section in sections)
    if not recorded:
        raise TonetuneError(f"none of the {len(sections)} sections in {args.sections} has a recording "
                            f"in {args.replay_dir or generate.replay_dir}")
    gate = tone_gate(config.tone).check()  # a hub: metric's mistakes: one line, before any model
    embedder = load_embedder(config.embeddings)
    cache = ResponseCache(args.cache)
    if damage := cache.damage_report():
        print(f"generate: {damage}", file=sys.stderr)
    try:
        result = asyncio.run(run_engine(generate, backend, cache, embedder, sections,
                                        show_progress=not args.no_progress, budget=budget,
                                        gate=gate, texts=texts))
    except KeyboardInterrupt:
        print(f"\ngenerate: interrupted; {len(cache)} responses are safe in {args.cache}, "
              "run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        cache.close()
    run_id, metrics = write_outputs_and_log(config, result, args, budget)
    cost = metrics.get("estimated_cost_usd")
    print(
        f"generate: {len(result.pairs)} pairs accepted of {int(metrics['candidates'])} candidates "
        f"({metrics['acceptance_rate']:.1%}, {result.stop_reason}) -> {args.output_dir / PAIRS_PATH.name}; "
        f"{result.stats.api_calls} API calls, {result.stats.cache_hits} cache hits, {result.stats.errors} errors"
        + (f", ${cost:.4f}" if cost is not None else "")
        + f", {result.wall_time_s:.1f} s; backend {generate.backend}, prompts {texts.prompt_version}, MLflow run {run_id}"
    )
    if result.stats.repaid:
        print(f"generate: {result.stats.repaid} request(s) in flight when an earlier run died were sent (and paid) "
              f"again; the ledger names them (repaid_requests)", file=sys.stderr)
    if result.stop_reason == "budget_exhausted":
        spent = metrics.get("dataset_cost_usd")
        print(f"generate: stopped at the cost cap: ${spent:.4f} estimated, the next requests' worst case would pass "
              f"{CLIENT_SECTION}.max_cost_usd ${generate.client.max_cost_usd:g}; {len(result.pairs)} pairs kept, the ledger ends at the first section "
              "not generated (budget_exhausted); raise the cap and run again to continue from the cache",
              file=sys.stderr)
    if generate.backend == "openai" and cost is None:
        print(f"generate: no price for {generate.model!r} in {CLIENT_SECTION}.prices (allow_unpriced): cost not estimated",
              file=sys.stderr)


if __name__ == "__main__":
    main()
