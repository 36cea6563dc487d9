"""Benchmark of batch-invariant decoding (pipeline.core.modeling.generate_answers) against the
batched path it replaced (87b465a's `answer_questions`: length-sorted batches of 16), in one run.

On models/base (SmolLM2-135M) with the demo's questions (recordings/demo/part-1.jsonl), the
concise system prompt and the demo's policy (greedy, no_repeat_ngram_size 4, 128 new tokens),
per precision: fp32 = the bare base; bf16 and int8 = the base with a random-init LoRA adapter
(r=32 on q/k/v, like the train stage), so an 8-bit run goes through PEFT's 8-bit LoRA layers.

For each path: questions/s on --questions questions all at once, the latency of one question
sent alone (median of --alone), peak RSS of the phase (VmHWM, reset before each phase), and
invariance counts: answers equal to the all-at-once answers when each of the first --alone
questions comes alone, and when all come shuffled.

    .venv/bin/python bench/invariance.py                            # 100 questions: ~40 min on 2 cores (estimate)
    .venv/bin/python bench/invariance.py --questions 32 --alone 3 --precisions fp32,bf16,int8

The baseline is 87b465a's pipeline/core/modeling.py, loaded from git into a temp file. Its int8
runs on layers without the per-sequence wrapper (as 87b465a loaded them); the invariant path
then wraps the same loaded model. Results are recorded in BENCHMARKS.md ("## invariance").
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core import modeling  # noqa: E402
from pipeline.core.config import BASE_MODEL_DIR  # noqa: E402
from pipeline.core.machine import numerics_facts  # noqa: E402
from pipeline.core.modeling import DecodingPolicy  # noqa: E402

BASELINE_COMMIT = "87b465a"
QUESTIONS_FILE = ROOT / "recordings" / "demo" / "part-1.jsonl"


def load_baseline(commit: str = BASELINE_COMMIT):
    """87b465a's pipeline/core/modeling.py as a module (it imports today's pipeline.core helpers,
    which it only uses for config types, errors and prompts)."""
    source = subprocess.run(["git", "show", f"{commit}:pipeline/core/modeling.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench_invariance_")) / "baseline_modeling.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_modeling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_modeling"] = module
    spec.loader.exec_module(module)
    return module


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each phase reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """VmHWM (peak RSS since the last reset) in MiB; ru_maxrss (process lifetime) elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(function):
    """(result, wall seconds, peak RSS MiB) of one call."""
    reset_peak_rss()
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started, peak_rss_mib()


