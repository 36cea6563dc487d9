"""`python -m registry replay`: re-ask the evaluated questions through the served model.

A temp sqlite store holds a tiny real LoRA adapter (over conftest's tiny Llama) logged by a
training run with registry.model.log_adapter_model, registered as version 1. The "evaluated"
answers are what the model's own pyfunc gave to all questions in one request, written where the
predict and heldout stages write theirs. Replaying must find every one of them byte for byte
(alone and shuffled), find the registered version and the run's logged model by name, and name
the question whose recorded answer does not match.
"""

from __future__ import annotations

import json

import pytest

from tests.test_registry import SERVE_BATCH_SIZE, SERVE_POLICY, save_adapter

NAME = "tt-replay"
MODEL = "lora-fp32-r4-tiny"
VAL_QUESTIONS = ["Why is the sky blue?", "How do plants make food from sunlight?", "What is a prime number?",
                 "Who wrote Hamlet, and when was it first performed?"]
TEST_QUESTIONS = ["Why do cats purr?", "How does a bicycle stay upright when it moves?"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir):
    """A sqlite store with a training run named MODEL that logged the tiny adapter, and NAME v1."""
    import mlflow

    from pipeline.core.contracts import Tags
    from pipeline.core.machine import numerics_facts
    from registry.model import DecodingPolicy, base_model_reference, log_adapter_model

    root = tmp_path_factory.mktemp("replay")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    adapter = save_adapter(tiny_llama_dir, root / "adapter", seed=3, r=4)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("replay", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment, run_name=MODEL) as run:
            info = log_adapter_model(adapter, base_model_reference(tiny_llama_dir), "fp32",
                                     DecodingPolicy(**SERVE_POLICY), SERVE_BATCH_SIZE)
            mlflow.set_tag(Tags.ADAPTER_MODEL_URI, info.model_uri)
        mlflow.register_model(info.model_uri, NAME)
        model = mlflow.pyfunc.load_model(info.model_uri)
        evaluated = {"val": model.predict(VAL_QUESTIONS), "test": model.predict(TEST_QUESTIONS)}
    finally:
        mlflow.set_tracking_uri(previous)
    return {"root": root, "uri": uri, "run_id": run.info.run_id, "evaluated": evaluated, "numerics": numerics_facts()}


