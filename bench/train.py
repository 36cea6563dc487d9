"""Benchmark of the train stage on the base model in models/base (the demo: SmolLM2-135M-Instruct).

"Ours" is what `pipeline.train` does: TRL SFTTrainer, each batch padded only to its own longest
example, gradient checkpointing off, and on CPU the loss projected through the LM head only at
the answer positions. The naive baseline is what a first attempt often looks like: a plain
transformers Trainer, every example padded to the longest one in the dataset, gradient
checkpointing on, the model's own loss over full logits. Both train the same LoRA (r=32, q/k/v)
in the same precision on the same examples for the same optimizer steps (batch 16 x 2).

Figure: training tokens/s, counting real (non-padding) tokens only, so padding is charged as
waste, and the padding share of the tokens each method feeds the model. Goal: ours >= 1.5x.
The two alternate round by round (A, B, A, B) so drifting load on a shared machine hits both.

    .venv/bin/python bench/train.py                       # ~3-5 min on 2 idle cores
    .venv/bin/python bench/train.py --precision fp32 --examples 32 --rounds 2
    .venv/bin/python bench/train.py --write               # also rewrite "## train" in BENCHMARKS.md

Examples come from data/splits/train_<largest>.parquet when the split stage has run, else from
the demo recordings (question + final conversational answer): the same length distribution.
Asking for more examples than there are rows is an error (never silently fewer or repeated).
The figures name the base model measured (from models/base/tonetune_base.json or config.json).
On a CUDA machine the same script measures the GPU (bf16 and int8 via --precision); for the
paper-scale GPU check (two model shapes, evaluation, GPU-hours) see bench/gpu_check.py.

Needs mlflow importable: it times pipeline.train's own trainer, and pipeline.train's attach_lora
imports registry.model (an mlflow pyfunc); without mlflow it stops with one line saying so.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCH_DIR = Path.cwd()
sys.path.insert(0, str(REPO_ROOT))
os.chdir(REPO_ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.core.config import BASE_MODEL_DIR, SPLITS_DIR, load_config  # noqa: E402

BENCHMARKS_FILE = REPO_ROOT / "BENCHMARKS.md"
SECTION_HEADER = "## train"


class BenchError(Exception):
    """Bad input: reported as one line, exit 2, before any model is loaded."""


def load_examples(count: int):
    """`count` question/answer rows: the largest demo split, or the demo recordings.

    Raises BenchError when there are fewer rows than `count` (the figures would otherwise claim
    a number of examples the run never saw)."""
    import pandas as pd

    splits = sorted(SPLITS_DIR.glob("train_*.parquet"), key=lambda p: int(p.stem.split("_")[1]))
    if splits:
        frame = pd.read_parquet(splits[-1])[["question", "answer"]]
        source = str(splits[-1])
    else:
        rows = [json.loads(line) for name in sorted(glob.glob("recordings/demo/part-*.jsonl")) for line in open(name)]
        frame = pd.DataFrame([{"question": r["question"], "answer": r["rephrasings"][-1]} for r in rows])
        source = "recordings/demo (question + final rephrasing)"
    if count < 1:
        raise BenchError(f"--examples {count}: must be at least 1")
    if len(frame) < count:
        raise BenchError(f"--examples {count} but {source} has only {len(frame)} rows: use --examples {len(frame)} or fewer")
    return frame.head(count).reset_index(drop=True), source


def describe_base_model(base_dir: Path) -> str:
    """What was measured: the upstream/hub model from tonetune_base.json, else config.json's
    name or architecture, with the parameter count and shape when known."""
    provenance_file, config_file = base_dir / "tonetune_base.json", base_dir / "config.json"
    record = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    name = (record.get("upstream") or record.get("hub_id") or config.get("_name_or_path")
            or (config.get("architectures") or ["unknown model"])[0])
    details = []
    if record.get("parameters"):
        details.append(f"{record['parameters'] / 1e6:.0f}M parameters")
    if config.get("hidden_size") and config.get("num_hidden_layers"):
        details.append(f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers")
    if record.get("gguf_file"):
        details.append(f"from {record['gguf_file']}")
    return f"{name} (`{base_dir}`{', ' + ', '.join(details) if details else ''})"


def require_mlflow() -> None:
    """pipeline.train.attach_lora imports registry.model, which imports mlflow: say so up front."""
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise BenchError(
            "bench/train.py times pipeline.train's trainer, whose attach_lora imports registry.model "
            "(an mlflow pyfunc): install mlflow (make setup) to run it"
        )


def timed(function):
    """(result, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - wall, time.process_time() - cpu


class PaddingCounter:
    """Wraps a data collator and counts real vs total tokens of every batch it builds."""

    def __init__(self, collator):
        self.collator, self.real, self.total = collator, 0, 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.real += int(batch["attention_mask"].sum())
        self.total += int(batch["attention_mask"].numel())
        return batch


def train_ours(frame, precision: str, output_dir: Path, base_dir: Path) -> dict:
    """One pass of pipeline.train's trainer over `frame` (model load not timed)."""
    from transformers import AutoTokenizer

    from pipeline.core.contracts import GridPoint
    from pipeline.core.modeling import load_base_model
    from pipeline.train import attach_lora, build_trainer, conversational_examples

    config = load_config().train.model_copy(update={"epochs": 1, "save_steps": 10**6})
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = attach_lora(load_base_model(base_dir, precision, config.int8_threshold), 32, config, precision)
    point = GridPoint(precision, 32, 1e-3, len(frame))
    trainer = build_trainer(model, tokenizer, conversational_examples(frame), point, config, output_dir)
    counter = PaddingCounter(trainer.data_collator)
    trainer.data_collator = counter
    _, wall, cpu = timed(trainer.train)
    return {"wall": wall, "cpu": cpu, "real": counter.real, "total": counter.total, "steps": trainer.state.global_step,
            "loss": trainer.state.log_history[-2].get("loss")}


def naive_dataset(frame, tokenizer):
    """Chat-template examples, prompt masked, every one padded to the dataset's longest."""
    import datasets

    from pipeline.core.system_prompts import chat_messages

    encoded = []
    for question, answer in zip(frame["question"], frame["answer"], strict=True):
        prompt = tokenizer.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)
        full = prompt + answer + "<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        encoded.append((ids, len(prompt_ids)))
    longest = max(len(ids) for ids, _ in encoded)
    rows = []
    for ids, prompt_length in encoded:
        padding = longest - len(ids)
        rows.append({
            "input_ids": ids + [tokenizer.pad_token_id] * padding,
            "attention_mask": [1] * len(ids) + [0] * padding,
            "labels": [-100] * prompt_length + ids[prompt_length:] + [-100] * padding,
        })
    return datasets.Dataset.from_list(rows)


