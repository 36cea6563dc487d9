"""The one inference path: load a base, attach adapters, stop at the end of the turn, decode.

Owns everything between a model folder and an answer string, for every caller: the train stage
(base loading, adapter dtype), the predict stage (all models, one base load per precision), the
registered pyfunc model (pipeline.core.servable) and bench/. Because they share this code, an
adapter answers in serving exactly as it answered when it was evaluated.

- Precision (`bf16`, `fp32`, `int8`): the base in bf16, fp32, or bitsandbytes 8-bit (lm_head kept
  in bf16); LoRA weights in fp32 for an fp32 run, bf16 otherwise (the paper's adapters are bf16).
  The rule: an adapter is evaluated and served in the precision it was trained in.
- Base identity: `base_model_reference` (path + SHA-256 of the weights) and `resolve_base_model`,
  which refuses a folder that holds other weights.
- Adapters: `AdapterSwitcher` activates the bare base or one adapter at a time on one loaded base
  (bias restore included); `load_adapter_model` is the one-adapter fresh load. Both load the
  adapter the same way (no PEFT autocast, then `cast_adapter_weights`), so they compute the same.
- Stop ids: derived from the chat template (`end_of_turn_ids`), not only the eos token.
- Decoding: `DecodingPolicy` (params `evaluate.decoding` + `evaluate.max_new_tokens`), the same for
  every model, and the decoding shape (`evaluate.batch_size` rows, `evaluate.bucket_tokens`).
- The decoding contract (`generate_answers`): an answer is a function of (model, question,
  policy, shape) on a given machine, kernel path and thread count. It is byte-identical whether
  the question comes alone, in any batch, at any position, next to any other questions:
  - fixed shapes: a prompt is left-padded to its bucket (its token count rounded up to a
    multiple of `bucket_tokens`), prompts are grouped by bucket, and every forward runs exactly
    `rows` rows (filler rows copy a real prompt; their content changes nothing). Kernels then
    see the same shapes whatever the neighbours, and every op used is row-wise. A slab stops
    when all its real rows have stopped (or at max_new_tokens); a row's tokens do not depend on
    when the slab stops. Both dims must be fixed: the same prompt length with 1 row instead of 8
    gave other bf16 answers.
  - sampling draws per question: each row has its own generator seeded from the policy seed and
    the question's prompt token ids (`question_seed`); the global torch seed plays no part.
  - the n-gram ban is per row too, so requests whose policies differ only in
    `no_repeat_ngram_size` share slabs (`generate_answer_sets`: the predict stage's policy and
    ablation answers in one call).
  - int8: bitsandbytes' LLM.int8() picks outlier columns across all rows it is given, so each
    8-bit layer computes one sequence at a time (`int8_per_sequence`); numerics (threshold 6.0
    etc.) are bitsandbytes' own for a single sequence.
  Not invariant across machines, kernel paths (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), thread
  counts or library versions: `pipeline.core.machine.numerics_facts()` records those with every prediction file and
  benchmark.

Not here: scoring (pipeline.core.predictions / evalmetrics), MLflow logging (pipeline.core.servable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import DecodingConfig, EvaluateConfig, decoding_problem
from pipeline.core.contracts import BASE_PROVENANCE_FILE
from pipeline.core.errors import TonetuneError
from pipeline.core.predictions import GenerationResult
from pipeline.core.system_prompts import chat_messages

if TYPE_CHECKING:
    import torch

PRECISIONS = ("bf16", "fp32", "int8")
BASE_MODEL_DIR_ENV = "TONETUNE_BASE_MODEL_DIR"
MARKER_ANSWER = "tonetune-end-of-turn-probe"
# The decoding shape (params evaluate.batch_size, evaluate.bucket_tokens); these defaults are
# also what a registered model that predates them decodes with.
DEFAULT_ROWS = 16
DEFAULT_BUCKET_TOKENS = 32


# --------------------------------------------------------------------------- precision and device
def resolve_device(name: str = "auto") -> str:
    """`auto` -> cuda when available, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_precision(precision: str) -> None:
    """One line for an unknown precision, before anything is loaded."""
    if precision not in PRECISIONS:
        raise TonetuneError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")


