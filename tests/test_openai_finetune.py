"""The OpenAI fine-tuning arm against a real HTTP server on 127.0.0.1, through the real `openai`
package (OPENAI_BASE_URL points at tests/fakes/openai_server.py): upload, job creation, polling,
events into MLflow, result file, evaluation through chat completions; failed and cancelled jobs;
idempotence (the server counts uploads and job creations) across re-runs and SIGKILLs at each
dangerous moment; the key never reaching MLflow; bad input rejected before anything is sent.

Only the OpenAI API is faked; MLflow (a temporary sqlite store), the embedder and the metrics
are the real ones. Crash tests run the stage as a subprocess and SIGKILL it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import OpenAIConfig, load_config
from pipeline.core.errors import TonetuneError
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, VERBOSE_SYSTEM_PROMPT
from pipeline.openai import spec as ospec
from pipeline.openai import stage
from pipeline.openai.ledger import JobLedger
from tests.conftest import REPO_ROOT
from tests.fakes.openai_server import FakeOpenAIServer, FakeReply, JobPlan, tone_behaviour
from tests.generate_support import client_params

API_KEY = "sk-" + "test-OPENAI-FT-DO-NOT-LEAK-91b2"  # a sentinel, split so secret scanners do not flag it
BASE = "gpt-4o-mini-2024-07-18"
N_TRAIN = 12
FT_NAME = ospec.model_name(BASE, N_TRAIN)
TRAIN = Path("data/splits/train_12.parquet")
VAL = Path("data/splits/val.parquet")
FINETUNE_ARGS = ["--base-model", BASE, "--train", str(TRAIN), "--val", str(VAL)]


def qa_rows(count: int, start: int = 0) -> list[dict[str, str]]:
    return [{"question": f"What do people like about topic number {i}?",
             "answer": f"Well, topic {i} is fun. You can try it at home, and it is easy to learn."}
            for i in range(start, start + count)]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables created (~10 s on a busy machine), copied per test."""
    import mlflow

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def project(tmp_path, monkeypatch, write_params, mlflow_uri, empty_store):
    """A working directory with tiny splits, the OpenAI arm on (fast polling), the key exported."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")  # the test's own store (mlflow_uri), ready to use
    monkeypatch.chdir(tmp_path)
    TRAIN.parent.mkdir(parents=True)
    pd.DataFrame(qa_rows(N_TRAIN)).to_parquet(TRAIN)
    pd.DataFrame(qa_rows(6, start=100)).to_parquet(VAL)
    write_params({
        "openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN], "batch_size": 4,
                   "poll_interval_s": 0.001, "poll_max_interval_s": 0.01,
                   "client": client_params("openai", max_retries=2, request_timeout_s=10, concurrency=4)},
        "evaluate": {"bootstrap_samples": 50},
    })
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return tmp_path


@pytest.fixture
def server(project, monkeypatch):
    with FakeOpenAIServer(chat=tone_behaviour) as fake:
        monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
        yield fake


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of pipeline.openai.stage.main."""
    code = 0
    try:
        stage.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def runs_named(name: str) -> list:
    import mlflow

    return mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_name = '{name}'",
                              output_format="list")


def requests_to(server, method: str, path: str) -> list:
    return [r for r in server.requests if r.method == method and r.path == path]


def assert_key_nowhere(root: Path) -> None:
    """No file under `root` (the sqlite MLflow store, artifacts, ledger, outputs) holds the key."""
    offenders = [str(path) for path in root.rglob("*") if path.is_file() and API_KEY.encode() in path.read_bytes()]
    assert not offenders, offenders


def status_of(name: str) -> dict:
    return json.loads((ospec.RUNS_DIR / name / "status.json").read_text())


# --------------------------------------------------------------------------- pure parts


def chat_line(messages) -> bytes:
    return (json.dumps({"messages": messages}) + "\n").encode()