def train_naive(frame, precision: str, output_dir: Path, base_dir: Path) -> dict:
    """Plain transformers Trainer, pad-to-longest-in-dataset, gradient checkpointing on."""
    import torch
    from transformers import AutoTokenizer, Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    from pipeline.core.modeling import load_base_model
    from pipeline.train import attach_lora

    config = load_config().train
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    base = load_base_model(base_dir, precision, config.int8_threshold, attn_implementation="sdpa")  # HF default
    model = attach_lora(base, 32, config, precision)
    model.enable_input_require_grads()  # checkpointing a PEFT model needs grads at the inputs
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=1,
        learning_rate=1e-3,
        activation_checkpointing=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
    )
    dataset = naive_dataset(frame, tokenizer)
    counter = PaddingCounter(default_data_collator)
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=counter)
    trainer.remove_callback(PrinterCallback)
    _, wall, cpu = timed(trainer.train)
    return {"wall": wall, "cpu": cpu, "real": counter.real, "total": counter.total, "steps": trainer.state.global_step,
            "loss": trainer.state.log_history[-2].get("loss")}


def summarise(runs: list[dict]) -> dict:
    """Sum the rounds: tokens/s over all rounds, padding share over all batches."""
    real = sum(run["real"] for run in runs)
    total = sum(run["total"] for run in runs)
    wall = sum(run["wall"] for run in runs)
    cpu = sum(run["cpu"] for run in runs)
    return {"tokens_per_s": real / wall, "tokens_per_cpu_s": real / cpu, "padding": 1 - real / total,
            "wall": wall, "cpu": cpu, "real": real, "steps": sum(run["steps"] for run in runs)}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    name = "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({name}), torch threads {torch.get_num_threads()}, no GPU"