def require_bitsandbytes() -> None:
    """int8 needs bitsandbytes importable (>= 0.45 on H100/H200); say so in one line."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # ImportError, or a broken install failing at import
        message = " ".join(str(error).split()) or type(error).__name__
        raise TonetuneError(
            f"--precision int8 needs bitsandbytes, which cannot be imported ({message}); "
            "install bitsandbytes>=0.45 or train in bf16/fp32"
        ) from None


def adapter_dtype(precision: str) -> torch.dtype:
    """LoRA weights: fp32 for an fp32 run, bf16 otherwise (paper: adapters in bfloat16)."""
    import torch

    return torch.float32 if precision == "fp32" else torch.bfloat16


def default_attention() -> str:
    """`eager` on CPU, `sdpa` on CUDA.

    For these short sequences (~130 tokens) torch's CPU flash-attention kernel is slower than
    plain matmul + softmax: eager made a whole SmolLM2 training step ~15% cheaper in CPU time
    (BENCHMARKS.md "## train"); on a GPU, sdpa is the fast path.
    """
    import torch

    return "sdpa" if torch.cuda.is_available() else "eager"


def _not_the_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast_warning() -> None:
    """bitsandbytes logs that it casts bf16 inputs to fp16 on every 8-bit matmul (thousands of
    lines per evaluated model); the cast is how LLM.int8() works, not a problem to report."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if _not_the_int8_cast_warning not in logger.filters:
        logger.addFilter(_not_the_int8_cast_warning)




