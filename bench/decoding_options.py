"""Benchmark of decoding options the demo does not use, against the demo's own, in one run.

The demo decodes in fp32 with eager attention in slabs of `evaluate.batch_size` (16) rows.
Each option below changes the kernels (so, possibly, the answers), so none is taken without
re-checking the demo's decision on every kernel path; this measures what each would buy:

- `sdpa`: torch's fused scaled-dot-product attention instead of eager matmul + softmax;
- rows 32: slabs of 32 rows instead of 16 (fewer weight reads per question, more filler rows
  when a bucket holds few questions).

In a demo workspace (after `make demo`: models/base, the adapter, data/splits/val.parquet), the
base (verbose prompt) and the demo's adapter (concise prompt) each answer the first --questions
validation questions under the demo's policy, once per option, one option after the other in
one process. Per option: seconds, seconds per question, the ratio to the first option, and how
many answers are byte-identical to the first option's.

    .venv/bin/python bench/decoding_options.py                      # ~9 min on 2 cores
    .venv/bin/python bench/decoding_options.py --questions 16 --options eager:16,sdpa:16

Results are recorded in BENCHMARKS.md ("### Decoding options not taken").
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core import modeling  # noqa: E402
from pipeline.core.adapterinfo import discover_adapters, read_adapter_record, select_adapters  # noqa: E402
from pipeline.core.config import ADAPTERS_DIR, BASE_MODEL_DIR, VAL_SPLIT_PATH, load_config  # noqa: E402
from pipeline.core.contracts import grid_adapter_names  # noqa: E402
from pipeline.core.machine import numerics_facts  # noqa: E402
from pipeline.core.predictions import read_validation  # noqa: E402
from pipeline.core.prompts import system_prompts  # noqa: E402


def parse_options(text: str) -> list[tuple[str, int]]:
    """`eager:16,sdpa:32` -> [("eager", 16), ("sdpa", 32)]."""
    options = []
    for part in text.split(","):
        attention, _, rows = part.strip().partition(":")
        if attention not in ("eager", "sdpa") or not rows.isdigit() or int(rows) < 1:
            raise SystemExit(f"--options: {part!r} is not attention:rows (attention eager or sdpa, rows >= 1)")
        options.append((attention, int(rows)))
    return options


def load_fp32(attention: str, adapter_dir: Path | None):
    """The fp32 base with `attention`, and the adapter when given, loaded as the predict stage
    loads them (pipeline.core.modeling's loaders)."""
    if adapter_dir is None:
        return modeling.load_for_inference(BASE_MODEL_DIR, "fp32", device="cpu", attn_implementation=attention)[0]
    return modeling.load_adapter_model(BASE_MODEL_DIR, adapter_dir, "fp32", device="cpu",
                                       attn_implementation=attention)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=32, help="first N validation questions (default 32)")
    parser.add_argument("--options", default="eager:16,sdpa:16,eager:32,sdpa:32",
                        help="attention:rows pairs; the first is the reference (default: the demo's, eager:16)")
    args = parser.parse_args(argv)
    options = parse_options(args.options)
    config = load_config()
    policy = modeling.DecodingPolicy.for_evaluation(config.evaluate)
    questions = read_validation(VAL_SPLIT_PATH, args.questions)["question"].astype(str).tolist()
    texts = system_prompts(config.tone)
    adapters, _ = select_adapters(discover_adapters(ADAPTERS_DIR), grid_adapter_names(config.train), False)
    fp32_adapters = [path for path in adapters if read_adapter_record(path).get("precision") == "fp32"]
    if not fp32_adapters:
        raise SystemExit(f"no fp32 adapter of the current train.grid in {ADAPTERS_DIR}: run `make demo` first")
    models = [("base", None, texts.system_prompt("verbose")), (fp32_adapters[0].name, fp32_adapters[0],
                                                             texts.system_prompt("concise"))]
    tokenizer = modeling.load_tokenizer(BASE_MODEL_DIR)
    print(f"{len(questions)} validation questions, {policy.describe()}, bucket_tokens {config.evaluate.bucket_tokens}")
    print("numerics:", json.dumps(numerics_facts()))
    print("| model | attention | rows | seconds | s/question | speed-up over the first | identical to the first |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, adapter_dir, system_prompt in models:
        reference, reference_seconds = None, None
        for attention, rows in options:
            model = load_fp32(attention, adapter_dir)
            stop_ids = modeling.end_of_turn_ids(tokenizer, model.generation_config)
            started = time.perf_counter()
            answers = modeling.answer_questions(model, tokenizer, questions, system_prompt, policy, rows, stop_ids,
                                                bucket_tokens=config.evaluate.bucket_tokens).answers
            seconds = time.perf_counter() - started
            if reference is None:
                reference, reference_seconds = answers, seconds
            same = sum(a.encode() == b.encode() for a, b in zip(answers, reference, strict=True))
            print(f"| {name} | {attention} | {rows} | {seconds:.1f} | {seconds / len(questions):.2f} | "
                  f"{reference_seconds / seconds:.2f}x | {same}/{len(questions)} |", flush=True)
            del model
            gc.collect()


if __name__ == "__main__":
    main()
