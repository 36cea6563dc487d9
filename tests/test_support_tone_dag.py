"""The worked example tone end to end: a real `dvc repro` of the project's own dvc.yaml, in a
temporary git repo, with profiles/support.yaml applied the way docs/your-own-tone.md says
(`python -m pipeline.core.config apply support`), every stage from source to promote.

Only three things differ from what a user runs: the generator LLM is the local OpenAI-compatible
test server (tests/fakes/openai_server.py, driven by the support prompts: see
tests/test_support_tone.support_generator), the base model is a tiny random Llama given as a local
folder (`base_model.source: hub`, the path a user takes for their own model), and the sizes are
scaled down (8 help-page sections, one grid point, 8 new tokens). Train, predict, score, heldout,
report and promote run for real.

What it shows: the tone's metrics under their own names in metrics/eval, in the MLflow training
run and in the model card; the prompt versions logged on the generation and training runs and
named in the card; a promotion decision recorded by the declared rule (metrics/promotion.json and
`decision.*` tags), then a forced promotion whose card carries the tone and the overridden
refusal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.prompts import prompt_version
from tests import test_evaluate
from tests.conftest import REPO_ROOT
from tests.fakes.openai_server import FakeOpenAIServer
from tests.generate_support import API_KEY, KEY_ENV
from tests.test_support_tone import support_generator

pytestmark = pytest.mark.slow  # one `dvc repro` of 17 stages on a tiny model: ~3-4 min on 2 cores

chatty_llama_dir = test_evaluate.chatty_llama_dir  # a tiny model that answers (module-scoped fixture)
MODEL_NAME = "tonetune-support"
TONE = "support_formal"
SCALED_DOWN = {  # test-only sizes over the applied profile (section -> values merged into it)
    "generate": {"model": "fake-model", "target_pairs": 8},
    "split": {"val_size": 2, "train_sizes": [3], "test_size": None, "min_test_size": 1, "seed": 0},
    "train": {"grid": {"precision": ["bf16"], "lora_r": [4], "learning_rate": [0.001], "n_train": [3]},
              "epochs": 1, "per_device_batch_size": 2, "gradient_accumulation_steps": 1},
    "evaluate": {"max_new_tokens": 8, "batch_size": 4, "bootstrap_samples": 200, "ablation_limit": 0},
    "promote": {"bootstrap_samples": 1000},  # the smallest the params accept
    "openai": {"n_train": [3]},  # off, but its stages depend on train_<n> (split.train_sizes must hold it)
    "tracking": {"system_metrics": False},
}


def run(command: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the temp repo, output captured as text."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def support_params(repo: Path, base_url: str, base_dir: Path) -> None:
    """The applied support profile (as written by `apply`) with the test server, the tiny base model
    and the scaled-down sizes merged in."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["tone"]["name"] == TONE  # `apply support` wrote the profile
    for section, values in SCALED_DOWN.items():
        merged = {**params[section], **values}
        params[section] = merged
    params["generate"]["client"] = {
        **params["generate"]["client"], "base_url": base_url, "api_key_env": KEY_ENV, "concurrency": 2,
        "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
        "prices": {"fake-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}}
    params["base_model"] = {"source": "hub", "hub_id": str(base_dir), "revision": None, "dtype": "bfloat16"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def support_dag(tmp_path_factory, chatty_llama_dir) -> dict:
    """Build the repo, declare the rule (commit), `dvc repro` against the test server, then force
    the refused finalist into the registry; record what each step printed."""
    from pipeline.core.assets import ensure_nltk_cmudict

    ensure_nltk_cmudict()  # share the project's offline CMU dictionary with the subprocesses
    root = tmp_path_factory.mktemp("support_dag")
    repo = root / "repo"
    repo.mkdir()
    for folder in ("pipeline", "registry", "prompts", "tones", "corpora", "profiles", "recordings"):
        shutil.copytree(REPO_ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, repo / name)
    (repo / ".gitignore").write_text("__pycache__/\n/mlartifacts/\n/mlflow.db\n/nltk_data/\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(repo), KEY_ENV: API_KEY, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for variable in ("TONETUNE_PARAMS", "MLFLOW_TRACKING_URI"):
        env.pop(variable, None)  # the repo's own params.yaml and sqlite:///mlflow.db, as a user has them

    record: dict = {"repo": repo, "env": env}
    with FakeOpenAIServer(chat=support_generator) as server:
        run(["git", "init", "-q", "-b", "main"], repo, env)
        run(["dvc", "init", "-q"], repo, env)
        record["apply"] = run([sys.executable, "-m", "pipeline.core.config", "apply", "support"], repo, env)
        support_params(repo, server.base_url, chatty_llama_dir)
        run(["git", "add", "."], repo, env)
        run(["git", "commit", "-q", "-m", "support tone: declare the rule"], repo, env)  # before any test prediction
        record["repro"] = run(["dvc", "repro"], repo, env, check=False)
        record["chat_calls"] = server.chat_calls
    if record["repro"].returncode == 0:
        record["force"] = run([sys.executable, "-m", "registry", "promote", "--force", "--reason",
                               "test: a tiny random model, forced to check the card"], repo, env, check=False)
    return record


def reproduced(support_dag) -> Path:
    """The repo, failing with the pipeline's own output if `dvc repro` failed."""
    repro = support_dag["repro"]
    assert repro.returncode == 0, repro.stdout[-6000:] + repro.stderr[-6000:]
    return support_dag["repo"]


def training_run(repo: Path):
    """The one grid point's MLflow training run (the run id its adapter folder records)."""
    import mlflow

    adapter = repo / "models/adapters/lora-bf16-r4-lr0.001-n3"
    run_id = json.loads((adapter / "tonetune_adapter.json").read_text())["mlflow_run_id"]
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(run_id)


def test_every_stage_runs_from_source_to_promote(support_dag):
    repo = reproduced(support_dag)
    out = support_dag["repro"].stdout
    for stage in ("source", "base_model", "generate", "validate", "split", "train@", "predict", "score",
                  "heldout", "report", "promote"):
        assert f"Running stage '{stage}" in out, stage
    assert support_dag["chat_calls"] > 0  # the pairs came from the test server, not from recordings
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert "promote" in lock and "train@bf16-4-0.001-3" in lock
    status = run(["dvc", "status"], repo, support_dag["env"]).stdout.split()
    assert status == ["promote:", "always", "changed"]  # the registry lives outside DVC; every other stage is current


def test_metrics_are_named_after_the_tone(support_dag):
    repo = reproduced(support_dag)
    records = {path.stem: json.loads(path.read_text()) for path in (repo / "metrics/eval").glob("*.json")}
    assert set(records) == {"base", "lora-bf16-r4-lr0.001-n3"}
    for record in records.values():
        assert {f"pct_{TONE}", f"pct_{TONE}_ci_low", "fk_grade_mean", "words_median", "second_person_mean"} <= set(record)
        assert not [key for key in record if "conversational" in key or key.startswith("flesch")]
    from pipeline.core.predictions import MLFLOW_METRIC_PREFIX

    metrics = training_run(repo).data.metrics  # the score stage logs onto the adapter's training run
    assert {f"{MLFLOW_METRIC_PREFIX}pct_{TONE}", f"{MLFLOW_METRIC_PREFIX}fk_grade_mean"} <= set(metrics)
    assert not [key for key in metrics if "conversational" in key]
    results = (repo / "reports/results.md").read_text()
    assert "% support formal responses" in results
    # dvc.yaml's plots read the tone's column: `dvc plots show` finds it in the report's CSV files
    shown = run(["dvc", "plots", "show", "--json"], repo, support_dag["env"]).stdout
    fields = json.loads(shown)["data"]  # {"data": {plot file: [{"content": vega spec, ...}]}}
    on_style = json.dumps(fields["reports/plots/on_style_vs_samples.csv"])
    assert f'"field": "pct_{TONE}"' in on_style and "tone support_formal" in on_style
    assert "conversational" not in json.dumps(fields["reports/plots/base_vs_finetuned.csv"])


def test_prompt_versions_are_logged(support_dag):
    import mlflow

    repo = reproduced(support_dag)
    concise = (repo / "prompts/support/system_concise.txt").read_text()[:-1]
    tags = training_run(repo).data.tags
    assert tags["prompt.system_concise.version"] == prompt_version(concise)
    assert tags["prompt.system_concise.uri"].startswith(f"prompts:/tonetune-{TONE}-system_concise/")
    manifest = json.loads((repo / "data/generated/manifest.json").read_text())
    generation = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(manifest["mlflow_run_id"])
    assert generation.data.tags["tone"] == TONE
    assert generation.data.tags["prompt.rephrase_system.version"] == prompt_version(
        (repo / "prompts/support/generate_rephrase_system.txt").read_text()[:-1])


def test_the_promotion_decision_is_recorded_by_the_rule(support_dag):
    repo = reproduced(support_dag)
    decision = json.loads((repo / "metrics/promotion.json").read_text())
    assert {"decision", "n_test", "style_gain_estimate", "style_gain_bound"} <= set(decision)
    heldout = json.loads((repo / "reports/heldout/decision.json").read_text())
    assert heldout["finalist"] == "lora-bf16-r4-lr0.001-n3"
    assert decision["n_test"] == len(__import__("pandas").read_parquet(repo / "data/splits/test.parquet"))
    tags = training_run(repo).data.tags
    assert tags["decision.outcome"] in {"promote", "refuse", "inconclusive"}
    out = support_dag["repro"].stdout
    assert ("PROMOTED" in out) and "style_gain" in out  # the stage printed its outcome and the checks


def test_the_model_card_speaks_the_tone(support_dag):
    import mlflow

    repo = reproduced(support_dag)
    force = support_dag["force"]
    assert force.returncode == 0, force.stdout + force.stderr
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    version = client.get_model_version_by_alias(MODEL_NAME, "production")
    card = version.description
    assert "support formal LoRA adapter" in card and "formally, in the second person" in card
    assert f"pct_{TONE}" in card or "% support formal" in card
    assert "conversational" not in card.split("**Prompts.**")[0]
    concise = (repo / "prompts/support/system_concise.txt").read_text()[:-1]
    assert f"`system_concise` {prompt_version(concise)}" in card
    assert "test: a tiny random model" in card  # the forced promotion says why