@pytest.fixture
def project(store, tmp_path, monkeypatch, write_params):
    """A working directory holding the evaluated answers where predict and heldout write them."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    write_params()
    for folder, questions, answers in (("reports/predictions", VAL_QUESTIONS, store["evaluated"]["val"]),
                                       ("reports/heldout", TEST_QUESTIONS, store["evaluated"]["test"])):
        (tmp_path / folder).mkdir(parents=True)
        pd.DataFrame({"id": [f"{folder[8:11]}-{i}" for i in range(len(questions))], "question": questions,
                      "answer": answers}).to_parquet(tmp_path / folder / f"{MODEL}.parquet")
        (tmp_path / folder / f"{MODEL}.json").write_text(json.dumps(
            {"model": MODEL, "training_run_id": store["run_id"], "numerics": store["numerics"]}))
    return tmp_path


def replay(*argv: str) -> int:
    from registry.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["replay", *argv])
    return exit_info.value.code


def test_the_registered_version_gives_every_evaluated_answer_alone_and_shuffled(project, capsys):
    assert replay(f"models:/{NAME}/1") == 0
    out = capsys.readouterr().out
    assert f"(evaluated as {MODEL})" in out
    assert "validation: 4/4 identical sent alone, 4/4 identical in one shuffled request of 4" in out
    assert "test: 2/2 identical sent alone, 2/2 identical in one shuffled request of 2" in out
    assert "other machine facts" not in out


def test_an_evaluated_adapter_name_replays_the_model_its_training_run_logged(project, capsys):
    assert replay(MODEL, "--no-alone") == 0
    out = capsys.readouterr().out
    assert "validation: 4/4 identical in one shuffled request of 4" in out and "sent alone" not in out


def test_an_answer_that_was_not_what_the_model_gives_is_counted_and_named(project, capsys):
    import pandas as pd

    path = project / "reports/predictions" / f"{MODEL}.parquet"
    table = pd.read_parquet(path)
    table.loc[2, "answer"] = table.loc[2, "answer"] + " "
    table.to_parquet(path)
    assert replay(f"models:/{NAME}/1", "--no-shuffled") == 1
    out = capsys.readouterr().out
    assert "validation: 3/4 identical sent alone; differing ids: pre-2" in out
    assert "test: 2/2 identical sent alone" in out


def test_other_machine_facts_are_named_before_the_counts(project, capsys):
    record_path = project / "reports/heldout" / f"{MODEL}.json"
    record = json.loads(record_path.read_text())
    record["numerics"]["torch_threads"] = 64
    record_path.write_text(json.dumps(record))
    assert replay(MODEL, "--no-alone") == 0
    out = capsys.readouterr().out
    assert "test: evaluated on other machine facts, so answers may differ: torch_threads: 64 ->" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["lora-nope"], "lora-nope: neither a models:/ URI nor an evaluated model"),
    ([f"models:/{NAME}/7"], f"{NAME} has no version 7"),
    ([f"models:/{NAME}@production"], f"{NAME} has no version with alias production"),
    ([MODEL, "--limit", "0"], "--limit 0: must be a positive number"),
])
def test_a_bad_target_is_one_line_before_any_model_loads(project, capsys, argv, message):
    assert replay(*argv) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- `registry serve`: the same targets


def serve(*argv: str) -> int:
    from registry.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *argv])
    return exit_info.value.code


@pytest.mark.parametrize(("argv", "message"), [
    # NAME has version 1 but no production alias; the evaluated adapter is offered instead
    ([f"models:/{NAME}@production"], f"models:/{NAME}@production: {NAME} has no version with alias production: "
     f"1 version(s) are registered, none holds alias production (`python -m registry list`); "
     f"to serve an evaluated adapter anyway: make serve TARGET={MODEL}"),
    # a model the rule never registered: the demo's "inconclusive" end
    (["models:/tt-never@production"], "tt-never has no version with alias production: the promotion rule has "
     f"promoted no finalist yet (`python -m registry summary` says why); to serve an evaluated adapter anyway: "
     f"make serve TARGET={MODEL}"),
    ([f"models:/{NAME}@candidate"], f"{NAME} has no version with alias candidate: `python -m registry list`"),
    ([f"models:/{NAME}/7"], f"{NAME} has no version 7"),
    (["lora-nope"], "lora-nope: neither a models:/ URI nor an evaluated model"),
    ([MODEL, "--port", "70000"], "--port 70000: not a TCP port"),
])
def test_serve_says_in_one_line_what_is_missing_before_any_server_starts(project, capsys, monkeypatch, argv, message):
    import os

    def no_exec(*args):
        raise AssertionError(f"a server was started: {args}")

    monkeypatch.setattr(os, "execve", no_exec)
    assert serve(*argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_serve_resolves_a_version_or_an_evaluated_adapter_to_the_model_it_serves(project, store, capsys, monkeypatch):
    """An alias is pinned to its version; an adapter's name gives the model its training run logged
    (the same URI `replay` loads); then the process becomes `mlflow models serve` on it."""
    import os

    from mlflow import MlflowClient

    from pipeline.core.contracts import Tags
    from registry.serve import served_uri

    client = MlflowClient(store["uri"])
    client.set_registered_model_alias(NAME, "staging-check", "1")
    try:
        assert served_uri(client, f"models:/{NAME}@staging-check") == f"models:/{NAME}/1"
    finally:
        client.delete_registered_model_alias(NAME, "staging-check")
    logged = client.get_run(store["run_id"]).data.tags[Tags.ADAPTER_MODEL_URI]
    assert served_uri(client, MODEL) == logged

    started = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((path, argv, env)))
    monkeypatch.delenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", raising=False)
    assert serve(MODEL, "--port", "5099") == 0
    (path, argv, env), = started
    assert argv[1:] == ["models", "serve", "-m", logged, "--env-manager", "local", "--host", "127.0.0.1",
                        "--port", "5099"] and path == argv[0] and path.endswith("mlflow")
    assert env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] == "600"
    assert f"serve: {MODEL} -> {logged}" in capsys.readouterr().out