GOOD = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("data, settings, expected", [
    (chat_line(GOOD) * 9, {}, "9 example(s); the fine-tuning API needs at least 10"),
    (chat_line(GOOD) * 40, {"max_file_mb": 0.001}, "over the API's limit of 0.001 MiB per file"),
    (chat_line(GOOD) * 10 + b"{not json\n", {}, "line 11 is not JSON"),
    (chat_line(GOOD[:2]) + chat_line(GOOD) * 10, {}, "line 1 is not a valid chat example: the last message must be"),
    (chat_line([*GOOD[:2], {"role": "assistant", "content": " "}]) * 10, {}, "message 2 (assistant) has empty"),
    (chat_line([{"role": "robot", "content": "x"}, GOOD[2]]) * 10, {}, "message 0 has no valid role"),
    (chat_line([GOOD[0], {"role": "user", "content": "q" * 400}, GOOD[2]]) * 10, {"max_example_tokens": 50},
     "line 1 has ~"),
], ids=["too-few", "too-big", "not-json", "no-answer", "empty-answer", "bad-role", "too-long"])
def test_training_file_is_checked_against_the_api_limits(data, settings, expected):
    with pytest.raises(TonetuneError) as error:
        ospec.validate_chat_jsonl(data, "train.jsonl", OpenAIConfig(**settings))
    message = str(error.value)
    assert expected in message and "nothing was uploaded" in message and "\n" not in message


def test_a_valid_file_passes_and_the_examples_carry_the_concise_prompt():
    frame = pd.DataFrame(qa_rows(10))
    data = ospec.jsonl_bytes(ospec.chat_examples(frame, CONCISE_SYSTEM_PROMPT))
    assert ospec.validate_chat_jsonl(data, "train.jsonl", OpenAIConfig()) == 10
    first = json.loads(data.splitlines()[0])["messages"]
    assert first == [{"role": "system", "content": CONCISE_SYSTEM_PROMPT},
                     {"role": "user", "content": frame["question"][0]},
                     {"role": "assistant", "content": frame["answer"][0]}]
    assert data == ospec.jsonl_bytes(ospec.chat_examples(frame, CONCISE_SYSTEM_PROMPT))  # deterministic bytes


@pytest.mark.parametrize("change", [
    {"base_model": "gpt-4.1-mini-2025-04-14"}, {"training_sha256": "f" * 64}, {"validation_sha256": "e" * 64},
    {"n_epochs": 4}, {"batch_size": 16}, {"learning_rate_multiplier": 2.0}, {"seed": 714},
])
def test_every_part_of_the_identity_changes_it(change):
    spec = ospec.JobSpec(BASE, "a" * 64, None, 5, 32, 1.0, 713)
    assert spec.identity == ospec.JobSpec(BASE, "a" * 64, None, 5, 32, 1.0, 713).identity
    changed = ospec.JobSpec(**{**spec.__dict__, **change})
    assert changed.identity != spec.identity and changed.suffix != spec.suffix
    assert spec.method() == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 5, "batch_size": 32, "learning_rate_multiplier": 1.0}}}


def test_ledger_survives_a_torn_line_and_merges_updates(tmp_path):
    ledger = JobLedger(tmp_path / "jobs.jsonl")
    ledger.append({"kind": "file", "endpoint": "e", "sha256": "s", "file_id": "file-1"})
    ledger.append({"kind": "job", "endpoint": "e", "identity": "i", "job_id": "ftjob-1"})
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"kind": "job_update", "endpoint": "e", "job_id": "ftj')  # SIGKILL mid-write
    assert ledger.job("e", "i")["job_id"] == "ftjob-1" and ledger.file_id("e", "s") == "file-1"
    ledger.append({"kind": "job_update", "endpoint": "e", "job_id": "ftjob-1", "status": "succeeded"})
    assert ledger.job("e", "i")["status"] == "succeeded"
    assert all(json.loads(line) for line in ledger.path.read_bytes().splitlines())  # torn tail cut off
    assert ledger.job("other-endpoint", "i") is None
    ledger.append({"kind": "job_superseded", "endpoint": "e", "identity": "i", "job_id": "ftjob-1"})
    assert ledger.job("e", "i") is None and ledger.known_job_ids("e", "i") == {"ftjob-1"}
    ledger.append({"kind": "file_gone", "endpoint": "e", "sha256": "s", "file_id": "file-1"})
    assert ledger.file_id("e", "s") is None


# --------------------------------------------------------------------------- off, and bad input