def load_base_model(base_dir: str | Path, precision: str, int8_threshold: float = 6.0,
                    attn_implementation: str | None = None):
    """The base model in `precision`: bf16, fp32, or bitsandbytes 8-bit with lm_head kept in bf16.

    No prepare_model_for_kbit_training: it would upcast lm_head and the norms to fp32 and turn
    gradient checkpointing on, neither of which the paper did. Not moved to a device (the
    trainer does that); `load_for_inference` does.
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_precision(precision)
    kwargs: dict[str, Any] = {
        "dtype": torch.float32 if precision == "fp32" else torch.bfloat16,
        "attn_implementation": attn_implementation or default_attention(),
    }
    if precision == "int8":
        quiet_int8_cast_warning()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=int8_threshold, llm_int8_skip_modules=["lm_head"]
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)


def load_tokenizer(folder: str | Path):
    """The tokenizer (and chat template) of a model or adapter folder, padding on the left."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def int8_sequences_apart(module, x, forward):
    """What `module` (a bitsandbytes Linear8bitLt in eval mode) returns for each sequence of `x`
    (sequences, tokens, features) sent alone, computed for all sequences at once.

    LLM.int8() as bitsandbytes 0.50 computes it (MatMul8bitLt.forward and the default CPU ops),
    step by step, with the outlier columns taken per sequence instead of over the whole input:
    fp16 copy; elements >= threshold zeroed; per-token absmax and int8 rounding; the sequence's
    outlier columns zeroed (bitsandbytes skips that for a single token, where they are zero
    already); one int8 matmul + dequantisation (+ bias) for all tokens; then per sequence the
    outlier columns in 16 bit (`addmm`, the same call and shapes as bitsandbytes alone). Every
    step but the last is element- or token-wise, and the int8 matmul accumulates exactly in
    int32 (torch._int_mm; bitsandbytes' fp32 fallback is exact below 2**24), so the result is
    bitwise what the sequence alone gets (tests/test_invariance.py checks it against `forward`
    per sequence). Anything else (threshold 0, weights not quantised, 2-D input) goes to
    `forward`, one sequence at a time.
    """
    import torch

    state = module.state
    if module.weight.CB is not None:
        module.init_8bit_state()
    if state.threshold <= 0.0 or state.CB is None or state.SCB is None or state.has_fp16_weights:
        return torch.cat([forward(x[row : row + 1]) for row in range(x.shape[0])])
    bias = module.bias
    if bias is not None and bias.dtype != x.dtype:
        bias.data = bias.data.to(x.dtype)
    n_seq, n_tok, n_in = x.shape
    A = x.reshape(-1, n_in)
    A16 = A.to(torch.float16)
    outliers = A16.abs() >= state.threshold
    A16 = A16.masked_fill(outliers, 0)
    row_stats = torch.max(A16.abs(), dim=1).values.float()
    CA = torch.round(A16 * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    columns = outliers.view(n_seq, n_tok, n_in).any(dim=1)  # (sequences, features)
    if n_tok > 1:
        CA = CA.view(n_seq, n_tok, n_in).masked_fill(columns[:, None, :], 0).view(-1, n_in)
    output = torch.ops.bitsandbytes.int8_scaled_mm.default(CA, state.CB, row_stats, state.SCB, bias=bias,
                                                           dtype=A.dtype)
    for seq in torch.nonzero(columns.any(dim=1)).flatten().tolist():
        cols = torch.nonzero(columns[seq]).flatten()
        rows = slice(seq * n_tok, (seq + 1) * n_tok)
        subA = A[rows][:, cols].contiguous()
        subB = torch.ops.bitsandbytes.int8_vectorwise_dequant.default(state.CB[:, cols].contiguous(), state.SCB)
        output[rows] = output[rows].contiguous().addmm(subA, subB.to(A.dtype).t())
    return output.reshape(n_seq, n_tok, -1)


def int8_per_sequence(model) -> int:
    """Make every bitsandbytes 8-bit linear layer of `model` compute each sequence on its own.

    LLM.int8() (bitsandbytes 0.50, CPU) picks its outlier columns over all rows of the input
    (every token of every sequence, padding included) and computes those columns in 16 bit, the
    rest in int8: one sequence's answer would depend on the others in the batch. In eval mode a
    3-D input (sequences, tokens, features) gets, for each sequence, exactly what bitsandbytes
    computes for that sequence alone (`int8_sequences_apart`: same threshold, same kernels;
    int8 numerics do not change). Training mode is untouched. Returns the number of layers
    wrapped (0 without bitsandbytes).
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # no int8 without it; nothing to wrap
        return 0

    wrapped = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and not getattr(module, "_tonetune_per_sequence", False):
            whole_batch = module.forward

            def per_sequence(x, _module=module, _forward=whole_batch):
                if _module.training or x.dim() != 3 or x.shape[0] == 1:
                    return _forward(x)
                return int8_sequences_apart(_module, x, _forward)

            module.forward = per_sequence
            module._tonetune_per_sequence = True
            wrapped += 1
    return wrapped


def load_for_inference(base_dir: str | Path, precision: str, int8_threshold: float = 6.0, device: str = "auto",
                       attn_implementation: str | None = None):
    """(model, tokenizer) of the base in `precision`, on `device`, in eval mode; an 8-bit base
    computes each sequence on its own (`int8_per_sequence`), so answers are batch-invariant.
    `attn_implementation`: None for `default_attention()` (bench/ compares others)."""
    model = load_base_model(base_dir, precision, int8_threshold, attn_implementation)
    model.requires_grad_(False)
    if precision == "int8":
        int8_per_sequence(model)
    if precision != "int8":  # a quantised model is placed by its device_map
        model = model.to(resolve_device(device))
    return model.eval(), load_tokenizer(base_dir)


def cast_adapter_weights(model, dtype) -> None:
    """Put every LoRA weight (and trainable parameter) in `dtype`.

    PEFT creates LoRA weights in float32 for an 8-bit base and upcasts bf16 ones unless told
    not to (autocast_adapter_dtype); the paper keeps adapters in bf16. Training, evaluation and
    serving all call this, so a reloaded model computes exactly what the trained one did.
    """
    for name, parameter in model.named_parameters():
        if ("lora_" in name or parameter.requires_grad) and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


# --------------------------------------------------------------------------- base model identity
def weights_files(base_dir: Path) -> list[Path]:
    """The files that define the base model's weights: config.json and every *.safetensors."""
    files = [base_dir / "config.json", *sorted(base_dir.glob("*.safetensors"))]
    return [path for path in files if path.is_file()]


def weights_sha256(base_dir: str | Path) -> str:
    """SHA-256 over the names and bytes of config.json + *.safetensors (~1 s for 260 MB).

    Provenance files and timestamps are left out on purpose: rebuilding the same weights
    gives the same hash, so an adapter stays loadable after `dvc repro base_model`.
    """
    base_dir = Path(base_dir)
    files = weights_files(base_dir)
    if not any(path.suffix == ".safetensors" for path in files):
        raise TonetuneError(f"{base_dir}: no *.safetensors weights found (run `dvc repro base_model`)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def base_model_reference(base_dir: str | Path) -> dict[str, Any]:
    """What an adapter records about its base: absolute path, weights hash, model id, provenance."""
    base_dir = Path(base_dir).resolve()
    provenance_file = base_dir / BASE_PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    model_id = provenance.get("hub_id") or provenance.get("upstream")
    if not model_id:
        config = json.loads((base_dir / "config.json").read_text())
        model_id = config.get("_name_or_path") or base_dir.name
    return {"path": str(base_dir), "sha256": weights_sha256(base_dir), "model_id": model_id, "provenance": provenance}


def resolve_base_model(reference: dict[str, Any], verify: bool = True) -> Path:
    """The base folder to load for `reference`: $TONETUNE_BASE_MODEL_DIR, else the recorded path,
    else (when that is gone) ./models/base; checked to hold exactly the weights the adapter was
    trained on."""
    override = os.environ.get(BASE_MODEL_DIR_ENV)
    base_dir = Path(override) if override else Path(reference["path"])
    if not override and not (base_dir / "config.json").is_file() and (Path("models/base") / "config.json").is_file():
        base_dir = Path("models/base")  # a moved project or another clone (`dvc pull`): hash-checked below
    hint = (
        f"the adapter references its base model by path; rebuild it (`dvc repro base_model` or "
        f"`dvc pull models/base`) or set {BASE_MODEL_DIR_ENV} to a copy"
    )
    if not (base_dir / "config.json").is_file():
        raise TonetuneError(f"base model {reference.get('model_id')} not found at {base_dir}: {hint}")
    if verify:
        actual = weights_sha256(base_dir)
        if actual != reference["sha256"]:
            raise TonetuneError(
                f"base model at {base_dir} has weights sha256 {actual[:12]}..., but the adapter was "
                f"trained on {reference['sha256'][:12]}...: {hint}"
            )
    return base_dir


# --------------------------------------------------------------------------- stop ids and prompts
def _as_id_list(value) -> list[int]:
    """An eos_token_id field (None, int or list) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def template_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message, if any."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARKER_ANSWER}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template without an assistant role; fall back to eos ids
        return None
    if MARKER_ANSWER not in rendered:
        return None
    after = rendered.split(MARKER_ANSWER, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    return ids[0] if ids and ids[0] in special else None


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends an assistant answer: the template's end-of-turn token plus the
    eos ids of the generation config and tokenizer (Llama 3 lists several), deduplicated.

    Without the template's token, models whose eos is not the end-of-turn token run on to
    max_new_tokens and distort both Flesch and similarity."""
    ids = []
    template_id = template_end_of_turn_id(tokenizer)
    if template_id is not None:
        ids.append(template_id)
    if generation_config is not None:
        ids += _as_id_list(generation_config.eos_token_id)
    ids += _as_id_list(tokenizer.eos_token_id)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise TonetuneError("cannot tell where an answer ends: the tokenizer has no chat template end-of-turn or eos token")
    return ids


def build_prompts(tokenizer, system_prompt: str, questions: Sequence[str]) -> list[str]:
    """Chat-formatted prompts (system + user turn + the assistant header) as text, built by the
    same `chat_messages` the train stage uses, so an adapter sees the prompt it was trained on."""
    return [
        tokenizer.apply_chat_template(chat_messages(str(question), system_prompt), tokenize=False,
                                      add_generation_prompt=True)
        for question in questions
    ]


def bucket_length(n_tokens: int, bucket_tokens: int) -> int:
    """The padded prompt length: `n_tokens` rounded up to a multiple of `bucket_tokens`."""
    return -(-n_tokens // bucket_tokens) * bucket_tokens


def bucket_slabs(lengths: Sequence[int], rows: int, bucket_tokens: int) -> list[tuple[int, list[int]]]:
    """(bucket length, up to `rows` prompt indices) per slab: prompts grouped by bucket, longest
    bucket first (the memory peak comes first), input order within a bucket.

    Which prompts share a slab does not change any answer (see the module docstring); the order
    only decides how much work is wasted on filler rows and on rows that stopped early.
    """
    buckets: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        buckets.setdefault(bucket_length(length, bucket_tokens), []).append(index)
    return [
        (length, members[start : start + rows])
        for length, members in sorted(buckets.items(), reverse=True)
        for start in range(0, len(members), rows)
    ]


def cut_at_stop(token_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], bool]:
    """The tokens before the first stop id, and whether a stop id was found."""
    stops = set(stop_ids)
    for position, token_id in enumerate(token_ids):
        if token_id in stops:
            return list(token_ids[:position]), True
    return list(token_ids), False


# --------------------------------------------------------------------------- decoding policy
@dataclass(frozen=True)
class DecodingPolicy:
    """How every model decodes (params `evaluate.decoding` + `evaluate.max_new_tokens`)."""

    strategy: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 4
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        problem = decoding_problem(self.strategy, self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                                   self.no_repeat_ngram_size, self.max_new_tokens)
        if problem:
            raise TonetuneError(f"decoding policy: {problem}")

    @classmethod
    def from_config(cls, decoding: DecodingConfig, max_new_tokens: int) -> DecodingPolicy:
        return cls(**decoding.model_dump(), max_new_tokens=max_new_tokens)

    @classmethod
    def for_evaluation(cls, evaluate: EvaluateConfig) -> DecodingPolicy:
        """The policy every model is evaluated (and served) with."""
        return cls.from_config(evaluate.decoding, evaluate.max_new_tokens)

    @classmethod
    def greedy(cls, max_new_tokens: int) -> DecodingPolicy:
        """Plain greedy decoding (the decoding ablation's reference)."""
        return cls(strategy="greedy", no_repeat_ngram_size=0, max_new_tokens=max_new_tokens)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecodingPolicy:
        """From a recorded policy (the pyfunc's model_config `decoding`); unknown keys are errors."""
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise TonetuneError(f"decoding policy: unknown key(s) {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """Short text for logs and the report, e.g. `greedy, no_repeat_ngram_size=4, max 128`."""
        parts = [self.strategy]
        if self.strategy == "sample":
            parts += [f"temperature={self.temperature:g}", f"top_p={self.top_p:g}", f"seed={self.seed}"]
            if self.top_k:
                parts.append(f"top_k={self.top_k}")
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition_penalty={self.repetition_penalty:g}")
        if self.no_repeat_ngram_size:
            parts.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size}")
        parts.append(f"max {self.max_new_tokens} tokens")
        return ", ".join(parts)

    def generation_config(self, tokenizer, stop_ids: Sequence[int]):
        """A complete GenerationConfig: every knob set here, so a model's own generation_config
        (temperature, top_p) cannot switch sampling on or warn."""
        from transformers import GenerationConfig

        sample = self.strategy == "sample"
        return GenerationConfig(
            do_sample=sample,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=list(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
            temperature=self.temperature if sample else None,
            top_p=self.top_p if sample else None,
            top_k=(self.top_k or None) if sample else None,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty != 1.0 else None,
            no_repeat_ngram_size=self.no_repeat_ngram_size or None,
        )


def question_seed(seed: int, token_ids: Sequence[int]) -> int:
    """The sampling seed of one question: the policy seed and the question's own prompt token ids,
    hashed. Its draws depend on nothing else: not on neighbours, position, batch or process."""
    digest = hashlib.sha256(f"{seed}|".encode() + ",".join(map(str, token_ids)).encode())
    return int.from_bytes(digest.digest()[:8], "big") & ((1 << 63) - 1)


def _per_row_sampler(policy: DecodingPolicy, row_seeds: Sequence[int]):
    """A LogitsProcessor that samples each row on its own and forces that token.

    Scores (after the penalties `generate` applies itself: repetition, no-repeat n-grams) are
    divided by the temperature; the candidates are the top_k highest (all when 0), sorted; top_p
    keeps the shortest prefix whose probability reaches top_p (at least one token); then each
    row draws once from its own `torch.Generator` (seeded by `question_seed`, one per row for the
    whole answer). The row's scores become 0 at the drawn token and -inf elsewhere, so
    `generate` runs greedily over them. Every step works row by row on the slab's fixed
    (rows, vocab) shape; sorting only top_k candidates keeps it cheap.
    """
    import torch
    from transformers import LogitsProcessor

    generators = [torch.Generator().manual_seed(seed) for seed in row_seeds]

    class PerRowSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.float() / policy.temperature
            if policy.top_k:
                values, candidates = scores.topk(min(policy.top_k, scores.shape[-1]), dim=-1)
            else:
                values, candidates = scores.sort(dim=-1, descending=True)
            if policy.top_p < 1.0:
                probs = torch.softmax(values, dim=-1)
                before = probs.cumsum(dim=-1) - probs  # probability of the better candidates
                values = values.masked_fill(before >= policy.top_p, float("-inf"))
            probs = torch.softmax(values, dim=-1).cpu()
            candidates = candidates.cpu()
            forced = torch.full_like(scores, float("-inf"))
            for row, generator in enumerate(generators):
                pick = torch.multinomial(probs[row], 1, generator=generator).item()
                forced[row, candidates[row, pick].item()] = 0.0
            return forced

    return PerRowSampler()


def _real_rows_only(n_real: int, n_rows: int):
    """A StoppingCriteria that marks filler rows done from the first step, so a slab stops when
    all its real rows have stopped (or at max_new_tokens)."""
    import torch
    from transformers import StoppingCriteria

    filler = torch.tensor([row >= n_real for row in range(n_rows)])

    class RealRowsOnly(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return filler.to(input_ids.device)

    return RealRowsOnly()


def slab_policy(policy: DecodingPolicy) -> DecodingPolicy:
    """What a slab shares: the policy without its no-repeat n-gram size, which is applied row by
    row (`_per_row_no_repeat`). Requests whose policies differ only in that size (the decoding
    ablation: the policy and plain greedy) share slabs."""
    return replace(policy, no_repeat_ngram_size=0)


def _per_row_no_repeat(sizes: Sequence[int]):
    """A LogitsProcessor that bans repeated n-grams row by row, each row with its own n (0: off).

    It calls transformers' own NoRepeatNGramLogitsProcessor on the rows of each size, so a row's
    scores are what that processor gives it in a slab of one policy. `generate` runs custom
    processors after its own (here only the repetition penalty, which commutes with banning)
    and before any sampling warper, the place its built-in n-gram ban takes.
    """
    import torch
    from transformers import LogitsProcessor, NoRepeatNGramLogitsProcessor

    groups = [
        (NoRepeatNGramLogitsProcessor(size), torch.tensor([row for row, n in enumerate(sizes) if n == size]))
        for size in sorted(set(sizes)) if size > 0
    ]

    class PerRowNoRepeat(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            for processor, index in groups:
                index = index.to(scores.device)
                scores[index] = processor(input_ids[index], scores[index])
            return scores

    return PerRowNoRepeat()


@dataclass(frozen=True)
class _Item:
    """One prompt to answer: which request it belongs to, where, its token ids and policy."""

    request: int
    position: int
    ids: list[int]
    policy: DecodingPolicy


def plan_slabs(items: Sequence[_Item], rows: int, bucket_tokens: int) -> list[tuple[DecodingPolicy, int, list[int]]]:
    """(slab policy, bucket length, item indices) per slab: items grouped by `slab_policy`, then
    by bucket (`bucket_slabs`). Which items share a slab changes no answer; grouping the
    policies that can share fills slabs that would otherwise carry filler rows."""
    by_policy: dict[DecodingPolicy, list[int]] = {}
    for index, item in enumerate(items):
        by_policy.setdefault(slab_policy(item.policy), []).append(index)
    return [
        (policy, length, [members[i] for i in slab])
        for policy, members in by_policy.items()
        for length, slab in bucket_slabs([len(items[i].ids) for i in members], rows, bucket_tokens)
    ]


def generate_answer_sets(
    model,
    tokenizer,
    requests: Sequence[tuple[Sequence[str], DecodingPolicy]],
    stop_ids: Sequence[int],
    rows: int,
    progress: str | None = None,
    bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
) -> list[GenerationResult]:
    """Answers to several (chat-formatted prompts, policy) requests, one result per request, each
    in input order, batch-invariant.

    Every forward has exactly `rows` rows of one bucket length (filler rows where fewer
    prompts), so each answer depends only on its own prompt and policy (module docstring).
    Requests whose policies differ only in `no_repeat_ngram_size` share slabs (`plan_slabs`).
    Answers are cut at the first stop id and decoded without special tokens. A result's
    `seconds` is its share of the slabs it rode in (slab time split by real rows). `progress`:
    a tqdm bar with this label (on stderr), counting questions.
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    if rows < 1 or bucket_tokens < 1:
        raise TonetuneError(f"decoding shape: rows ({rows}) and bucket_tokens ({bucket_tokens}) must be >= 1")
    items = [
        _Item(request, position, ids, policy)
        for request, (prompts, policy) in enumerate(requests)
        for position, ids in enumerate(tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else [])
    ]
    results = [GenerationResult([""] * len(prompts), [0] * len(prompts), [False] * len(prompts), 0.0)
               for prompts, _ in requests]
    device = next(model.parameters()).device
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=progress, unit="q", leave=False, dynamic_ncols=True)
    try:
        for policy, length, slab in plan_slabs(items, rows, bucket_tokens):
            started = time.perf_counter()
            real = [items[i] for i in slab]
            # filler rows repeat the slab's first prompt: any content would do, a real prompt
            # keeps their numbers ordinary
            slab_items = real + [real[0]] * (rows - len(real))
            generation_config = policy.generation_config(tokenizer, stop_ids)
            pad_id = generation_config.pad_token_id
            input_ids = torch.tensor([[pad_id] * (length - len(item.ids)) + item.ids for item in slab_items])
            attention_mask = torch.tensor([[0] * (length - len(item.ids)) + [1] * len(item.ids) for item in slab_items])
            processors = LogitsProcessorList()
            sizes = [item.policy.no_repeat_ngram_size for item in real] + [0] * (rows - len(real))
            if any(sizes):
                processors.append(_per_row_no_repeat(sizes))
            if policy.strategy == "sample":
                processors.append(_per_row_sampler(policy, [question_seed(policy.seed, item.ids) for item in slab_items]))
            with torch.inference_mode():
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    generation_config=generation_config, logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([_real_rows_only(len(real), rows)]),
                )
            for item, tokens in zip(real, output[: len(real), length:].tolist(), strict=True):
                kept, ended = cut_at_stop(tokens, stop_ids)
                result = results[item.request]
                result.answers[item.position] = tokenizer.decode(kept, skip_special_tokens=True).strip()
                result.n_tokens[item.position] = len(kept)
                result.stopped[item.position] = ended
            seconds = time.perf_counter() - started
            for item in real:
                results[item.request].seconds += seconds / len(real)
            if bar is not None:
                bar.update(len(real))
    finally:
        if bar is not None:
            bar.close()
    return results


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    stop_ids: Sequence[int],
    policy: DecodingPolicy,
    rows: int,
    progress: str | None = None,
    bucket_tokens: int = DEFAULT_BUCKET_TOKENS,
) -> GenerationResult:
    """Answers to chat-formatted `prompts` under `policy`, in input order, batch-invariant
    (`generate_answer_sets` with one request)."""
    return generate_answer_sets(model, tokenizer, [(prompts, policy)], stop_ids, rows, progress, bucket_tokens)[0]


