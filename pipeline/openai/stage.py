"""Stage wiring of the OpenAI arm: the command line, and one invocation from start to status file.

Owns: `main` / `parse_args` (`python -m pipeline.openai`), `Target` (which model this
invocation is about), `status.json`, `run_base` (evaluate a base model), `run_finetune`
(checks, ledger lock, MLflow run, job, follow, results, evaluation, in that order),
`cancel_job` and the notes about routes the provider does not serve.
Does not own: the steps themselves (spec.py, api.py, jobs.py, evaluation.py, collect.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import VAL_SPLIT_PATH, Config, load_config
from pipeline.core.contracts import Tags
from pipeline.core.errors import TonetuneError, exit_on_user_error
from pipeline.core.io import atomic_write_bytes, write_json
from pipeline.core.predictions import read_validation
from pipeline.core.prompts import system_prompts
from pipeline.core.tracking import log_dataset_input
from pipeline.openai.api import TERMINAL, FineTuningAPI, api_key_from_env
from pipeline.openai.collect import collect
from pipeline.openai.evaluation import evaluate_model
from pipeline.openai.jobs import JobFailed, ensure_file, ensure_job, follow_job, record_results
from pipeline.openai.ledger import JobLedger
from pipeline.openai.spec import (
    COLLECTED_DIR,
    IDENTITY_KEY,
    RUNS_DIR,
    TRAIN_FILE_PATTERN,
    JobSpec,
    chat_examples,
    check_priced,
    check_training_budget,
    jsonl_bytes,
    model_name,
    read_split,
    sha256_hex,
    training_cost_usd,
    training_tokens,
    validate_chat_jsonl,
)
from pipeline.openai.tracking import RunLog, start_run


def note_degraded(api: FineTuningAPI, ledger: JobLedger, run_log: RunLog) -> None:
    """Record the optional routes the provider did not serve (ledger + run tag), once each."""
    if not api.degraded:
        return
    known = {(r.get("endpoint"), r.get("route")) for r in ledger.records() if r.get("kind") == "degraded"}
    for route in api.degraded:
        if (api.endpoint, route) not in known:
            ledger.append({"kind": "degraded", "endpoint": api.endpoint, "route": route})
    run_log.tags({"openai.degraded_routes": ", ".join(sorted(api.degraded))})


@dataclass
class Target:
    """What one invocation is about: a base model, or a base model fine-tuned on a training file."""

    base_model: str
    train_path: Path | None
    val_path: Path
    n_train: int | None

    @property
    def name(self) -> str:
        return model_name(self.base_model, self.n_train)


def n_train_from_path(path: Path) -> int | None:
    """train_100.parquet -> 100 (the split stage's naming), else None."""
    match = TRAIN_FILE_PATTERN.search(path.name)
    return int(match.group(1)) if match else None


def write_status(out_dir: Path, target: Target, status: str, **details: Any) -> Path:
    record = {"model": target.name, "status": status, "base_model": target.base_model, "n_train": target.n_train,
              **{key: value for key, value in details.items() if value is not None}}
    return write_json(out_dir / "status.json", record)


def run_base(config: Config, target: Target, out_dir: Path, api: FineTuningAPI, ledger: JobLedger) -> dict[str, Any]:
    """Evaluate the base model with the verbose prompt (its own MLflow run, like eval-base)."""
    import mlflow

    validation = read_validation(target.val_path, config.evaluate.limit)
    run = start_run(config, target.name, None, {Tags.STAGE: "openai_finetune", Tags.STAGE_LEGACY: "openai_finetune",
                                                "kind": "openai-base", "model": target.name})
    with run:
        mlflow.log_params({"base_model": target.base_model, "endpoint_host": api.host, "system_prompt": "verbose",
                           "seed": config.openai.seed})
        record = evaluate_model(target.name, "openai-base", target.base_model, target.base_model, "verbose",
                                validation, target.val_path, config, api, ledger, out_dir, {})
        note_degraded(api, ledger, RunLog.open(run.info.run_id))
        write_status(out_dir, target, "evaluated", mlflow_run_id=run.info.run_id)
    return record


def run_finetune(config: Config, target: Target, out_dir: Path, api: FineTuningAPI, ledger: JobLedger,
                 evaluate: bool = True, new_job: bool = False, cancel: bool = False, eval_model: str | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Fine-tune (or resume), record everything in MLflow, evaluate; returns the status record."""
    import mlflow

    settings = config.openai
    train = read_split(target.train_path, "training")
    validation = read_validation(target.val_path, config.evaluate.limit) if evaluate else None
    concise = system_prompts(config.tone).system_prompt("concise")
    training = jsonl_bytes(chat_examples(train, concise))
    n_examples = validate_chat_jsonl(training, f"{target.train_path} as chat JSONL", settings)
    atomic_write_bytes(out_dir / "train.jsonl", training)
    validation_bytes = None
    if settings.validation_file:
        validation_bytes = jsonl_bytes(chat_examples(read_split(target.val_path, "validation"), concise))
        validate_chat_jsonl(validation_bytes, f"{target.val_path} as chat JSONL", settings)
    spec = JobSpec.from_config(target.base_model, sha256_hex(training),
                               sha256_hex(validation_bytes) if validation_bytes else None, settings)
    identity = spec.identity
    print(f"openai: {target.name}: {n_examples} examples, identity {identity[:12]}, endpoint {api.host}", flush=True)
    metadata = {IDENTITY_KEY: identity, "tonetune_model": target.name[:512], "tonetune_n_train": str(n_examples)}

    with ledger.lock():
        if cancel:
            return cancel_job(api, ledger, spec, out_dir, target)
        recorded_run = None if new_job else ledger.run_id(api.endpoint, identity)
        run = start_run(config, target.name, recorded_run, {
            Tags.STAGE: "openai_finetune", Tags.STAGE_LEGACY: "openai_finetune", "kind": "openai-finetuned",
            "model": target.name, "openai.identity": identity})
        if run.info.run_id != recorded_run:
            ledger.append({"kind": "run", "endpoint": api.endpoint, "identity": identity, "mlflow_run_id": run.info.run_id})
        run_log = RunLog.open(run.info.run_id)
        try:
            mlflow.log_params({
                "base_model": spec.base_model, "n_train": n_examples, "method": "supervised", "n_epochs": spec.n_epochs,
                "batch_size": spec.batch_size, "learning_rate_multiplier": spec.learning_rate_multiplier,
                "seed": spec.seed, "validation_file": bool(validation_bytes), "system_prompt": "concise",
                "identity": identity, "suffix": spec.suffix, "endpoint_host": api.host,
                "training_file_sha256": spec.training_sha256,
                "estimated_training_tokens": training_tokens(training),
                "estimated_training_cost_usd": training_cost_usd(training, spec, settings),
                "max_training_cost_usd": settings.max_training_cost_usd,
            })
            log_dataset_input(train, target.train_path, context="training", name=target.train_path.stem)

            def files() -> tuple[str, str | None]:
                training_id = ensure_file(api, ledger, training, "train")
                validation_id = ensure_file(api, ledger, validation_bytes, "val") if validation_bytes else None
                run_log.tags({"openai.training_file": training_id, "openai.validation_file": validation_id})
                return training_id, validation_id

            job, _ = ensure_job(api, ledger, spec, files, metadata, new_job,
                                before_create=lambda: check_training_budget(training, spec, settings))
        except BaseException as error:
            if isinstance(error, TonetuneError):
                run_log.tags({"openai.error": str(error)})
            mlflow.end_run(status="FAILED")
            raise
    # The job exists and is recorded: polling needs no lock (a second process would only watch).
    try:
        run_log.tags({"openai.job_id": job.id, "openai.training_file": job.training_file,
                      "openai.validation_file": job.validation_file})
        write_status(out_dir, target, job.status, job_id=job.id, identity=identity, mlflow_run_id=run.info.run_id)
        job = follow_job(api, job, run_log, settings, sleep=sleep)
        summary = record_results(api, job, run_log, out_dir)
        if job.error:
            print(f"openai:   error {job.error.code}: {job.error.message}", flush=True)
        job_dump = job.model_dump(mode="json")
        mlflow.log_dict(job_dump, "openai/job.json")
        ledger.append({"kind": "job_update", "endpoint": api.endpoint, "job_id": job.id, "status": job.status,
                       "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens})
        details = {"job_id": job.id, "identity": identity, "mlflow_run_id": run.info.run_id,
                   "fine_tuned_model": job.fine_tuned_model, "trained_tokens": job.trained_tokens,
                   "training_file": job.training_file, "checkpoints": summary["checkpoints"]}
        if job.status != "succeeded":
            message = job.error.message if job.error else f"the job was {job.status}"
            code = job.error.code if job.error else None
            run_log.tags({"openai.error": message, "openai.error_code": code})
            write_status(out_dir, target, job.status, error=message, error_code=code, **details)
            mlflow.end_run(status="FAILED" if job.status == "failed" else "KILLED")
            hint = "re-run with --new-job to start a new (paid) job" if job.status == "failed" else \
                "re-run with --new-job to start it again"
            raise JobFailed(f"fine-tuning job {job.id} {job.status}: {message} ({hint})")
        run_log.tags({"openai.fine_tuned_model": job.fine_tuned_model})
        print(f"openai: job {job.id} succeeded: {job.fine_tuned_model} ({job.trained_tokens} trained tokens)", flush=True)
        status = write_status(out_dir, target, "succeeded", **details)
        if validation is not None:
            if not (eval_model or job.fine_tuned_model):
                raise TonetuneError(f"job {job.id} succeeded but names no fine_tuned_model; pass --eval-model")
            evaluate_model(target.name, "openai-finetuned", target.base_model, eval_model or job.fine_tuned_model,
                           "concise", validation, target.val_path, config, api, ledger, out_dir,
                           {"n_train": n_examples, "job_id": job.id, "fine_tuned_model": job.fine_tuned_model,
                            "trained_tokens": job.trained_tokens})
            status = write_status(out_dir, target, "evaluated", **details)
        note_degraded(api, ledger, run_log)
        mlflow.end_run()
        return json.loads(status.read_text())
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        if job.status in TERMINAL:
            print(f"openai: interrupted; job {job.id} is {job.status}. Run the same command again to finish "
                  "(answers received so far are cached).", file=sys.stderr)
        else:
            print(f"openai: interrupted; job {job.id} keeps running at {api.host}. Run the same command again to "
                  "resume following it (no new job is created), or add --cancel to stop it.", file=sys.stderr)
        raise SystemExit(130) from None
    except JobFailed:
        raise
    except BaseException:
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
        raise


def cancel_job(api: FineTuningAPI, ledger: JobLedger, spec: JobSpec, out_dir: Path, target: Target) -> dict[str, Any]:
    """Cancel the identity's job (recorded or found remotely); report what happened."""
    recorded = ledger.job(api.endpoint, spec.identity)
    job_id = recorded["job_id"] if recorded else next((j.id for j in api.find_jobs(spec.identity)), None)
    if job_id is None:
        print(f"openai: no job for {target.name} (identity {spec.identity[:12]}) at {api.host}: nothing to cancel")
        return {"status": "none"}
    job = api.retrieve_job(job_id)
    if job.status not in TERMINAL:
        job = api.cancel_job(job_id)
    ledger.append({"kind": "job_update", "endpoint": api.endpoint, "job_id": job.id, "status": job.status})
    print(f"openai: job {job.id} is {job.status}")
    write_status(out_dir, target, job.status, job_id=job.id, identity=spec.identity)
    return {"status": job.status, "job_id": job.id}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.openai",
        description="Optional OpenAI arm (params: openai.*): fine-tune --base-model on --train (chat JSONL with the "
        "concise prompt), follow the job into MLflow and evaluate the fine-tuned model on --val; without --train, "
        "evaluate the base model with the verbose prompt. Idempotent: a re-run resumes the recorded job. "
        "Key: the variable openai.client.api_key_env names (OPENAI_API_KEY); endpoint: openai.client.base_url, "
        "else $OPENAI_BASE_URL, else api.openai.com.",
    )
    parser.add_argument("--base-model", help="e.g. gpt-4o-mini-2024-07-18")
    parser.add_argument("--train", type=Path, help="training split parquet (question, answer); omit for the base model")
    parser.add_argument("--val", type=Path, default=VAL_SPLIT_PATH, help=f"validation split (default {VAL_SPLIT_PATH})")
    parser.add_argument("--out-dir", type=Path, help=f"outputs (default {RUNS_DIR}/<model>)")
    parser.add_argument("--no-eval", action="store_true", help="fine-tune only, do not evaluate")
    parser.add_argument("--eval-model", help="evaluate this model id instead of the job's fine_tuned_model "
                        "(Azure: the deployment name)")
    parser.add_argument("--new-job", action="store_true", help="create a new (paid) job even if this training set "
                        "already has one (e.g. after a failure)")
    parser.add_argument("--cancel", action="store_true", help="cancel this training set's job")
    parser.add_argument("--collect", action="store_true", help=f"write {COLLECTED_DIR}/*.json for the report")
    args = parser.parse_args(argv)
    if not args.collect and not args.base_model:
        parser.error("--base-model is required (or --collect)")
    if args.cancel and not args.train:
        parser.error("--cancel needs --train (the job's training set)")
    return args


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config()
    if args.collect:
        collect(config)
        return
    target = Target(args.base_model, args.train, args.val, n_train_from_path(args.train) if args.train else None)
    if not config.openai.enabled:  # the demo: a status file in milliseconds, nothing imported or sent
        if args.train and target.n_train is None:
            target.n_train = len(read_split(args.train, "training"))
        write_status(args.out_dir or RUNS_DIR / target.name, target, "not_run", reason="openai.enabled is false")
        print(f"openai: {target.name}: not run (openai.enabled is false; enable with "
              "`dvc exp run -S openai.enabled=true` and export OPENAI_API_KEY)")
        return
    if not args.cancel:  # cancelling spends nothing
        check_priced(config.openai, [target.base_model], training=args.train is not None)  # unpriced -> one line
    api = FineTuningAPI(config.openai.client.base_url, api_key_from_env(config.openai), config.openai)
    if args.train is None:
        run_base(config, target, args.out_dir or RUNS_DIR / target.name, api, JobLedger())
        return
    target.n_train = len(read_split(args.train, "training"))  # the name says how many rows were used
    run_finetune(config, target, args.out_dir or RUNS_DIR / target.name, api, JobLedger(),
                 evaluate=not args.no_eval, new_job=args.new_job, cancel=args.cancel, eval_model=args.eval_model)