def test_disabled_writes_not_run_and_the_report_lists_the_models_as_not_run(project, write_params, capsys):
    from pipeline import report
    from pipeline.core.evalmetrics import metrics_record

    write_params({"openai": {"enabled": False, "base_models": [BASE], "n_train": [N_TRAIN]}})
    assert run_main(FINETUNE_ARGS, capsys)[0] == 0
    assert run_main(["--base-model", BASE, "--val", str(VAL)], capsys)[0] == 0
    assert status_of(FT_NAME)["status"] == "not_run" and status_of(ospec.model_name(BASE))["status"] == "not_run"
    assert not ospec.LEDGER_PATH.exists()  # nothing was sent, so nothing was recorded
    code, out, _ = run_main(["--collect"], capsys)
    assert code == 0 and "openai.enabled is false" in out and not list(ospec.COLLECTED_DIR.glob("*.json"))
    # ... but the DVC metrics folder is never empty: a scalar summary for `dvc metrics show`.
    assert json.loads((ospec.COLLECTED_DIR / "summary.yaml").read_text()) == {
        "enabled": False, "models_expected": 2, "models_evaluated": 0}
    # The report (which reads metrics/eval and metrics/openai) shows the OpenAI rows as not run.
    Path("metrics/eval").mkdir(parents=True)
    summary = {"n_eval": 6, "pct_conversational": 10.0, "similarity_mean": 0.7}
    Path("metrics/eval/base.json").write_text(json.dumps(metrics_record("base", "base", summary, family="SmolLM2")))
    records = report.load_records()
    not_run = report.not_run_openai_families(records, load_config().openai)
    assert not_run == ["gpt-4o-mini"]
    text = report.render_results(records, not_run, load_config().openai, 60)
    assert f"| gpt-4o-mini | unknown | unknown | unknown | {N_TRAIN} | not run |" in text


def test_no_key_fails_in_one_line_before_anything_is_sent(server, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY")
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 2
    assert err.count("\n") == 1 and "OPENAI_API_KEY is not set" in err and "nothing was uploaded" in err
    assert server.requests == [] and not ospec.LEDGER_PATH.exists()


@pytest.mark.parametrize("params, rows, expected", [
    ({"max_file_mb": 0.001}, N_TRAIN, "over the API's limit of 0.001 MiB per file"),
    ({}, 9, "9 example(s); the fine-tuning API needs at least 10"),
], ids=["oversize", "too-few"])
def test_training_files_over_the_limits_are_rejected_before_upload(server, write_params, capsys, params, rows, expected):
    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN], **params}})
    pd.DataFrame(qa_rows(rows)).to_parquet(TRAIN)
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 2 and expected in err and err.count("\n") == 1
    assert server.requests == [] and server.fine_tuning.uploads == 0


def test_an_auth_error_is_one_line_without_the_key_and_the_key_never_reaches_mlflow(server, project, capsys):
    server.route("POST", "/v1/files",
                 lambda request: FakeReply.error(401, f"Incorrect API key provided: {API_KEY}", code="invalid_api_key"))
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 2 and "HTTP 401 from 127.0.0.1" in err and "Incorrect API key provided: ***" in err
    assert API_KEY not in err
    [run] = runs_named(FT_NAME)
    assert run.info.status == "FAILED" and "HTTP 401" in run.data.tags["openai.error"]
    assert server.requests[-1].headers["authorization"] == f"Bearer {API_KEY}"  # it was sent, to the API only
    assert_key_nowhere(project)


# --------------------------------------------------------------------------- a job that succeeds