def answer_question_sets(model, tokenizer, requests: Sequence[tuple[Sequence[str], DecodingPolicy]],
                         system_prompt: str, rows: int, stop_ids: Sequence[int] | None = None,
                         progress: str | None = None,
                         bucket_tokens: int = DEFAULT_BUCKET_TOKENS) -> list[GenerationResult]:
    """(questions, policy) requests -> chat prompts -> `generate_answer_sets`, in eval mode."""
    if stop_ids is None:
        stop_ids = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    was_training = model.training
    model.eval()
    try:
        prompt_requests = [(build_prompts(tokenizer, system_prompt, questions), policy) for questions, policy in requests]
        return generate_answer_sets(model, tokenizer, prompt_requests, stop_ids, rows, progress, bucket_tokens)
    finally:
        if was_training:
            model.train()


def answer_questions(model, tokenizer, questions: Sequence[str], system_prompt: str, policy: DecodingPolicy,
                     rows: int, stop_ids: Sequence[int] | None = None, progress: str | None = None,
                     bucket_tokens: int = DEFAULT_BUCKET_TOKENS) -> GenerationResult:
    """Questions -> chat prompts -> `generate_answers` (the predict stage and the pyfunc both call this)."""
    return answer_question_sets(model, tokenizer, [(questions, policy)], system_prompt, rows, stop_ids, progress,
                                bucket_tokens)[0]


