"""`python -m registry export`: adapter merged into its base -> GGUF, loaded back by transformers.

The tiny fixture model is a real LlamaForCausalLM with SmolLM2's tokenizer; its LoRA adapter has
random (non-zero) B matrices, so the merge changes every q/k/v projection and a wrong merge, a
missing q/k permutation or a mis-named tensor changes the logits.

Tolerances, per file type, for max |logit(GGUF) - logit(merged HF)| over a prompt:
- f32: the same float32 weights, computed by the same transformers code: 1e-5 (only op order).
- q8_0: every weight is rounded to the nearest of 255 levels of its 32-block's scale
  d = absmax/127 (d itself stored in f16), so |error| <= d/2 + 127 * d * 2^-11 (the f16 rounding
  of d, times |q| <= 127): checked exactly, tensor by tensor. To first order each quantised matrix then perturbs its output by at
  most u = 1/254 of the block's largest weight relative, and the perturbations of the matrices
  on the path add: logits within n_matrices * u * max|logit| (15 here: 7 per layer x 2
  + the tied embedding/output). Greedy text may then only differ at a step where the merged
  model's top-2 margin is <= twice the observed logit difference; the test checks that.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PROMPTS = ["Why is the sky blue?", "What do bees make?", "Name a large planet."]
Q8_BLOCK = 32


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A LoRA adapter over the tiny Llama (q/k/v, random B), saved as the train stage saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                            init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    (folder / "tonetune_adapter.json").write_text(json.dumps({
        "base_model": {"path": str(tiny_llama_dir), "sha256": "not-checked", "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    }))
    return folder


@pytest.fixture(scope="module")
def merged(adapter_dir, tiny_llama_dir):
    from registry.export import merge_adapter

    model, tokenizer = merge_adapter(tiny_llama_dir, adapter_dir)
    return model, tokenizer


def prompt_ids(tokenizer, question: str):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def export(adapter_dir: Path, out: Path, file_type: str):
    from registry.export import export_gguf, resolve_adapter_dir

    return export_gguf(resolve_adapter_dir(adapter_dir), out, file_type)


def load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def logits_of(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits[0]


def greedy(model, tokenizer, ids, n: int = 16):
    import torch

    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_the_fixture_is_llama(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]


def test_f32_round_trip_is_exact(adapter_dir, merged, tmp_path, tiny_llama_dir):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = merged
    out = tmp_path / "model-f32.gguf"
    result = export(adapter_dir, out, "f32")
    assert result.path == out and out.is_file() and len(result.sha256) == 64

    reader = gguf.GGUFReader(str(out))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = model.config
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config.num_hidden_layers
    assert field("llama.attention.head_count") == config.num_attention_heads
    assert field("llama.attention.head_count_kv") == config.num_key_value_heads
    assert field("llama.feed_forward_length") == config.intermediate_size
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    assert field("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert field("tokenizer.chat_template") == tokenizer.chat_template
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings stay tied

    # the merge changed the model: the base alone answers differently
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = prompt_ids(tokenizer, PROMPTS[0])
    assert (logits_of(base, ids) - logits_of(model, ids)).abs().max().item() > 1e-3

    loaded = load_gguf(out)
    for question in PROMPTS:
        ids = prompt_ids(tokenizer, question)
        difference = (logits_of(loaded, ids) - logits_of(model, ids)).abs().max().item()
        assert difference <= 1e-5, f"{question}: logits differ by {difference}"
        assert greedy(loaded, tokenizer, ids) == greedy(model, tokenizer, ids)

    gguf_tokenizer = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    text = "Hello there! Isn't the sky blue?"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_q8_0_within_the_quantisation_bound(adapter_dir, merged, tmp_path):
    import gguf
    import numpy as np

    from registry.export import llama_permute

    model, tokenizer = merged
    out = tmp_path / "model-q8_0.gguf"
    result = export(adapter_dir, out, "q8_0")
    f32_bytes = sum(p.numel() for n, p in model.state_dict().items() if n != "lm_head.weight") * 4

    # tensor by tensor: |dequantised - merged| <= d/2 per 32-block (d = f16 scale stored in the block)
    reader = gguf.GGUFReader(str(out))
    assert result.n_bytes == out.stat().st_size
    assert sum(int(t.n_bytes) for t in reader.tensors) < 0.3 * f32_bytes  # 34 bytes per 32 weights, not 128
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    state = {name_map.get_name(k, try_suffixes=(".weight",)): (k, v) for k, v in model.state_dict().items()}
    quantised = 0
    for tensor in reader.tensors:
        hf_name, weights = state[tensor.name]
        expected = weights.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            expected = llama_permute(expected, model.config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            expected = llama_permute(expected, model.config.num_key_value_heads)
        actual = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        if tensor.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and expected.ndim == 1
            np.testing.assert_array_equal(actual, expected)
            continue
        quantised += 1
        blocks_expected = expected.reshape(-1, Q8_BLOCK)
        scale = np.abs(blocks_expected).max(axis=1, keepdims=True) / 127
        # half a step, plus |q| <= 127 times the f16 rounding of the scale (relative 2^-11)
        bound = scale / 2 + 127 * scale * 2**-11 + 1e-12
        assert (np.abs(actual.reshape(-1, Q8_BLOCK) - blocks_expected) <= bound).all(), tensor.name
    assert quantised == 2 * 7 + 1

    loaded = load_gguf(out)
    n_matrices = quantised
    for question in PROMPTS:
        ids = prompt_ids(tokenizer, question)
        reference = logits_of(model, ids)
        difference = (logits_of(loaded, ids) - reference).abs().max().item()
        tolerance = n_matrices / 254 * reference.abs().max().item()
        assert 0 < difference <= tolerance, f"{question}: {difference} > {tolerance}"

        # greedy: teacher-force the merged model's answer; the GGUF must pick the same token at
        # every step whose top-2 margin exceeds twice the largest logit difference seen
        answer = greedy(model, tokenizer, ids)
        import torch

        full = torch.cat([ids, torch.tensor([answer])], dim=1)
        ref_steps = logits_of(model, full)[ids.shape[1] - 1 : -1]
        got_steps = logits_of(loaded, full)[ids.shape[1] - 1 : -1]
        delta = (ref_steps - got_steps).abs().max().item()
        top2 = ref_steps.topk(2, dim=-1).values
        decided = (top2[:, 0] - top2[:, 1]) > 2 * delta
        assert (got_steps.argmax(-1)[decided] == torch.tensor(answer)[decided]).all()


def test_registry_uri_export_records_tags(adapter_dir, tiny_llama_dir, tmp_path, mlflow_uri, write_params, monkeypatch):
    import gguf
    import mlflow

    from pipeline.core.dvcmeta import file_sha256
    from registry.cli import main
    from registry.model import DecodingPolicy, base_model_reference, log_adapter_model

    monkeypatch.chdir(tmp_path)  # MLflow's default experiment keeps artifacts in ./mlruns
    write_params({"tracking": {"tracking_uri": mlflow_uri, "artifact_root": str(tmp_path / "art")}})
    name = "tonetune-export-test"
    with mlflow.start_run():
        info = log_adapter_model(adapter_dir, base_model_reference(tiny_llama_dir), "fp32",
                                 DecodingPolicy(strategy="greedy", max_new_tokens=8), batch_size=4)
    version = mlflow.register_model(info.model_uri, name)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, "production", version.version)

    out = tmp_path / "exported" / "prod.gguf"
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"models:/{name}@production", "--gguf", str(out), "--type", "bf16"])
    assert exit_info.value.code == 0
    tags = client.get_model_version(name, version.version).tags
    assert tags["export.gguf.type"] == "bf16"
    assert tags["export.gguf.sha256"] == file_sha256(out)
    assert Path(tags["export.gguf.path"]) == out.resolve()
    reader = gguf.GGUFReader(str(out))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.BF16, gguf.GGMLQuantizationType.F32}


def test_bad_inputs_fail_with_one_line(tmp_path, adapter_dir, tiny_llama_dir):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "registry", "export", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True)

    missing = run(str(tmp_path / "nowhere"), "--gguf", str(tmp_path / "x.gguf"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: neither a models:/ URI nor an adapter folder"
    ]
    not_adapter = run(str(tmp_path), "--gguf", str(tmp_path / "x.gguf"))
    assert not_adapter.returncode == 2 and "no adapter_config.json" in not_adapter.stderr
    assert run(str(tmp_path), "--gguf", "x.gguf", "--type", "q4_k").returncode == 2  # argparse choices
    bad_uri = run("models:/only-a-name", "--gguf", str(tmp_path / "x.gguf"))
    assert bad_uri.returncode == 2 and "expected models:/<name>@<alias>" in bad_uri.stderr
    # an adapter whose recorded base weights are not the ones at the path: refused, not merged
    other = tmp_path / "other_adapter"
    shutil.copytree(adapter_dir, other)
    (other / "tonetune_adapter.json").write_text(json.dumps({
        "base_model": {"path": str(tiny_llama_dir), "sha256": "0" * 64, "model_id": "tiny"}}))
    wrong_base = run(str(other), "--gguf", str(tmp_path / "x.gguf"))
    assert wrong_base.returncode == 2 and "but the adapter was trained on 000000000000..." in wrong_base.stderr
    assert len(wrong_base.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()