def test_fine_tune_end_to_end_then_base_collect_and_report(server, project, capsys):
    import mlflow

    from pipeline import report

    code, out, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 0, err
    stats = server.fine_tuning.stats()
    assert stats["uploads"] == 1 and stats["jobs_created"] == 1 and stats["job_retrieves"] >= 4
    for status in ("validating_files", "queued", "running", "succeeded"):
        assert f": {status}" in out  # the job went through every status, one poll at a time

    # What was sent: the exact training bytes, purpose fine-tune; the paper's job settings.
    [upload] = requests_to(server, "POST", "/v1/files")
    assert b'name="purpose"\r\n\r\nfine-tune' in upload.raw_body
    training = (ospec.RUNS_DIR / FT_NAME / "train.jsonl").read_bytes()
    assert training in upload.raw_body and json.loads(training.splitlines()[0])["messages"][0]["content"] == CONCISE_SYSTEM_PROMPT
    [create] = requests_to(server, "POST", "/v1/fine_tuning/jobs")
    body = create.body
    assert body["model"] == BASE and body["seed"] == 713
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 1.0}}}
    identity = body["metadata"][ospec.IDENTITY_KEY]
    assert body["suffix"] == f"tt-{identity[:12]}"

    # What was recorded: the MLflow run, beside the LoRA runs (same experiment), per-step losses.
    [run] = runs_named(FT_NAME)
    job = next(iter(server.fine_tuning.jobs.values()))
    assert run.info.status == "FINISHED"
    assert run.data.tags["openai.job_id"] == job["id"]
    assert run.data.tags["openai.fine_tuned_model"] == job["fine_tuned_model"]
    assert run.data.params["n_epochs"] == "5" and run.data.params["seed"] == "713"
    assert run.data.params["identity"] == identity and run.data.params["n_train"] == str(N_TRAIN)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 16))  # 3 steps x 5 epochs, each once
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "openai")}
    assert {"openai/step_metrics.csv", "openai/job.json"} <= artifacts
    assert (ospec.RUNS_DIR / FT_NAME / "step_metrics.csv").read_text().startswith("step,train_loss")  # base64 decoded
    assert run.data.metrics["eval_pct_conversational"] == 100.0

    # Evaluation through chat completions: the fine-tuned model id, the concise prompt.
    chats = requests_to(server, "POST", "/v1/chat/completions")
    assert len(chats) == 6 and {c.body["model"] for c in chats} == {job["fine_tuned_model"]}
    assert {c.body["messages"][0]["content"] for c in chats} == {CONCISE_SYSTEM_PROMPT}
    status = status_of(FT_NAME)
    assert status["status"] == "evaluated" and status["fine_tuned_model"] == job["fine_tuned_model"]
    predictions = pd.read_parquet(ospec.RUNS_DIR / FT_NAME / "predictions.parquet")
    assert list(predictions.columns[:5]) == ["question", "reference", "answer", "flesch", "similarity"]

    # The base model with the verbose prompt, then the records the report reads.
    assert run_main(["--base-model", BASE, "--val", str(VAL)], capsys)[0] == 0
    base_chats = requests_to(server, "POST", "/v1/chat/completions")[6:]
    assert {c.body["model"] for c in base_chats} == {BASE}
    assert {c.body["messages"][0]["content"] for c in base_chats} == {VERBOSE_SYSTEM_PROMPT}
    assert runs_named(ospec.model_name(BASE))[0].data.metrics["eval_pct_conversational"] == 0.0
    assert run_main(["--collect"], capsys)[0] == 0
    records = report.load_records([ospec.COLLECTED_DIR])
    assert {(r["model"], r["kind"], r["n_train"]) for r in records} == {
        (FT_NAME, "openai-finetuned", N_TRAIN), (ospec.model_name(BASE), "openai-base", 0)}
    text = report.render_results(records, report.not_run_openai_families(records, load_config().openai),
                                 load_config().openai, 60)
    assert f"| gpt-4o-mini | unknown | unknown | unknown | {N_TRAIN} | 100.0 |" in text
    assert "| gpt-4o-mini | unknown | - | - | 0 | 0.0 |" in text
    assert_key_nowhere(project)


def test_a_rerun_resumes_and_never_creates_a_second_job(server, capsys):
    import mlflow

    assert run_main(FINETUNE_ARGS, capsys)[0] == 0
    chats = server.chat_calls
    code, out, _ = run_main(FINETUNE_ARGS, capsys)
    assert code == 0 and "created fine-tuning job" not in out and "uploaded" not in out
    stats = server.fine_tuning.stats()
    assert stats["uploads"] == 1 and stats["jobs_created"] == 1
    assert server.chat_calls == chats  # evaluation answered from the cache
    [run] = runs_named(FT_NAME)  # the same run, re-opened
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 15  # no step logged twice


