"""Benchmark of the predict stage's inference path (pipeline.core.modeling) on models/base, in one run.

1. Generation tokens/s under a decoding policy, batched (left padding, length-sorted batches:
   what the stage and the registered model do) versus one question at a time. Goal: >= 5x.
2. The cost of switching LoRA adapters on a loaded base (AdapterSwitcher: what the stage does)
   versus reloading base + adapter from disk per model (what a fresh pyfunc load does).
3. Per precision (--precisions bf16,fp32,int8): the precisions adapters are evaluated and served in.

    .venv/bin/python bench/evaluate.py                      # ~3-5 minutes on 2 idle cores
    .venv/bin/python bench/evaluate.py --batch-size 8 --max-new-tokens 128 --precisions bf16,fp32,int8

Tokens counted are the kept answer tokens (up to the end of turn), so a batch that keeps
computing for already-finished rows is charged for that waste. Wall and CPU seconds are both
printed: on a shared machine wall time includes waiting for the cores.
Results are recorded in BENCHMARKS.md ("## evaluate").
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core import modeling  # noqa: E402
from pipeline.core.config import BASE_MODEL_DIR  # noqa: E402
from pipeline.core.modeling import DecodingPolicy  # noqa: E402

QUESTIONS = [
    "Why did the Roman Empire split into an eastern and a western half?",
    "How does photosynthesis turn sunlight into chemical energy?",
    "What made the printing press so important for the spread of ideas in Europe?",
    "Why is the Amazon rainforest often called the lungs of the planet?",
    "How do vaccines train the immune system?",
    "What caused the Great Depression?",
    "Why does the Moon always show the same face to Earth?",
    "How did the Silk Road shape trade between China and Europe?",
    "What is the difference between weather and climate?",
    "Who was Ada Lovelace and why is she remembered?",
    "How do volcanoes form?",
    "Why did the Titanic sink?",
    "What does DNA do in a living cell?",
    "How did jazz music develop in the United States?",
    "Why are coral reefs in danger?",
    "What was the purpose of the Great Wall of China?",
]


def timed(function, *args, **kwargs):
    """(result, wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_generation(model, tokenizer, system_prompt, questions, batch_size, single, policy: DecodingPolicy) -> dict:
    """Batched vs one-at-a-time tokens/s on the same model."""
    stop_ids = modeling.end_of_turn_ids(tokenizer, model.generation_config)
    prompts = modeling.build_prompts(tokenizer, system_prompt, questions)
    modeling.generate_answers(model, tokenizer, prompts[:1], stop_ids, DecodingPolicy.greedy(4), 1)  # warm-up
    one, one_wall, one_cpu = timed(modeling.generate_answers, model, tokenizer, prompts[:single], stop_ids, policy, 1)
    many, many_wall, many_cpu = timed(modeling.generate_answers, model, tokenizer, prompts, stop_ids, policy, batch_size)
    return {
        "single_tokens": sum(one.n_tokens), "single_wall": one_wall, "single_cpu": one_cpu,
        "single_tps": sum(one.n_tokens) / one_wall,
        "batched_tokens": sum(many.n_tokens), "batched_wall": many_wall, "batched_cpu": many_cpu,
        "batched_tps": sum(many.n_tokens) / many_wall,
        "stopped_pct": 100 * sum(many.stopped) / len(many.stopped),
        "answer": many.answers[0],
    }


def make_adapters(base_dir: Path, folder: Path, count: int, r: int) -> list[Path]:
    """`count` random LoRA adapters (q/k/v, like the train stage) saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for index in range(count):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        path = folder / f"lora-bench-r{r}-{index}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def bench_switching(base_dir: Path, adapters: list[Path], precision: str, rounds: int) -> dict:
    """Seconds per adapter switch on a loaded base vs per reload of base + adapter."""
    model, _ = modeling.load_for_inference(base_dir, precision)
    switcher = modeling.AdapterSwitcher(model, precision)
    switcher.load(adapters[0].name, adapters[0])
    switches = []
    for index in range(rounds):
        adapter = adapters[(index + 1) % len(adapters)]
        _, wall, _ = timed(switcher.load, adapter.name, adapter)
        switches.append(wall)
    reloads = []
    for index in range(max(2, rounds // 3)):
        adapter = adapters[index % len(adapters)]

        def reload(adapter=adapter):
            return modeling.load_adapter_model(base_dir, adapter, precision)

        _, wall, _ = timed(reload)
        reloads.append(wall)
    return {"switch_s": statistics.median(switches), "reload_s": statistics.median(reloads)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE_MODEL_DIR, help="HF model folder (default models/base)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions", type=int, default=16, help="questions for the batched run")
    parser.add_argument("--single", type=int, default=4, help="questions answered one at a time")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precisions", default="bf16", help="comma-separated: bf16,fp32,int8")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="decoding policy knob (0: plain greedy)")
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6, help="adapter switches timed")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core); "
                        "1 is steadier on a machine shared with other jobs")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"error: {args.base} missing; build it with `.venv/bin/python -m pipeline.base_model`")
    import torch

    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT

    if args.threads:
        torch.set_num_threads(args.threads)
    questions = (QUESTIONS * (args.questions // len(QUESTIONS) + 1))[: args.questions]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    policy = DecodingPolicy(no_repeat_ngram_size=args.no_repeat_ngram_size, max_new_tokens=args.max_new_tokens)
    print(f"decoding: {policy.describe()}")
    for precision in args.precisions.split(","):
        model, tokenizer = modeling.load_for_inference(args.base, precision)
        result = bench_generation(model, tokenizer, CONCISE_SYSTEM_PROMPT, questions, args.batch_size, args.single,
                                  policy)
        print(
            f"generation {precision}: one at a time {result['single_tps']:.1f} tokens/s "
            f"({result['single_tokens']} tokens, {result['single_wall']:.1f} s wall, {result['single_cpu']:.1f} s CPU); "
            f"batch {args.batch_size}: {result['batched_tps']:.1f} tokens/s ({result['batched_tokens']} tokens, "
            f"{result['batched_wall']:.1f} s wall, {result['batched_cpu']:.1f} s CPU, {result['stopped_pct']:.0f}% ended "
            f"their turn); speed-up {result['batched_tps'] / result['single_tps']:.1f}x"
        )
        print(f"  e.g. {result['answer'][:120]!r}")
        del model
    folder = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    try:
        adapters = make_adapters(args.base, folder, 2, args.lora_r)
        switching = bench_switching(args.base, adapters, args.precisions.split(",")[0], args.rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"adapters (r={args.lora_r}, q/k/v): switch on a loaded base {1000 * switching['switch_s']:.0f} ms, "
          f"reload base + adapter {1000 * switching['reload_s']:.0f} ms "
          f"({switching['reload_s'] / switching['switch_s']:.0f}x)")


if __name__ == "__main__":
    main()
