"""Benchmark of the generate stage's engine against a loopback fake of the API.

    python bench/generate.py            # ~2-4 min on 2 cores; writes the "## generate" section of BENCHMARKS.md
    python bench/generate.py --quick    # shorter runs, prints only

What it measures, each in a fresh child process running the real engine path (ChatClient with
the real `openai` package over HTTP, the fsynced response cache, Flesch gate, faithfulness and
dedup in source order) against `tests.fakes.openai_server` in its own process:

1. throughput at 1, 8 and 64 requests in flight with a fixed 200 ms server latency, as calls/s
   and as a fraction of the latency bound (concurrency / 0.2 s). Goal: >= 80 % at 64;
2. peak memory (ru_maxrss of the child) and wall time of a 10,000-pair run (no latency).

Embeddings: MiniLM on 2 CPU cores embeds ~660 texts/s, i.e. ~220 sections/s at 3 texts each,
which would be the bottleneck at 320 calls/s and measure the embedder, not the engine. These
runs therefore use a cheap deterministic stand-in (hashed bag of words, 512 dims), and say so
in the output; the demo and tests use the real MiniLM.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

LATENCY_MS = 200
CONCURRENCIES = (1, 8, 64)
MEMORY_PAIRS = 10_000
BENCHMARKS_FILE = REPO_ROOT / "BENCHMARKS.md"
SECTION_HEADER = "## generate"
EMBEDDER_NOTE = "stand-in embedder (hashed bag of words, 384-d like MiniLM), not MiniLM"

# One-syllable words: sentences built from them score Flesch ~100, so the gate passes them.
WORDS = ("cat dog sun rain tree leaf bird fish boat ship road town hill lake sea sky star moon cloud wind "
         "snow ice fire rock sand salt bread milk tea cake corn rice egg jam nut pear plum fig bee ant "
         "owl fox wolf bear deer frog crab seal duck goat cow pig hen horse mouse rat bat bell drum harp "
         "song dance game ball kite bike car bus train plane bridge tower wall door roof floor bed chair "
         "desk lamp clock map book pen ink card coin gold steel wood glass stone clay silk wool rope net "
         "hat coat shoe sock glove ring box bag cup bowl plate fork knife spoon pot pan oven soap brush").split()


# The fake generator's template words ("What should I know about <title>?", "Sure. ..."): left
# out so that questions compare by their subject, as a sentence embedder would roughly do.
TEMPLATE_WORDS = frozenset("what should i know about sure so the is a it has".split())


class HashEmbedder:
    """Deterministic stand-in for a sentence embedder: hashed bag of content words, L2-normalised."""

    def __init__(self, dim: int = 384):  # MiniLM's width, so the dedup index costs the same memory
        self.dim = dim

    def encode(self, texts, show_progress=None) -> np.ndarray:
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in re.findall(r"[a-z0-9]+", text.lower()):
                if token in TEMPLATE_WORDS:
                    continue
                digest = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")
                vectors[row, digest % self.dim] += 1.0 if (digest >> 32) & 1 else -1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)


def bench_sections(count: int, seed: int = 0):
    """`count` sections with unique two-word titles and simple one-syllable-word texts."""
    from pipeline.generate.engine import Section

    rng = random.Random(seed)
    names: set[tuple[str, ...]] = set()
    while len(names) < count:  # three distinct words: two titles share at most 2 of 3 (cosine <= 0.67)
        names.add(tuple(sorted(rng.sample(WORDS, 3))))
    names = sorted(names)
    rng.shuffle(names)
    sections = []
    for position in range(count):
        title = " ".join(names[position]).title()
        words = [rng.choice(WORDS) for _ in range(12)]
        text = f"The {title.lower()} is a {' '.join(words[:6])}. It has a {' '.join(words[6:])}."
        sections.append(Section(position, f"b{position:06d}", title, text))
    return sections


def start_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    """The fake API in its own process (so its CPU does not share our interpreter)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_server", "--port", "0", "--latency-ms", str(latency_ms),
         "--behaviour", "tonetune"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"fake server did not start: {line!r}")
    return process, line.split()[-1]


def child_run(base_url: str, concurrency: int, sections: int, target: int) -> dict:
    """One engine run in this process; returns its figures (called in a fresh child)."""
    from pipeline.core.config import ClientConfig, GenerateConfig
    from pipeline.core.llmclient import OpenAIBackend
    from pipeline.core.responsecache import ResponseCache
    from pipeline.generate.__main__ import run_engine

    client = ClientConfig(base_url=base_url, api_key_env="BENCH_KEY", concurrency=concurrency, request_timeout_s=30,
                          max_retries=2, backoff_base_s=0.05, backoff_max_s=0.5, prices={}, max_cost_usd=None,
                          allow_unpriced=True)  # the loopback server bills nothing
    config = GenerateConfig(backend="openai", model="bench-model", target_pairs=target, client=client)
    from pipeline.core.textmetrics import flesch_reading_ease

    flesch_reading_ease("Warm up textstat and its dictionary first.")  # ~3 s once per process
    with tempfile.TemporaryDirectory() as scratch:
        cache = ResponseCache(Path(scratch) / "responses.jsonl")
        backend = OpenAIBackend(base_url, "bench-key", concurrency, client.request_timeout_s)
        started_cpu = time.process_time()
        result = asyncio.run(run_engine(config, backend, cache, HashEmbedder(), bench_sections(sections),
                                        show_progress=False))
        cache.close()
        cache_mb = (Path(scratch) / "responses.jsonl").stat().st_size / 2**20
    stats = result.stats
    return {
        "concurrency": concurrency, "sections": sections, "accepted": len(result.pairs),
        "api_calls": stats.api_calls, "errors": stats.errors, "wall_time_s": result.wall_time_s,
        "calls_per_s": stats.api_calls / result.wall_time_s, "cpu_s": time.process_time() - started_cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cache_mb": cache_mb,
        "counts": result.counts(),
    }