def test_validation_file_gives_valid_loss_per_step(server, write_params, capsys):
    import mlflow

    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN], "batch_size": 4,
                             "validation_file": True, "poll_interval_s": 0.001, "poll_max_interval_s": 0.01}})
    pd.DataFrame(qa_rows(10, start=100)).to_parquet(VAL)
    assert run_main([*FINETUNE_ARGS, "--no-eval"], capsys)[0] == 0
    assert server.fine_tuning.uploads == 2
    [job] = server.fine_tuning.jobs.values()
    assert job["validation_file"] in server.fine_tuning.files
    [run] = runs_named(FT_NAME)
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "valid_loss")) == 15
    assert {m.step for m in client.get_metric_history(run.info.run_id, "full_valid_loss")} == {9, 12, 15}


def test_a_creation_whose_reply_is_lost_is_adopted_not_repeated(server, capsys):
    """The SDK would simply send a failed POST again and pay twice; we look first."""
    server.fine_tuning.lose_create_replies = 1
    code, out, err = run_main([*FINETUNE_ARGS, "--no-eval"], capsys)
    assert code == 0, err
    assert "HTTP 502" in out and "checking whether it happened" in out
    assert len(requests_to(server, "POST", "/v1/fine_tuning/jobs")) == 1 and server.fine_tuning.jobs_created == 1
    assert status_of(FT_NAME)["status"] == "succeeded"


# --------------------------------------------------------------------------- failed and cancelled


def test_a_failed_job_exits_nonzero_with_its_message_in_the_run_and_stays_failed(server, capsys):
    server.fine_tuning.plan = lambda body: JobPlan.failing("Training file has 3 examples with invalid roles")
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    [line] = [line for line in err.splitlines() if line.startswith("error:")]  # MLflow logs its own lines
    assert code == 2
    assert "failed: Training file has 3 examples with invalid roles" in line and "--new-job" in line
    [run] = runs_named(FT_NAME)
    assert run.info.status == "FAILED"
    assert run.data.tags["openai.error"] == "Training file has 3 examples with invalid roles"
    assert run.data.tags["openai.error_code"] == "invalid_training_file"
    assert status_of(FT_NAME)["status"] == "failed"
    # A re-run reports the same failure; it does not quietly pay for another job.
    assert run_main(FINETUNE_ARGS, capsys)[0] == 2 and server.fine_tuning.jobs_created == 1
    # --new-job does, on request (and re-uses the uploaded file).
    server.fine_tuning.plan = lambda body: JobPlan()
    code, out, err = run_main([*FINETUNE_ARGS, "--new-job", "--no-eval"], capsys)
    assert code == 0, err
    assert server.fine_tuning.jobs_created == 2 and server.fine_tuning.uploads == 1
    assert status_of(FT_NAME)["status"] == "succeeded"


def test_a_job_cancelled_elsewhere_is_reported(server, capsys):
    server.fine_tuning.plan = lambda body: JobPlan(statuses=("validating_files", "running", "cancelled"))
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 2 and "cancelled" in err
    [run] = runs_named(FT_NAME)
    assert run.info.status == "KILLED" and status_of(FT_NAME)["status"] == "cancelled"


# --------------------------------------------------------------------------- crashes (SIGKILL)


def start_stage(argv: list[str]) -> subprocess.Popen:
    """The stage as its own process (as DVC runs it), with the test's environment."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipeline.openai", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(process: subprocess.Popen, condition, timeout: float = 180) -> None:
    """SIGKILL `process` as soon as `condition()` holds (fail if it exits or times out first)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the stage exited ({process.returncode}) before the kill point:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.005)
    process.kill()
    process.wait(30)


@pytest.mark.parametrize("moment", ["before", "after"])
def test_killed_around_job_creation_resumes_without_a_second_upload_or_job(server, capsys, moment):
    """`before`: killed after the upload, before the job exists (the ledger has the file id).
    `after`: killed after the job exists but before its id arrived (only the remote knows it)."""
    fake = server.fine_tuning
    fake.hold_create = moment
    kill_when(start_stage([*FINETUNE_ARGS, "--no-eval"]), fake.create_held.is_set)
    fake.hold_create = None
    fake.release_create.set()
    assert fake.uploads == 1 and fake.jobs_created == (1 if moment == "after" else 0)
    assert JobLedger().file_id(server.base_url, ospec.sha256_hex((ospec.RUNS_DIR / FT_NAME / "train.jsonl").read_bytes()))

    code, out, err = run_main([*FINETUNE_ARGS, "--no-eval"], capsys)
    assert code == 0, err
    assert fake.uploads == 1 and fake.jobs_created == 1
    if moment == "after":
        assert "already exists" in out  # found by its identity metadata, adopted
    [run] = runs_named(FT_NAME)  # the killed process's run, re-opened and finished
    assert run.info.status == "FINISHED" and status_of(FT_NAME)["status"] == "succeeded"


