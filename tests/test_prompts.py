"""Prompts as versioned files (pipeline.core.prompts): the default tone's files are the paper's texts
byte for byte, each file is a DVC dependency of exactly the stages that send it, and a run logs the
versions (tags) and the texts (MLflow Prompt Registry)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.core import prompts
from pipeline.core.config import ToneConfig
from pipeline.core.errors import TonetuneError
from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT, VERBOSE_SYSTEM_PROMPT
from pipeline.generate import prompts as generation
from tests.conftest import REPO_ROOT

# Appendix A.5 of arXiv 2507.04889, verbatim: what the prompts were before they became files.
PAPER_VERBOSE = (
    "You are a helpful assistant. You answer questions in a natural, conversational tone, like in a "
    "spoken conversation. You give short and concise answers. Your answers must be one to four "
    "sentences long. The Flesch Reading Ease Score is a metric to assess how difficult a text passage "
    "is to understand. Higher scores indicate text that is easier. Please formulate your answer such "
    "that it would receive a Flesch Reading Ease Score of above 60."
)
PAPER_CONCISE = ("You are a helpful assistant. You answer questions in a natural, conversational tone, like in a "
                 "spoken conversation.")
# The hash of the six generation templates when they were Python constants (commit 0a7e914).
GENERATION_VERSION_BEFORE_FILES = "1cfc453b6515"


def test_the_default_tone_sends_the_papers_texts():
    texts = prompts.tone_prompts(ToneConfig())
    assert texts.system_prompt("verbose") == VERBOSE_SYSTEM_PROMPT == PAPER_VERBOSE
    assert texts.system_prompt("concise") == CONCISE_SYSTEM_PROMPT == PAPER_CONCISE
    assert generation.GenerationPrompts.of(ToneConfig()).prompt_version == GENERATION_VERSION_BEFORE_FILES
    rephrase = generation.DEFAULT.rephrase_messages("Why?", "Because.")
    assert rephrase[1]["content"].startswith("Question: Why?\nAnswer: Because.\n\nRephrase the answer in a natural")
    assert not rephrase[1]["content"].endswith("\n")  # the file's final newline is not part of the prompt


def test_a_tone_folder_fills_its_description(tmp_path):
    folder = tmp_path / "formal"
    folder.mkdir()
    for name in prompts.PROMPT_FILES.values():
        (folder / name).write_text("Answer {description}. Literal {{braces}}.\n")
    texts = prompts.TonePrompts.load(folder, "formally, in the second person")
    assert texts.system_prompt("concise") == "Answer formally, in the second person. Literal {braces}."
    assert texts.files["system_concise"].version == prompts.prompt_version("Answer {description}. Literal {{braces}}.")
    before = texts.version()
    (folder / "system_concise.txt").write_text("Answer {description}, briefly.\n")
    assert prompts.TonePrompts.load(folder, "x").version() != before


def test_missing_file_and_bad_placeholder_are_one_line(tmp_path):
    with pytest.raises(TonetuneError, match="system_verbose.txt: prompt file not found"):
        prompts.TonePrompts.load(tmp_path, "d", ("system_verbose",))
    (tmp_path / "system_verbose.txt").write_text("Answer in {tone}.")
    texts = prompts.TonePrompts.load(tmp_path, "d", ("system_verbose",))
    with pytest.raises(TonetuneError, match=r"system_verbose.txt: cannot fill the template \(KeyError: 'tone'\)"):
        texts.system_prompt("verbose")


def _stages_depending_on(file_name: str) -> set[str]:
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    return {name for name, stage in dvc["stages"].items()
            if f"${{tone.prompts}}/{file_name}" in stage.get("deps", [])}


@pytest.mark.parametrize(("file_name", "stages"), [
    ("system_verbose.txt", {"predict", "heldout", "openai_base"}),
    ("system_concise.txt", {"train", "predict", "heldout", "openai_finetune"}),
    *[(name, {"generate"}) for name in prompts.GENERATION_PROMPT_FILES.values()],
])
def test_each_prompt_file_is_a_dep_of_exactly_the_stages_that_send_it(file_name, stages):
    assert _stages_depending_on(file_name) == stages
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    for stage in stages:  # the folder and the description change the texts too
        assert {"tone.prompts", "tone.description"} <= set(dvc["stages"][stage]["params"])


def test_a_run_logs_prompt_versions_and_registers_each_text_once(mlflow_uri, tmp_path):
    import mlflow

    from pipeline.core.tracking import log_prompts

    folder = tmp_path / "support"
    folder.mkdir()
    (folder / "system_concise.txt").write_text("You answer {description}.\n")
    texts = prompts.TonePrompts.load(folder, "formally", ("system_concise",))
    mlflow.set_experiment("prompts")
    with mlflow.start_run() as first:
        log_prompts(texts, "support")
    with mlflow.start_run() as second:  # same text: same registry version
        log_prompts(texts, "support")
    (folder / "system_concise.txt").write_text("You answer {description}, in under 60 words.\n")
    edited = prompts.TonePrompts.load(folder, "formally", ("system_concise",))
    with mlflow.start_run() as third:
        log_prompts(edited, "support")
    client = mlflow.MlflowClient()
    tags = [client.get_run(run.info.run_id).data.tags for run in (first, second, third)]
    assert tags[0]["prompt.system_concise.version"] == texts.files["system_concise"].version
    assert tags[0]["prompt.system_concise.uri"] == tags[1]["prompt.system_concise.uri"] \
        == "prompts:/tonetune-support-system_concise/1"
    assert tags[2]["prompt.system_concise.uri"] == "prompts:/tonetune-support-system_concise/2"
    assert tags[2]["prompt.system_concise.version"] != tags[0]["prompt.system_concise.version"]
    registered = mlflow.genai.load_prompt("prompts:/tonetune-support-system_concise/2", link_to_model=False)
    assert registered.template == "You answer {description}, in under 60 words."
    artifact = client.download_artifacts(third.info.run_id, "prompts/system_concise.txt", str(tmp_path / "dl"))
    assert open(artifact).read() == "You answer {description}, in under 60 words."
