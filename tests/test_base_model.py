"""Stage `base_model`: the packaged SmolLM2 GGUF becomes a plain HF folder that loads offline
and answers a chat message; the hub path works on a local folder and fails clearly on a bad id;
a failed build never damages the previous folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import base_model
from pipeline.core.assets import smollm2_gguf_path
from pipeline.core.config import BaseModelConfig
from pipeline.core.errors import TonetuneError
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="session")
def converted_smollm2(tmp_path_factory):
    """The real conversion, done once for the session: ~25 s of CPU (dequantising the 98 MB GGUF
    dominates), 1-2 min of wall time when the 2 cores are shared. Only slow tests use it."""
    output = tmp_path_factory.mktemp("base") / "base"
    record = base_model.build_base_model(BaseModelConfig(), output)
    return output, record


@pytest.mark.slow
def test_conversion_writes_a_plain_hf_folder_with_provenance(converted_smollm2):
    """Slow: needs the real GGUF conversion (see `converted_smollm2`); nothing smaller shows
    that the packaged model survives dequantisation, re-typing and saving."""
    folder, record = converted_smollm2
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", "tonetune_base.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # else every load would think it is still GGUF
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    saved = json.loads((folder / "tonetune_base.json").read_text())
    assert saved == record
    assert saved["source"] == "packaged_smollm2" and saved["dtype"] == "bfloat16"
    assert saved["gguf_sha256"] == base_model.file_sha256(smollm2_gguf_path())
    assert saved["transformers_version"] == __import__("transformers").__version__
    assert 130e6 < saved["parameters"] < 140e6  # SmolLM2-135M
    assert not list(folder.parent.glob(".base.*"))  # no temporary folder left behind


@pytest.mark.slow
def test_converted_model_loads_offline_and_answers_a_chat_message(converted_smollm2):
    """Slow: shares the real conversion; the answer is the check that the weights are right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = converted_smollm2
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])  # the chat template survived
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_hub_source_snapshots_a_local_folder(tiny_llama_dir, tmp_path):
    """The online path, run on a local folder (from_pretrained treats both alike)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = BaseModelConfig(source="hub", hub_id=str(tiny_llama_dir), dtype="float32")
    output = tmp_path / "base"
    record = base_model.build_base_model(config, output)
    assert record["source"] == "hub" and record["hub_id"] == str(tiny_llama_dir)
    assert "gguf_sha256" not in record
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert reloaded.dtype == torch.float32
    for (name, tensor), (_, expected) in zip(reloaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(tensor, expected), name


def test_a_failed_build_leaves_the_previous_folder_untouched(tiny_llama_dir, tmp_path, monkeypatch):
    config = BaseModelConfig(source="hub", hub_id=str(tiny_llama_dir), dtype="float32")
    output = tmp_path / "base"
    base_model.build_base_model(config, output)
    before = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after writing the new weights")

    monkeypatch.setattr(base_model, "check_round_trip", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        base_model.build_base_model(config, output)
    assert {path.name: path.stat().st_mtime_ns for path in output.iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]  # no half-built folder left


def test_rebuilding_replaces_the_folder(tiny_llama_dir, tmp_path):
    config = BaseModelConfig(source="hub", hub_id=str(tiny_llama_dir), dtype="float32")
    output = tmp_path / "base"
    output.mkdir()
    (output / "stale.txt").write_text("from an older build")
    base_model.build_base_model(config, output)
    assert not (output / "stale.txt").exists()
    assert (output / "config.json").exists()


@pytest.mark.parametrize(
    ("hub_id", "fragment"),
    [
        ("not a valid id!!", "not a Hugging Face model id"),
        ("tonetune-tests/no-such-model", "cannot load it (offline, gated or misspelt?)"),
    ],
)
def test_bad_hub_id_fails_in_one_line(hub_id, fragment, tmp_path, write_params):
    params = write_params({"base_model": {"source": "hub", "hub_id": hub_id}})
    output = tmp_path / "base"
    env = {**os.environ, "TONETUNE_PARAMS": str(params), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.base_model", "--output", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0] and repr(hub_id) in lines[0], result.stderr
    assert not output.exists()


def test_invalid_hub_id_is_rejected_before_loading_anything():
    with pytest.raises(TonetuneError, match="base_model.hub_id = 'a/b/c'"):
        base_model.check_hub_id("a/b/c")