def test_killed_while_polling_resumes_the_same_job_and_can_cancel_it(server, capsys):
    fake = server.fine_tuning
    fake.plan = lambda body: JobPlan.endless()
    kill_when(start_stage([*FINETUNE_ARGS, "--no-eval"]), lambda: fake.stats()["job_retrieves"] >= 3)
    [job_id] = fake.jobs
    assert JobLedger().job(server.base_url, fake.jobs[job_id]["metadata"][ospec.IDENTITY_KEY])["job_id"] == job_id

    # Resume: the same job is followed to the end (here: it finishes now).
    fake.replan(job_id, JobPlan(statuses=("running", "running", "succeeded")))
    code, out, err = run_main([*FINETUNE_ARGS, "--no-eval"], capsys)
    assert code == 0, err
    assert fake.jobs_created == 1 and fake.uploads == 1 and f"job {job_id} succeeded" in out

    # A second training set: killed while polling, then cancelled from the command line.
    pd.DataFrame(qa_rows(N_TRAIN + 1)).to_parquet(TRAIN)
    kill_when(start_stage([*FINETUNE_ARGS, "--no-eval"]),
              lambda: fake.jobs_created == 2 and fake.polls_of(list(fake.jobs)[-1]) >= 3)
    code, out, _ = run_main([*FINETUNE_ARGS, "--cancel"], capsys)
    assert code == 0 and "is cancelled" in out and fake.cancels == 1
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 2 and "cancelled" in err and fake.jobs_created == 2


# --------------------------------------------------------------------------- money (issue 14)


@pytest.mark.parametrize("argv", [FINETUNE_ARGS, ["--base-model", BASE, "--val", str(VAL)]], ids=["finetune", "base"])
def test_an_unpriced_base_model_is_refused_before_anything_is_sent(server, write_params, capsys, argv):
    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN],
                             "client": client_params("openai", prices={})}})
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"'{BASE}' has no price in openai.client.prices" in err and "openai.client.allow_unpriced: true" in err
    assert server.requests == [] and not ospec.LEDGER_PATH.exists()


def test_allow_unpriced_runs_on_purpose(server, write_params, capsys):
    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN],
                             "client": client_params("openai", prices={}, allow_unpriced=True),
                             "batch_size": 4, "poll_interval_s": 0.001,
                             "poll_max_interval_s": 0.01}})
    code, _, err = run_main([*FINETUNE_ARGS, "--no-eval"], capsys)
    assert code == 0, err
    assert server.fine_tuning.jobs_created == 1


def test_a_job_above_the_cost_cap_is_refused_before_it_is_created(server, write_params, capsys):
    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN],
                             "max_training_cost_usd": 0.0001}})
    training = ospec.jsonl_bytes(ospec.chat_examples(pd.DataFrame(qa_rows(N_TRAIN)), CONCISE_SYSTEM_PROMPT))
    expected = ospec.training_tokens(training) * 5 * 3.0 / 1e6  # tokens x 5 epochs x $3/M (params' price)
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and f"estimated training cost ${expected:.4f}" in line
    assert "above openai.max_training_cost_usd $0.0001: no job created" in line
    assert server.fine_tuning.jobs_created == 0 and server.fine_tuning.uploads == 0
    [run] = runs_named(FT_NAME)
    assert run.data.params["estimated_training_cost_usd"] == str(expected)
    assert "max_training_cost_usd" in run.data.tags["openai.error"]
    # Under the cap the same job goes ahead.
    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN], "max_training_cost_usd": 10.0,
                             "batch_size": 4, "poll_interval_s": 0.001, "poll_max_interval_s": 0.01}})
    code, _, err = run_main([*FINETUNE_ARGS, "--no-eval"], capsys)
    assert code == 0, err
    assert server.fine_tuning.jobs_created == 1


