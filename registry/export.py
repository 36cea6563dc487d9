"""`python -m registry export`: merge a LoRA adapter into its base and write a llama.cpp GGUF.

Input: a registry URI (`models:/<name>@<alias>` or `models:/<name>/<version>`) or an adapter folder
(what the train stage writes). For a URI the version's pyfunc model is downloaded and its two
artifacts are used, as registry/model.py logs them: `adapter` (the adapter folder, with the
tokenizer and chat template it was trained with) and `base_model` (a JSON reference: absolute
`path` of the base folder, `sha256` of its weights, `model_id`). For a folder, the base is the one
its `tonetune_adapter.json` names (`base_model.path`), else `adapter_config.json`'s
`base_model_name_or_path`; `--base` overrides both, and so does `TONETUNE_BASE_MODEL_DIR`.

The adapter is merged in float32 (peft `merge_and_unload`) whatever precision it was trained in:
the GGUF then holds W + (alpha/r) B A rounded once, to the file type asked for. (An int8-trained
adapter was trained against LLM.int8's outlier-split matmuls; the merged float model is the
standard way to ship it, and is what `evaluate` would compute with an fp32 base.)

The GGUF is written with the `gguf` package (llama.cpp's own gguf-py) the way llama.cpp's
convert_hf_to_gguf.py does for `LlamaForCausalLM`: `llama.*` hyper-parameters, the GPT-2 BPE
tokenizer (tokens, token types, merges, special ids, chat template) and tensors under
llama.cpp's names (gguf.TensorNameMap), with q_proj/k_proj rows permuted into llama.cpp's rotary
layout (transformers' GGUF loader undoes it). File types: f32, f16, bf16 (2-D weights; norms stay
f32, as llama.cpp does) and q8_0 (blocks of 32 with one f16 scale; a tensor whose rows are not a
multiple of 32 falls back to f16).

When the input is a registry URI the export is recorded on the model version as tags
`export.gguf.path`, `export.gguf.sha256`, `export.gguf.type`, `export.gguf.bytes`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config import BASE_MODEL_DIR
from pipeline.core.contracts import ADAPTER_METADATA_FILE
from pipeline.core.dvcmeta import file_sha256
from pipeline.core.errors import TonetuneError
from pipeline.core.modeling import weights_sha256

FILE_TYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_ARTIFACT = "adapter"  # registry/model.py's artifact names (see the module docstring)
BASE_ARTIFACT = "base_model"
BASE_MODEL_DIR_ENV = "TONETUNE_BASE_MODEL_DIR"
TAG_PREFIX = "export.gguf."
# tokenizer.ggml.pre: how llama.cpp pre-splits text before BPE. Known by the base's model id;
# "default" (GPT-2's regex) otherwise. SmolLM2 and Llama 3 are the two bases this project uses.
PRE_TOKENIZERS = {"smollm": "smollm", "llama-3": "llama-bpe", "llama3": "llama-bpe"}


@dataclass(frozen=True)
class ExportInput:
    """What to merge: the adapter folder, the base folder, and the registry version if any."""

    adapter_dir: Path
    base_dir: Path
    model_id: str
    registry_name: str | None = None
    registry_version: str | None = None


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    file_type: str
    n_bytes: int
    n_tensors: int


# --------------------------------------------------------------------------- resolving the input
def _base_from_reference(reference: dict[str, Any], override: Path | None) -> Path:
    """The base folder: --base, $TONETUNE_BASE_MODEL_DIR, or the recorded path; must hold a model,
    and the weights the adapter was trained on when the reference records their hash (a merge
    into other weights would export a different model without a word)."""
    env = os.environ.get(BASE_MODEL_DIR_ENV)
    base_dir = override or (Path(env) if env else None) or Path(reference.get("path") or BASE_MODEL_DIR)
    hint = f"rebuild it (`dvc repro base_model`, `dvc pull models/base`), or pass --base / set {BASE_MODEL_DIR_ENV}"
    if not (base_dir / "config.json").is_file():
        raise TonetuneError(f"base model {reference.get('model_id', '')} not found at {base_dir} (no config.json): {hint}")
    expected = reference.get("sha256")
    if expected and len(str(expected)) == 64:
        actual = weights_sha256(base_dir)
        if actual != expected:
            raise TonetuneError(f"base model at {base_dir} has weights sha256 {actual[:12]}..., but the adapter was "
                                f"trained on {str(expected)[:12]}...: {hint}")
    return base_dir


def resolve_adapter_dir(adapter_dir: Path, base_override: Path | None = None) -> ExportInput:
    """An adapter folder written by the train stage (or any PEFT LoRA folder)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise TonetuneError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    reference: dict[str, Any] = {}
    metadata_file = adapter_dir / ADAPTER_METADATA_FILE
    if metadata_file.is_file():
        reference = dict(json.loads(metadata_file.read_text()).get("base_model") or {})
    if not reference.get("path"):
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        reference = {"path": config.get("base_model_name_or_path"), "model_id": config.get("base_model_name_or_path")}
    base_dir = _base_from_reference(reference, base_override)
    return ExportInput(adapter_dir, base_dir, str(reference.get("model_id") or base_dir.name))


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """models:/<name>@<alias> -> (name, alias, None); models:/<name>/<version> -> (name, None, version)."""
    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    elif body.count("/") == 1:
        name, version = body.split("/")
        if name and version.isdigit():
            return name, None, version
    raise TonetuneError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")