def markdown(args, source: str, model: str, ours: dict, naive: dict, load_start, load_end) -> str:
    ratio_wall = ours["tokens_per_s"] / naive["tokens_per_s"]
    ratio_cpu = ours["tokens_per_cpu_s"] / naive["tokens_per_cpu_s"]
    return "\n".join([
        SECTION_HEADER,
        "",
        f"LoRA training throughput, {model}, r=32 on q/k/v, batch 16 x 2, "
        f"{args.precision}, {args.examples} examples ({source}) x {args.rounds} rounds, one epoch each. "
        "Ours = `pipeline.train` (TRL SFTTrainer, per-batch padding, no gradient checkpointing, loss "
        "projected through the LM head at answer positions only); naive = plain transformers Trainer, "
        "every example padded to the dataset's longest, gradient checkpointing on, full-logit loss. "
        "Tokens = real (non-padding) tokens, so padding counts as waste.",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine()}, Python {platform.python_version()}; load average {load_start:.1f} at the "
        f"start, {load_end:.1f} at the end (shared cores: wall time includes waiting for them)",
        f"- Command: `.venv/bin/python bench/train.py --precision {args.precision} --examples {args.examples} "
        f"--rounds {args.rounds}`",
        "",
        "| setup | optimizer steps | real tokens | tokens/s (wall) | tokens/CPU-s | padding share |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours | {ours['steps']} | {ours['real']} | {ours['tokens_per_s']:.1f} | {ours['tokens_per_cpu_s']:.1f} | "
        f"{ours['padding']:.1%} |",
        f"| naive | {naive['steps']} | {naive['real']} | {naive['tokens_per_s']:.1f} | "
        f"{naive['tokens_per_cpu_s']:.1f} | {naive['padding']:.1%} |",
        "",
        f"Ratio ours / naive: **{ratio_wall:.2f}x** tokens/s (wall), {ratio_cpu:.2f}x per CPU-second. Goal >= 1.5x.",
        "",
    ])


def write_section(text: str) -> None:
    """Replace (or append) only the "## train" section of BENCHMARKS.md."""
    content = BENCHMARKS_FILE.read_text() if BENCHMARKS_FILE.exists() else "# Benchmarks\n"
    lines = content.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION_HEADER), None)
    if start is None:
        content = content.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        content = "".join(lines[:start]) + text + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    BENCHMARKS_FILE.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "int8"))
    parser.add_argument("--examples", type=int, default=64, help="examples per round (32 = one optimizer step)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base-model-dir", type=Path, default=BASE_MODEL_DIR, help="base model folder")
    parser.add_argument("--write", action="store_true", help='rewrite the "## train" section of BENCHMARKS.md')
    args = parser.parse_args()
    base_dir = args.base_model_dir if args.base_model_dir == BASE_MODEL_DIR else LAUNCH_DIR / args.base_model_dir
    try:
        require_mlflow()
        if not (base_dir / "config.json").is_file():
            raise BenchError(f"{base_dir} has no config.json (run `dvc repro base_model`)")
        frame, source = load_examples(args.examples)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    model = describe_base_model(base_dir)
    print(f"base model: {model}; {len(frame)} examples from {source}", flush=True)
    load_start = os.getloadavg()[0]
    results: dict[str, list[dict]] = {"ours": [], "naive": []}
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        for round_index in range(args.rounds):
            order = ("ours", "naive") if round_index % 2 == 0 else ("naive", "ours")
            for name in order:
                function = train_ours if name == "ours" else train_naive
                run = function(frame, args.precision, scratch / f"{name}-{round_index}", base_dir)
                results[name].append(run)
                print(f"round {round_index + 1} {name}: {run['real']} real tokens in {run['wall']:.1f} s wall "
                      f"({run['cpu']:.1f} s CPU), padding {1 - run['real'] / run['total']:.1%}, loss {run['loss']}",
                      flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = markdown(args, source, model, summarise(results["ours"]), summarise(results["naive"]), load_start, os.getloadavg()[0])
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the {SECTION_HEADER!r} section of {BENCHMARKS_FILE}")


if __name__ == "__main__":
    main()