# --------------------------------------------------------------------------- adapters
def load_adapter_model(base_dir: str | Path, adapter_dir: str | Path, precision: str, int8_threshold: float = 6.0,
                       device: str = "auto", attn_implementation: str | None = None):
    """Base in `precision` with the adapter applied, in eval mode; + the adapter folder's
    tokenizer (the one it was trained with; the base's if the folder has none). Loads the
    adapter as `AdapterSwitcher` does."""
    from peft import PeftModel

    base, base_tokenizer = load_for_inference(base_dir, precision, int8_threshold, device, attn_implementation)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False, autocast_adapter_dtype=False)
    cast_adapter_weights(model, adapter_dtype(precision))
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    return model.eval(), load_tokenizer(adapter_dir) if has_tokenizer else base_tokenizer


class AdapterSwitcher:
    """Activates each model on one loaded base: the bare base, or one LoRA adapter at a time.

    The first adapter wraps the base in a PeftModel. To switch, the active adapter is deleted
    *before* the next one is loaded: PEFT refuses a second adapter next to one trained with
    biases (`lora_bias: lora_only`, the paper's setting), and such an adapter writes its biases
    into the base layers, which deleting it does not undo. So the base's bias tensors are copied
    once (they are small) and put back before each adapter loads and before the base answers.
    Adapter weights are cast to `adapter_dtype(precision)` as in training and `load_adapter_model`.
    """

    def __init__(self, base_model, precision: str = "fp32"):
        self.base_model = base_model
        self.precision = precision
        self.peft_model = None
        self.active: str | None = None
        self._base_biases = [
            (parameter, parameter.detach().clone())
            for name, parameter in base_model.named_parameters() if name.endswith(".bias")
        ]

    @staticmethod
    def adapter_key(name: str) -> str:
        """PEFT keeps adapters in a ModuleDict, whose keys may not contain '.'."""
        return re.sub(r"[^A-Za-z0-9_-]", "_", name)

    def restore_base_biases(self) -> None:
        """Put back the biases the base had before any adapter (a no-op for bias-free models)."""
        import torch

        with torch.no_grad():
            for parameter, original in self._base_biases:
                parameter.copy_(original)

    def unload_active(self) -> None:
        """Delete the active adapter and undo what it wrote into the base."""
        if self.peft_model is not None and self.active is not None:
            self.peft_model.delete_adapter(self.active)
            self.active = None
        self.restore_base_biases()

    def load(self, name: str, adapter_dir: Path):
        """Make `adapter_dir` the only loaded, active adapter; returns the model to generate with."""
        key = self.adapter_key(name)
        if key == self.active:
            return self.peft_model.eval()
        self.unload_active()
        if self.peft_model is None:
            from peft import PeftModel

            self.peft_model = PeftModel.from_pretrained(self.base_model, str(adapter_dir), adapter_name=key,
                                                        autocast_adapter_dtype=False)
        else:
            self.peft_model.load_adapter(str(adapter_dir), adapter_name=key, autocast_adapter_dtype=False)
            self.peft_model.set_adapter(key)
        cast_adapter_weights(self.peft_model, adapter_dtype(self.precision))
        self.active = key
        return self.peft_model.eval()

    @contextmanager
    def activate(self, name: str, adapter_dir: Path | None) -> Iterator[Any]:
        """Context in which the returned model answers as the adapter (or the bare base for None)."""
        if adapter_dir is not None:
            yield self.load(name, adapter_dir)
            return
        self.unload_active()  # no adapter left in the LoRA layers, base biases back: the bare base
        yield self.base_model.eval()
