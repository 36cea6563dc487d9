"""The machine facts that change numerics, recorded with every prediction and benchmark.

Greedy answers and the metrics computed from them depend on the kernels that ran: library
versions, the thread count, the CPU's instruction set (native bf16 or not, AMX) and the caps a
user can put on it (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`). Two prediction files that
differ should be explainable from these facts alone.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_facts() -> dict[str, Any]:
    """CPU model name and which of CPU_FLAGS it has (Linux /proc/cpuinfo; else platform only)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": model, **{f"cpu_{flag}": flag in flags for flag in CPU_FLAGS}}


def differing_facts(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The keys of two `numerics_facts` records whose values differ (a key missing on one side
    counts), sorted: answers are promised identical only where this is empty."""
    return sorted(key for key in set(first) | set(second) if first.get(key) != second.get(key))


def numerics_facts() -> dict[str, Any]:
    """Versions, threads, CPU ISA and ISA caps (imports torch: call it where torch is loaded)."""
    import torch

    return {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **cpu_facts(),
        **{name: os.environ.get(name, "") for name in ISA_ENV},
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }
