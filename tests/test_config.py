"""params.yaml validation, seen the way a user sees it: run a stage with a bad params file and
get exit code 2, exactly one line on stderr naming the key and the bad value, and no output.

Also: every existing `python -m pipeline.<stage> --help` answers fast because no heavy library
is imported at module level.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pydantic import BaseModel

from pipeline.core.config import Config, load_config, parse_config
from pipeline.core.errors import ConfigError
from tests.conftest import REPO_ROOT

PYTHON = sys.executable

# (overrides applied to the repo's params.yaml, fragments the one-line error must contain)
BAD_PARAMS = {
    "unknown key": ({"source": {"min_charz": 700}}, ["unknown key", "source.min_charz"]),
    "unknown section": ({"sourcee": {"min_chars": 700}}, ["unknown key", "sourcee"]),
    "unknown nested key": ({"train": {"grid": {"lora_rank": [32]}}}, ["unknown key", "train.grid.lora_rank"]),
    "string for int": ({"source": {"min_chars": "many"}}, ["source.min_chars = 'many'", "integer"]),
    "fraction for int": ({"split": {"val_size": 2.5}}, ["split.val_size = 2.5", "integer"]),
    "string for float": ({"generate": {"dedup_threshold": "high"}}, ["generate.dedup_threshold = 'high'", "number"]),
    "scalar for list": ({"train": {"grid": {"lora_r": 32}}}, ["train.grid.lora_r = 32", "list"]),
    "section not a mapping": ({"source": 5}, ["source = 5", "dictionary"]),
    "bad choice": ({"base_model": {"dtype": "fp16"}}, ["base_model.dtype = 'fp16'", "bfloat16", "float32"]),
    "flesch above 121": ({"tone": {"gate": [{"metric": "flesch_reading_ease", "threshold": 130}]}},
                         ["tone.gate.0", "121"]),
    "flesch below 0": ({"tone": {"on_style": [{"metric": "flesch_reading_ease", "threshold": -5}]}},
                       ["tone.on_style.0", ">= 0"]),
    "unknown style metric": ({"tone": {"on_style": [{"metric": "sparkle", "threshold": 1}]}},
                             ["tone.on_style.0", "'sparkle'", "tones.<module>:<function>"]),
    "function outside tones/": ({"tone": {"gate": [{"metric": "mymetrics:score", "threshold": 1}]}},
                                ["tone.gate.0", "'mymetrics:score'", "tones/ package"]),
    "bad direction": ({"tone": {"gate": [{"metric": "words_per_answer", "direction": "up", "threshold": 60}]}},
                      ["tone.gate.0.direction = 'up'", "'higher' or 'lower'"]),
    "no criteria": ({"tone": {"on_style": []}}, ["tone.on_style = []", "at least 1"]),
    "bad tone name": ({"tone": {"name": "Formal Tone"}}, ["tone.name = 'Formal Tone'", "pattern"]),
    # issue 24: the style thresholds moved into the tone spec
    "flesch gate at its old place": ({"generate": {"flesch_threshold": 75}}, ["generate.flesch_threshold moved to tone.gate"]),
    "on-style threshold at its old place": (
        {"evaluate": {"conversational_threshold": 60}}, ["evaluate.conversational_threshold moved to tone.on_style"]),
    "cosine above 1": ({"generate": {"dedup_threshold": 1.5}}, ["generate.dedup_threshold = 1.5", "1"]),
    "cosine below 0": ({"generate": {"faithfulness_threshold": -0.2}}, ["generate.faithfulness_threshold = -0.2"]),
    "negative min_chars": ({"source": {"min_chars": -1}}, ["source.min_chars = -1", "greater than or equal to 0"]),
    "negative val_size": ({"split": {"val_size": -3}}, ["split.val_size = -3", "greater than 0"]),
    "negative train size": ({"split": {"train_sizes": [25, -5]}}, ["split.train_sizes.1 = -5", "greater than 0"]),
    "zero target pairs": ({"generate": {"target_pairs": 0}}, ["generate.target_pairs = 0", "greater than 0"]),
    "duplicate train sizes": ({"split": {"train_sizes": [25, 25]}}, ["split.train_sizes = [25, 25]", "unique"]),
    "lora r zero": ({"train": {"grid": {"lora_r": [32, 0]}}}, ["train.grid.lora_r.1 = 0", "greater than 0"]),
    "lora r negative": ({"train": {"grid": {"lora_r": [-8]}}}, ["train.grid.lora_r.0 = -8", "greater than 0"]),
    "learning rate zero": ({"train": {"grid": {"learning_rate": [0.0]}}}, ["train.grid.learning_rate.0 = 0.0"]),
    "learning rate negative": (
        {"train": {"grid": {"learning_rate": [-0.0001]}}},
        ["train.grid.learning_rate.0 = -0.0001", "greater than 0"],
    ),
    "hub without id": ({"base_model": {"source": "hub"}}, ["base_model.hub_id", "must be set"]),
    # issue 23: the client settings moved into one `client` section per stage
    "client key at its old place": (
        {"generate": {"concurrency": 8}}, ["generate.concurrency moved to generate.client.concurrency"]),
    "renamed client key": (
        {"openai": {"eval_concurrency": 8}}, ["openai.eval_concurrency moved to openai.client.concurrency"]),
    "training cap renamed": ({"openai": {"max_cost_usd": 5}}, ["openai.max_cost_usd moved to openai.max_training_cost_usd"]),
    "judge client url": ({"judge": {"client": {"base_url": "ftp://x"}}}, ["judge.client", "must start with http://"]),
}


def _merge(params: dict, overrides: dict) -> dict:
    """params with overrides merged in, recursively for nested mappings."""
    merged = dict(params)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_stage(module: str, *args: str, params_file=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m <module>` from the repo root, optionally with TONETUNE_PARAMS set."""
    import os

    env = dict(os.environ)
    if params_file is not None:
        env["TONETUNE_PARAMS"] = str(params_file)
    return subprocess.run(
        [PYTHON, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_repo_params_are_valid():
    config = load_config(REPO_ROOT / "params.yaml")
    assert config.source.min_chars == 700
    assert 0 <= config.generate.dedup_threshold <= 1


def _field_defaults(model: type[BaseModel], prefix: str = ""):
    """(dotted key, default or MISSING, nested model) for every field of the config models."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield key, None, annotation
            yield from _field_defaults(annotation, f"{key}.")
        else:
            default = field.get_default(call_default_factory=True) if not field.is_required() else _REQUIRED
            yield key, default, None


_REQUIRED = object()


def _lookup(mapping: dict, dotted: str):
    node = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_params_yaml_holds_every_key_and_the_code_defaults_equal_it():
    """One source of truth: every config field is in params.yaml (with its comment there), and a
    field's default, if it has one, is params.yaml's value, so code that builds a section
    without reading params.yaml (tests, benches, helpers) gets the demo, not a third profile."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    missing, disagree = [], []
    for key, default, nested in _field_defaults(Config):
        try:
            value = _lookup(params, key)
        except KeyError:
            missing.append(key)
            continue
        if nested is not None or default is _REQUIRED:
            continue
        if isinstance(default, tuple) and default and isinstance(default[0], BaseModel):
            default = [item.model_dump() for item in default]  # a list of criteria (tone.gate)
        elif isinstance(default, BaseModel) or (isinstance(default, dict) and default):
            default = json.loads(json.dumps(default, default=lambda model: model.model_dump()))
        if default != value:
            disagree.append(f"{key}: code {default!r} != params.yaml {value!r}")
    assert missing == [], f"config fields params.yaml lacks: {missing}"
    assert disagree == []
    # A section built from nothing equals the one params.yaml gives (nested models included).
    assert Config().model_dump() == parse_config(params).model_dump()


@pytest.mark.parametrize("case", sorted(BAD_PARAMS))
def test_bad_params_fail_in_one_line_before_any_output(case, tmp_path):
    overrides, fragments = BAD_PARAMS[case]
    params = _merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), overrides)
    params_file = tmp_path / "bad_params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    output = tmp_path / "sections.parquet"

    result = run_stage("pipeline.source", "--output", str(output), params_file=params_file)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {params_file}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not output.exists()
    assert result.stdout == ""


def test_the_first_of_several_errors_is_reported():
    """pydantic reports every error; the user gets the first, on one line."""
    raw = {"source": {"min_chars": -1}, "split": {"val_size": 0}}
    with pytest.raises(ConfigError) as raised:
        parse_config(raw, "p.yaml")
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("p.yaml: source.min_chars = -1")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [("source: [unclosed", "not valid YAML"), (None, "params file not found"), ("- a\n- b\n", "expected a mapping")],
)
def test_unreadable_params_file_fails_in_one_line(tmp_path, content, fragment):
    params_file = tmp_path / "params.yaml"
    if content is not None:
        params_file.write_text(content)
    result = run_stage("pipeline.source", "--output", str(tmp_path / "out.parquet"), params_file=params_file)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "out.parquet").exists()


# --------------------------------------------------------------------------- --help is instant

HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "peft", "trl", "mlflow",
                 "great_expectations", "datasets", "textstat", "pandas", "dvc")


def existing_stage_modules() -> list[str]:
    """Every `python -m pipeline.<stage>` with a command line in the working tree (stages that
    other people are still writing join the check as soon as their file appears)."""
    modules = []
    for path in sorted((REPO_ROOT / "pipeline").glob("*.py")):
        if "import argparse" in path.read_text():
            modules.append(f"pipeline.{path.stem}")
    for main_file in sorted((REPO_ROOT / "pipeline").glob("*/__main__.py")):
        modules.append(f"pipeline.{main_file.parent.name}")
    return modules


def test_the_stage_list_covers_the_foundation_stages():
    modules = existing_stage_modules()
    assert {"pipeline.source", "pipeline.base_model"} <= set(modules)


@pytest.mark.parametrize("module", existing_stage_modules())
def test_help_imports_nothing_heavy(module):
    """`--help` must answer without importing torch & co. (each costs seconds). The import check
    is exact and load-proof, and it is what keeps `--help` instant; a wall-clock bound would only
    flake on a loaded 2-core machine."""
    probe = (
        "import runpy, sys, json\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"heavy = sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)\n"
        "print('PROBE', json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    result = subprocess.run([PYTHON, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    report = json.loads(result.stdout.split("PROBE ", 1)[1])
    assert report["code"] == 0
    assert report["heavy"] == [], f"{module} --help imported {report['heavy']}"