def in_child(base_url: str, concurrency: int, sections: int, target: int) -> dict:
    """Run `child_run` in a fresh interpreter, so memory peaks and warm-up do not mix."""
    output = subprocess.run(
        [sys.executable, __file__, "--child", base_url, str(concurrency), str(sections), str(target)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    if output.returncode != 0:
        raise SystemExit(f"bench child failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({model}), Python {platform.python_version()}"


def load_average() -> float:
    """1-minute load average: these 2 cores are shared, so every figure comes with it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_benchmarks(seconds: float) -> tuple[list[dict], dict]:
    """Throughput at each concurrency (200 ms), then the 10,000-pair memory run (0 ms)."""
    throughput = []
    server, url = start_server(LATENCY_MS)
    try:
        for concurrency in CONCURRENCIES:
            bound = concurrency / (LATENCY_MS / 1000)
            sections = max(8, int(bound * seconds / 2.2))  # ~2.2 calls per section
            figures = in_child(url, concurrency, sections, target=sections)
            figures["bound_calls_per_s"] = bound
            figures["fraction_of_bound"] = figures["calls_per_s"] / bound
            throughput.append(figures)
            print(f"concurrency {concurrency:>2}: {figures['calls_per_s']:7.1f} calls/s = "
                  f"{figures['fraction_of_bound']:6.1%} of the {bound:.0f}/s bound "
                  f"({figures['api_calls']} calls, {figures['wall_time_s']:.1f} s, {figures['errors']} errors, "
                  f"{figures['cpu_s'] / figures['api_calls'] * 1000:.2f} ms client CPU per call)", flush=True)
    finally:
        server.kill()
    server, url = start_server(0)
    try:
        memory = in_child(url, 64, int(MEMORY_PAIRS * 1.25), target=MEMORY_PAIRS)
    finally:
        server.kill()
    memory["baseline_rss_mb"] = throughput[0]["peak_rss_mb"]  # same process, 16 sections: libraries only
    print(f"{memory['accepted']} pairs (concurrency 64, no latency): peak RSS {memory['peak_rss_mb']:.0f} MiB "
          f"(a 16-section run: {memory['baseline_rss_mb']:.0f} MiB), "
          f"{memory['wall_time_s']:.1f} s, {memory['calls_per_s']:.0f} calls/s, cache file {memory['cache_mb']:.1f} MiB")
    return throughput, memory


def markdown(throughput: list[dict], memory: dict, command: str, load_at_start: float) -> str:
    """The "## generate" section of BENCHMARKS.md."""
    lines = [
        SECTION_HEADER, "",
        f"Generation engine against the loopback fake API (`tests/fakes/openai_server.py`, own process), "
        f"real `openai` client (aiohttp transport), fsynced response cache, Flesch gate, faithfulness and "
        f"dedup in source order; {EMBEDDER_NOTE} (MiniLM would measure the embedder: ~660 texts/s on 2 cores).",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine()}; shared with other jobs: load average {load_at_start:.1f} at the start, "
        f"{load_average():.1f} at the end (the client needs ~1.5 ms of CPU per call, so 64 in flight at "
        f"200 ms needs about half a core for the client; with less, the rate drops)",
        f"- Command: `{command}`",
        "",
        f"| in flight | server latency | calls | wall s | calls/s | bound (conc./{LATENCY_MS / 1000:g} s) | % of bound "
        "| client CPU per call |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in throughput:
        lines.append(f"| {row['concurrency']} | {LATENCY_MS} ms | {row['api_calls']} | {row['wall_time_s']:.1f} | "
                     f"{row['calls_per_s']:.1f} | {row['bound_calls_per_s']:.0f} | {row['fraction_of_bound']:.1%} | "
                     f"{row['cpu_s'] / row['api_calls'] * 1000:.2f} ms |")
    lines += [
        "",
        f"10,000-pair run (64 in flight, no latency): {memory['accepted']} pairs, {memory['api_calls']} calls in "
        f"{memory['wall_time_s']:.1f} s ({memory['calls_per_s']:.0f} calls/s, {memory['cpu_s']:.0f} s CPU), "
        f"peak RSS {memory['peak_rss_mb']:.0f} MiB (the same process for a 16-section run: "
        f"{memory['baseline_rss_mb']:.0f} MiB, i.e. interpreter and libraries), response cache {memory['cache_mb']:.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = BENCHMARKS_FILE) -> None:
    """Replace (or append) the "## generate" section, leaving other sections alone."""
    current = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION_HEADER)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    updated = pattern.sub(lambda _: text + "\n", current) if pattern.search(current) else current.rstrip() + "\n\n" + text
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(updated.rstrip() + "\n")
    os.replace(temporary, path)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        base_url, concurrency, sections, target = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(child_run(base_url, concurrency, sections, target)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs; do not write BENCHMARKS.md")
    parser.add_argument("--seconds", type=float, default=15.0, help="target length of each throughput run")
    args = parser.parse_args()
    load_at_start = load_average()
    print(f"generate bench: {EMBEDDER_NOTE}; {machine()}, load average {load_at_start:.1f}", flush=True)
    throughput, memory = run_benchmarks(3.0 if args.quick else args.seconds)
    print(f"load average at the end: {load_average():.1f}")
    if not args.quick:
        write_section(markdown(throughput, memory, "python bench/generate.py", load_at_start))
        print(f"wrote the {SECTION_HEADER!r} section of {BENCHMARKS_FILE.name}")


if __name__ == "__main__":
    main()