def resolve_model_uri(uri: str, scratch: Path, base_override: Path | None = None) -> ExportInput:
    """Download the version's pyfunc model and read its `adapter` and `base_model` artifacts."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_model_uri(uri)
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as error:
        raise TonetuneError(f"{uri}: not in the registry at {mlflow.get_tracking_uri()} ({error.message})") from None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(scratch)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text()) if (local / "MLmodel").is_file() else {}
    artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
    paths = {key: local / value["path"] for key, value in artifacts.items() if isinstance(value, dict) and "path" in value}
    if ADAPTER_ARTIFACT not in paths or BASE_ARTIFACT not in paths:
        raise TonetuneError(
            f"{uri} (version {version.version}): its model has no {ADAPTER_ARTIFACT!r} and {BASE_ARTIFACT!r} "
            f"artifacts (artifacts: {sorted(paths) or 'none'}); was it logged by the train stage?"
        )
    reference = json.loads(paths[BASE_ARTIFACT].read_text())
    base_dir = _base_from_reference(reference, base_override)
    return ExportInput(paths[ADAPTER_ARTIFACT], base_dir, str(reference.get("model_id") or base_dir.name),
                       registry_name=name, registry_version=str(version.version))


# --------------------------------------------------------------------------- merging
def merge_adapter(base_dir: Path, adapter_dir: Path):
    """Base in float32 + adapter, merged (peft merge_and_unload); the adapter folder's tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model = model.float().merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- writing the GGUF
def llama_permute(weights, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): within each head the
    two rotary halves are interleaved. `n_head` is the number of heads of this projection."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _pre_tokenizer(model_id: str) -> str:
    lowered = model_id.lower()
    return next((pre for key, pre in PRE_TOKENIZERS.items() if key in lowered), "default")


def _add_tokenizer(writer, tokenizer, tokenizer_dir: Path, n_vocab: int, model_id: str) -> None:
    """GPT-2 BPE vocabulary as llama.cpp writes it (convert_hf_to_gguf.py get_vocab_base)."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    tokens: list[str] = []
    types: list[int] = []
    for index in range(n_vocab):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(model_id))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise TonetuneError(f"{tokenizer_dir}: no BPE merges in tokenizer.json (only GPT-2 BPE tokenizers are exported)")
    special.add_to_gguf(writer, quiet=True)


def _tensor_data(array, file_type: str):
    """(data, raw_dtype) for one tensor: 1-D tensors stay f32; 2-D ones in the asked type."""
    import gguf
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or file_type == "f32":
        return array, gguf.GGMLQuantizationType.F32
    if file_type == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    if file_type == "bf16":
        qtype = gguf.GGMLQuantizationType.BF16
        return gguf.quants.quantize(array, qtype), qtype
    qtype = gguf.GGMLQuantizationType.Q8_0
    if array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16  # llama.cpp's fallback too
    return gguf.quants.quantize(array, qtype), qtype


FILE_TYPE_IDS = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(model, tokenizer, tokenizer_dir: Path, out: Path, file_type: str, model_id: str) -> int:
    """Write `model` (a transformers LlamaForCausalLM) + tokenizer as a llama GGUF; tensor count."""
    import gguf

    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise TonetuneError(f"base model type {config.model_type!r}: only llama-architecture models are exported")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope_theta = getattr(config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    n_vocab = config.vocab_size
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_id)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPE_IDS[file_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, tokenizer_dir, n_vocab, model_id)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        array = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = llama_permute(array, n_head)
        elif hf_name.endswith("k_proj.weight"):
            array = llama_permute(array, n_kv)
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TonetuneError(f"tensor {hf_name}: no llama.cpp name for it (not a plain Llama model?)")
        data, qtype = _tensor_data(array, file_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


def export_gguf(source: ExportInput, out: Path, file_type: str = "f16") -> ExportResult:
    """Merge, write `out` atomically (a sibling temp file renamed into place), hash it."""
    if file_type not in FILE_TYPES:
        raise TonetuneError(f"--type {file_type}: must be one of {', '.join(FILE_TYPES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = merge_adapter(source.base_dir, source.adapter_dir)
    partial = out.with_name(out.name + ".partial")
    try:
        count = write_gguf(model, tokenizer, source.adapter_dir, partial, file_type, source.model_id)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(out, file_sha256(out), file_type, out.stat().st_size, count)


def record_on_version(source: ExportInput, result: ExportResult) -> None:
    """Tags on the registry version the GGUF was made from (nothing for a plain folder)."""
    if source.registry_name is None:
        return
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in {
        "path": str(result.path.resolve()),
        "sha256": result.sha256,
        "type": result.file_type,
        "bytes": str(result.n_bytes),
    }.items():
        client.set_model_version_tag(source.registry_name, source.registry_version, TAG_PREFIX + key, value)


def run_export(target: str, out: Path, file_type: str, base_override: Path | None = None) -> ExportResult:
    """The `export` subcommand: resolve the input, export, record; prints nothing."""
    if file_type not in FILE_TYPES:
        raise TonetuneError(f"--type {file_type}: must be one of {', '.join(FILE_TYPES)}")
    if target.startswith("models:/"):
        parse_model_uri(target)  # a malformed URI fails before the store is opened
        from pipeline.core.config import load_config
        from pipeline.core.tracking import configure_mlflow

        configure_mlflow(load_config().tracking)
        with tempfile.TemporaryDirectory(prefix="tonetune-export-") as scratch:
            source = resolve_model_uri(target, Path(scratch), base_override)
            result = export_gguf(source, out, file_type)
            record_on_version(source, result)
            return result
    folder = Path(target)
    if not folder.is_dir():
        raise TonetuneError(f"{target}: neither a models:/ URI nor an adapter folder")
    return export_gguf(resolve_adapter_dir(folder, base_override), out, file_type)