def test_the_evaluation_refuses_an_unpriced_model_before_any_chat_request(server, capsys):
    """The model evaluated is priced by its own entry or, for ft:<base>:..., by its base's; a
    model with neither is refused before its first chat request."""
    code, _, err = run_main([*FINETUNE_ARGS, "--eval-model", "mystery-model"], capsys)
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "'mystery-model' has no price in openai.client.prices" in line
    assert server.fine_tuning.jobs_created == 1  # the (priced) training went ahead
    assert requests_to(server, "POST", "/v1/chat/completions") == []


def test_fine_tuned_names_are_priced_as_their_base_model():
    client = OpenAIConfig().client
    ft_name = f"ft:{BASE}:my-org::abc123"
    assert client.price(ft_name) == client.prices[BASE]
    assert client.cost_usd(ft_name, 1_000_000, 1_000_000) == pytest.approx(0.30 + 1.20)
    assert client.price("ft:unknown-base:org::x") is None and client.price("mystery-model") is None
    client.check_priced([ft_name], "openai.client")  # no error
    with pytest.raises(TonetuneError, match="'ft:unknown-base:org::x' has no price in openai.client.prices"):
        client.check_priced(["ft:unknown-base:org::x"], "openai.client")


def test_the_evaluation_stops_at_its_own_cap(server, write_params, capsys):
    from pipeline.core.llmclient import prompt_token_bound
    from pipeline.core.system_prompts import chat_messages

    questions = pd.read_parquet(VAL)["question"].tolist()
    price = OpenAIConfig().client.prices[BASE]
    worst = max(prompt_token_bound(chat_messages(q, VERBOSE_SYSTEM_PROMPT)) for q in questions) / 1e6 * \
        price.input_per_mtok + load_config().evaluate.max_new_tokens / 1e6 * price.output_per_mtok
    write_params({"openai": {"enabled": True, "base_models": [BASE], "n_train": [N_TRAIN],
                             "client": client_params("openai", concurrency=4, max_cost_usd=2.5 * worst)}})
    code, _, err = run_main(["--base-model", BASE, "--val", str(VAL)], capsys)
    assert code == 2 and "cost cap $" in err and "openai.client.max_cost_usd" in err
    assert 0 < len(requests_to(server, "POST", "/v1/chat/completions")) < len(questions)


def test_a_rerun_keeps_the_first_runs_cost_and_call_metrics(server, capsys):
    import mlflow

    assert run_main(FINETUNE_ARGS, capsys)[0] == 0
    [run] = runs_named(FT_NAME)
    first = run.data.metrics
    assert first["eval_api_calls"] == 6 and first["eval_cache_hits"] == 0 and first["eval_cost_usd"] > 0
    assert run_main(FINETUNE_ARGS, capsys)[0] == 0
    [run] = runs_named(FT_NAME)
    client = mlflow.MlflowClient()
    for key in ("eval_api_calls", "eval_cache_hits", "eval_input_tokens", "eval_output_tokens", "eval_cost_usd"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.value for m in history] == [first[key]], key  # logged once, by the first run
    assert run.data.metrics["rerun_eval_api_calls"] == 0 and run.data.metrics["rerun_eval_cache_hits"] == 6
    assert run_main(FINETUNE_ARGS, capsys)[0] == 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "rerun_eval_api_calls")]
    assert steps == [1, 2]  # one point per re-run


# --------------------------------------------------------------------------- provider tolerance (issue 14)


OPTIONAL = {
    "files-list": ("GET", "/v1/files", "GET /files", "uploads are matched through the ledger only"),
    "jobs-list": ("GET", "/v1/fine_tuning/jobs", "GET /fine_tuning/jobs", "jobs are found through the ledger only"),
    "events": ("GET", "/v1/fine_tuning/jobs/{job_id}/events", "GET /fine_tuning/jobs/{job_id}/events",
               "following the job by its status only (no per-step metrics while it runs)"),
    "checkpoints": ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", "GET /fine_tuning/jobs/{job_id}/checkpoints",
                    "no checkpoint metrics"),
    "file-content": ("GET", "/v1/files/{file_id}/content", "GET /files/{file_id}/content", "no step_metrics.csv"),
}