def make_adapter(base_dir: Path, folder: Path, r: int) -> Path:
    """A random-init LoRA adapter (q/k/v, A and B random) saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    path = folder / f"lora-bench-r{r}"
    get_peft_model(model, config).save_pretrained(path)
    return path


def load(base_dir: Path, precision: str, adapter: Path | None):
    """The model as 87b465a loaded it (no per-sequence int8 wrapper yet) and its tokenizer."""
    from peft import PeftModel

    model = modeling.load_base_model(base_dir, precision).eval()
    model.requires_grad_(False)
    tokenizer = modeling.load_tokenizer(base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, autocast_adapter_dtype=False)
        modeling.cast_adapter_weights(model, modeling.adapter_dtype(precision))
    return model.eval(), tokenizer


def measure(answer, questions: list[str], n_alone: int, seed: int = 0) -> dict:
    """Throughput, single-question latency, peak RSS and invariance counts of one path.
    `answer(list of questions) -> list of answers`."""
    answer(questions[:1])  # warm-up (first-call allocations, lazy inits)
    together, wall, peak = phase(lambda: answer(questions))
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    shuffled = answer([questions[i] for i in order])
    shuffled_same = sum(shuffled[j] == together[i] for j, i in enumerate(order))
    alone_walls, alone_same, alone_peak = [], 0, 0.0
    for i in range(n_alone):
        (single,), single_wall, single_peak = phase(lambda i=i: answer([questions[i]]))
        alone_walls.append(single_wall)
        alone_peak = max(alone_peak, single_peak)
        alone_same += single == together[i]
    return {
        "questions_per_s": len(questions) / wall, "wall_s": wall, "peak_rss_mib": peak,
        "alone_latency_s": statistics.median(alone_walls), "alone_peak_rss_mib": alone_peak,
        "alone_same": alone_same, "n_alone": n_alone, "shuffled_same": shuffled_same, "n": len(questions),
        "answers": together,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE_MODEL_DIR, help="HF model folder (default models/base)")
    parser.add_argument("--questions", type=int, default=100, help="demo questions answered all at once")
    parser.add_argument("--alone", type=int, default=4, help="of those, how many are also sent alone")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--batch-size", type=int, default=16, help="baseline batch size and invariant rows")
    parser.add_argument("--bucket-tokens", type=int, default=modeling.DEFAULT_BUCKET_TOKENS)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lora-r", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"error: {args.base} missing; build it with `.venv/bin/python -m pipeline.base_model`")
    import torch

    from pipeline.core.system_prompts import CONCISE_SYSTEM_PROMPT

    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = load_baseline()
    questions = [json.loads(line)["question"] for line in QUESTIONS_FILE.read_text().splitlines() if line.strip()]
    questions = questions[: args.questions]
    policy = DecodingPolicy(strategy="greedy", no_repeat_ngram_size=4, max_new_tokens=args.max_new_tokens)
    old_policy = baseline.DecodingPolicy(**policy.to_dict())
    facts = numerics_facts()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}; numerics: {json.dumps(facts)}")
    print(f"{len(questions)} questions ({QUESTIONS_FILE.relative_to(ROOT)}), concise prompt, {policy.describe()}; "
          f"baseline {BASELINE_COMMIT} batch {args.batch_size}; invariant rows {args.batch_size}, "
          f"bucket_tokens {args.bucket_tokens}", flush=True)
    results = {"numerics": facts, "args": {k: str(v) for k, v in vars(args).items()}, "precisions": {}}
    folder = Path(tempfile.mkdtemp(prefix="bench_invariance_"))
    adapter = None
    for precision in args.precisions.split(","):
        if precision != "fp32" and adapter is None:
            adapter = make_adapter(args.base, folder, args.lora_r)
        model, tokenizer = load(args.base, precision, None if precision == "fp32" else adapter)
        stop_ids = modeling.end_of_turn_ids(tokenizer, model.generation_config)

        def old(batch, model=model, tokenizer=tokenizer, stop_ids=stop_ids):
            return baseline.answer_questions(model, tokenizer, batch, CONCISE_SYSTEM_PROMPT, old_policy,
                                             args.batch_size, stop_ids).answers

        def new(batch, model=model, tokenizer=tokenizer, stop_ids=stop_ids):
            return modeling.answer_questions(model, tokenizer, batch, CONCISE_SYSTEM_PROMPT, policy, args.batch_size,
                                             stop_ids, bucket_tokens=args.bucket_tokens).answers

        before = measure(old, questions, args.alone)
        if precision == "int8":
            modeling.int8_per_sequence(model)  # what load_for_inference does today
        after = measure(new, questions, args.alone)
        same_text = sum(a == b for a, b in zip(before.pop("answers"), after.pop("answers"), strict=True))
        label = "base" if precision == "fp32" else f"LoRA r={args.lora_r}"
        for name, result in (("baseline", before), ("invariant", after)):
            print(f"{precision} ({label}) {name}: {result['questions_per_s']:.3f} questions/s "
                  f"({result['wall_s']:.1f} s), alone {result['alone_latency_s']:.2f} s, peak RSS "
                  f"{result['peak_rss_mib']:.0f} MiB (alone {result['alone_peak_rss_mib']:.0f}), same answer alone "
                  f"{result['alone_same']}/{result['n_alone']}, shuffled {result['shuffled_same']}/{result['n']}",
                  flush=True)
        print(f"{precision}: throughput ratio invariant/baseline {after['questions_per_s'] / before['questions_per_s']:.2f}x, "
              f"alone latency ratio {after['alone_latency_s'] / before['alone_latency_s']:.2f}x; "
              f"{same_text}/{len(questions)} answers equal across the two paths", flush=True)
        results["precisions"][precision] = {"baseline": before, "invariant": after, "same_text": same_text}
        del model, old, new  # the closures hold the model too: free it before the next precision
        gc.collect()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
