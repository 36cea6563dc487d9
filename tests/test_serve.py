"""The production alias served over REST the MLflow way (`make serve`: `python -m registry serve`).

A registry in a temp sqlite store holds one version of a tiny real LoRA adapter (over conftest's
tiny Llama), logged with registry.model.log_adapter_model and aliased `production`.
`python -m registry serve models:/<name>@production` (which resolves the alias, then becomes
`mlflow models serve --env-manager local`) runs as a subprocess on a free 127.0.0.1 port; real HTTP requests to /invocations must get, string for string, what
`mlflow.pyfunc.load_model(...).predict` and the predict stage's answer_questions give for the
same questions under the same decoding policy and batch size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_registry import QUESTION, SERVE_BATCH_SIZE, SERVE_POLICY, free_port, save_adapter

NAME = "tt-serve"
QUESTIONS = [QUESTION, "How do plants make food from sunlight?"]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_llama_dir):
    """A temp sqlite store with NAME v1 (the tiny adapter) aliased production."""
    import mlflow
    from mlflow import MlflowClient

    from registry.model import DecodingPolicy, base_model_reference, log_adapter_model

    root = tmp_path_factory.mktemp("serve_registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    adapter = save_adapter(tiny_llama_dir, root / "adapter", seed=1, r=4)
    base_reference = base_model_reference(tiny_llama_dir)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_adapter_model(adapter, base_reference, "fp32", DecodingPolicy(**SERVE_POLICY), SERVE_BATCH_SIZE)
        version = mlflow.register_model(info.model_uri, NAME)
        MlflowClient().set_registered_model_alias(NAME, "production", version.version)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"root": root, "uri": uri, "adapter": adapter, "base_reference": base_reference, "run_id": run.info.run_id}


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    """`python -m registry serve models:/NAME@production` (what `make serve` runs: it resolves the
    alias, then becomes `mlflow models serve`) on a free port, stopped by killing its group."""
    cwd = tmp_path_factory.mktemp("serve_cwd")
    port = free_port()
    log_path = cwd / "serve.log"
    # The scoring server is started as `uvicorn` from PATH: the venv's bin folder must be on it
    # (make puts it there; a bare `.venv/bin/python -m pytest` does not).
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"], "PYTHONPATH": str(REPO_ROOT),
           "MLFLOW_DISABLE_TELEMETRY": "true", "TONETUNE_PARAMS": str(REPO_ROOT / "params.yaml"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", f"models:/{NAME}@production", "--port", str(port)],
            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"registry serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"registry serve did not answer {url}/ping within 120 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        # the front resolved the alias to the version before MLflow took over the process
        assert f"serve: models:/{NAME}@production -> models:/{NAME}/1 on {url}" in log_path.read_text()
        yield url
    finally:
        try:
            process.terminate()
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the scoring workers uvicorn forked
        except ProcessLookupError:
            pass
        process.wait()


def test_served_production_model_answers_like_load_model_and_the_predict_stage(registry, served):
    import mlflow

    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT
    from registry.model import DecodingPolicy, answer_questions, load_adapter_model

    status, body = post(f"{served}/invocations", {"inputs": QUESTIONS})
    assert status == 200, body
    print("POST /invocations", json.dumps({"inputs": QUESTIONS}), "->", json.dumps(body))
    served_answers = body["predictions"]


    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registry["uri"])
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(QUESTIONS)
    finally:
        mlflow.set_tracking_uri(previous)
    model, tokenizer = load_adapter_model(registry["base_reference"]["path"], registry["adapter"], "fp32")
    expected = answer_questions(model, tokenizer, QUESTIONS, CONCISE_SYSTEM_PROMPT, DecodingPolicy(**SERVE_POLICY),
                                SERVE_BATCH_SIZE).answers

    assert len(expected) == 2 and all(isinstance(answer, str) for answer in expected)
    assert served_answers == loaded == expected


def test_a_dataframe_payload_is_refused_with_a_message_naming_the_inputs_key(served):
    """predict is type-hinted list[str] -> list[str]: MLflow's scoring server then takes only the
    `inputs` form and says so (the README documents that form only)."""
    status, body = post(f"{served}/invocations", {"dataframe_split": {"columns": ["question"], "data": [[QUESTION]]}})
    print("dataframe_split ->", status, json.dumps(body))
    assert status == 400 and "'inputs' key" in body.get("message", ""), (status, body)


def test_a_malformed_request_gets_a_4xx_with_a_message_and_the_server_keeps_serving(served):
    status, body = post(f"{served}/invocations", {"inputs": 5})
    print("inputs: 5 ->", status, json.dumps(body))
    assert 400 <= status < 500, (status, body)
    assert body.get("message"), body
    with urllib.request.urlopen(f"{served}/ping", timeout=5) as response:
        assert response.status == 200