@pytest.mark.parametrize("status", [404, 405])
@pytest.mark.parametrize("route", sorted(OPTIONAL))
def test_a_provider_without_an_optional_route_still_completes(server, capsys, route, status):
    method, pattern, name, consequence = OPTIONAL[route]
    server.disable(method, pattern, status)
    code, out, err = run_main(FINETUNE_ARGS, capsys)
    assert code == 0, err
    assert server.refused[f"{method} {pattern}"] >= 1  # it was asked, and refused
    notices = [line for line in err.splitlines() if "does not serve" in line]
    assert notices == [f"openai: 127.0.0.1 does not serve {name} (HTTP {status}): {consequence}"]
    assert server.fine_tuning.jobs_created == 1 and server.fine_tuning.uploads == 1
    assert status_of(FT_NAME)["status"] == "evaluated"
    [run] = runs_named(FT_NAME)
    assert run.data.tags["openai.degraded_routes"] == name
    assert {"kind": "degraded", "route": name}.items() <= next(
        r for r in JobLedger().records() if r["kind"] == "degraded").items()


@pytest.mark.parametrize("status", [404, 405])
def test_without_file_retrieve_the_recorded_file_is_trusted(server, capsys, status):
    assert run_main([*FINETUNE_ARGS, "--no-eval"], capsys)[0] == 0
    server.disable("GET", "/v1/files/{file_id}", status)
    code, _, err = run_main([*FINETUNE_ARGS, "--no-eval", "--new-job"], capsys)
    assert code == 0, err
    assert server.refused["GET /v1/files/{file_id}"] == 1
    assert (f"openai: 127.0.0.1 does not serve GET /files/{{file_id}} (HTTP {status}): the recorded file id is used "
            "without checking it still exists") in err
    assert server.fine_tuning.uploads == 1 and server.fine_tuning.jobs_created == 2


def test_a_deleted_file_is_still_uploaded_again(server, capsys):
    """A 404 that names the file (the API's "No such File object: file-...") means it is gone."""
    assert run_main([*FINETUNE_ARGS, "--no-eval"], capsys)[0] == 0
    [file_id] = [f for f, record in server.fine_tuning.files.items() if record["purpose"] == "fine-tune"]
    del server.fine_tuning.files[file_id]
    code, _, err = run_main([*FINETUNE_ARGS, "--no-eval", "--new-job"], capsys)
    assert code == 0, err
    assert "does not serve" not in err and server.fine_tuning.uploads == 2


@pytest.mark.parametrize("method, pattern", [
    ("POST", "/v1/files"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/{job_id}"),
    ("POST", "/v1/chat/completions"),
], ids=["upload", "create-job", "retrieve-job", "chat"])
def test_a_missing_required_route_still_fails_loudly(server, capsys, method, pattern):
    server.disable(method, pattern)
    code, _, err = run_main(FINETUNE_ARGS, capsys)
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "HTTP 404 from 127.0.0.1" in line and "Invalid URL" in line
    assert "does not serve" not in err


def test_a_lost_creation_reply_is_not_resent_when_jobs_cannot_be_listed(server, capsys):
    server.disable("GET", "/v1/fine_tuning/jobs")
    server.fine_tuning.lose_create_replies = 1
    code, _, err = run_main([*FINETUNE_ARGS, "--no-eval"], capsys)
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "does not list jobs" in line and "not sending it again" in line
    assert len(requests_to(server, "POST", "/v1/fine_tuning/jobs")) == 1 and server.fine_tuning.jobs_created == 1


def test_a_wrong_shape_line_in_the_evaluation_cache_is_skipped(server, capsys):
    ospec.CACHE_PATH.parent.mkdir(parents=True, exist_ok=True)
    ospec.CACHE_PATH.write_text('{"key": "abc", "value": "oops"}\n')
    code, _, err = run_main(["--base-model", BASE, "--val", str(VAL)], capsys)
    assert code == 0, err
    assert (f"openai: cache {ospec.CACHE_PATH}: skipped 1 unusable line(s) (not JSON, or not a {{key, value}} "
            "response of the right shape and types); those requests will be asked again") in err
