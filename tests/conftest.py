"""Fixtures shared across the suite.

Everything runs offline: the hub is unreachable here, so HF_HUB_OFFLINE is forced on, and every
test that touches MLflow gets its own temporary sqlite store (never the repo's mlflow.db).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GIT_AUTHOR_NAME": "tonetune tests",
    "GIT_AUTHOR_EMAIL": "tests@tonetune.invalid",
    "GIT_COMMITTER_NAME": "tonetune tests",
    "GIT_COMMITTER_EMAIL": "tests@tonetune.invalid",
}.items():
    os.environ[_key] = _value

REPO_ROOT = Path(__file__).resolve().parent.parent


MLFLOW_STATE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID",
                          "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True, scope="module")
def mlflow_state_stays_in_its_module():
    """MLflow keeps its store, registry and active experiment in process globals, and
    `set_tracking_uri`/`set_registry_uri` also export them as environment variables that every
    later subprocess inherits. A test module that points MLflow at a temporary store or server
    would otherwise leave the next module talking to a deleted store or a stopped server (seen:
    "No Experiment with id=1", "Connection refused" on a server port of an earlier module).
    Restore all of it when each module ends."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    environment = {name: os.environ.get(name) for name in MLFLOW_STATE_VARIABLES}
    tracking, registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    yield
    while fluent.active_run() is not None:
        fluent.end_run()
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tracking_utils._tracking_uri, registry_utils._registry_uri = tracking, registry
    fluent._active_experiment_id = None


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store for this test, exported as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture
def write_params(tmp_path, monkeypatch):
    """Write a params file from the repo's params.yaml with per-section overrides, and point
    TONETUNE_PARAMS at it. Usage: write_params({"generate": {"target_pairs": 5}})."""

    def _write(overrides: dict | None = None, path: Path | None = None) -> Path:
        params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        for section, values in (overrides or {}).items():
            if isinstance(values, dict) and isinstance(params.get(section), dict):
                params[section] = {**params[section], **values}
            else:
                params[section] = values
        target = path or tmp_path / "params.yaml"
        target.write_text(yaml.safe_dump(params, sort_keys=False))
        monkeypatch.setenv("TONETUNE_PARAMS", str(target))
        return target

    return _write


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer and chat template, extracted once from the packaged GGUF."""
    from transformers import AutoTokenizer

    from pipeline.core.assets import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer, saved as a plain HF
    folder: the same architecture and chat template as the demo base model, trained in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The team's PostgreSQL-backed tracking server, one per session (tests/team_fixtures.py).
from tests.team_fixtures import team_server_info  # noqa: E402,F401
