"""Wheels for `make gpu-check` on a GPU machine that has no network and only part of the stack.

Such a machine (e.g. one with Python, torch, transformers and peft preinstalled) gets the rest as
wheels carried into a git-ignored folder (/.gpu-wheels/), installed there into a site folder that
bench/gpu_check.py puts first on the path (`--site`):

    # here, with PyPI: the lock's exact versions of what the machine lacks, for its Python/platform
    .venv/bin/python bench/gpu_wheels.py download .gpu-wheels --python-version 3.12 \\
        --packages trl datasets bitsandbytes mlflow-skinny ... --cuda 130 132
    # there, no network:
    python -m pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl
    python bench/gpu_check.py --site /tmp/site

bitsandbytes' PyPI wheel (43 MB) holds one native library per CUDA/ROCm/XPU toolkit; bitsandbytes
loads only the one matching torch.version.cuda (same major, nearest minor), so `download` repacks
it with the CPU library and the `--cuda` versions given (RECORD loses the same lines; the kept
files keep their hashes): what lets the carried folder stay small. `slim-bnb` does only that.
The total size is printed against --limit-mib.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
NATIVE_LIBRARY = re.compile(r"libbitsandbytes_(\w+)\.(so|dll|dylib)$")


def slim_bitsandbytes(source: Path, out_dir: Path, cuda_versions: list[str]) -> tuple[Path, list[str]]:
    """Repack a bitsandbytes wheel keeping libbitsandbytes_cpu and _cuda<V> for V in cuda_versions."""
    keep = {"cpu", *(f"cuda{version}" for version in cuda_versions)}
    target = out_dir / source.name
    if target.resolve() == source.resolve():
        raise SystemExit("error: slim-bnb needs another output folder than the wheel's own")
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(source) as zin:
        dropped = sorted(
            info.filename for info in zin.infolist()
            if (match := NATIVE_LIBRARY.search(info.filename)) and match.group(1) not in keep
        )
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in zin.infolist():
                if info.filename in dropped:
                    continue
                data = zin.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [line for line in data.decode().splitlines() if line.split(",", 1)[0] not in dropped]
                    data = ("\n".join(lines) + "\n").encode()
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return target, [Path(name).name for name in dropped]


def locked_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def download(dest: Path, packages: list[str], python_version: str, cuda_versions: list[str], limit_mib: float) -> int:
    pins = locked_pins()
    unknown = [name for name in packages if name.lower().replace("_", "-") not in pins]
    if unknown:
        print(f"error: not in requirements.lock: {', '.join(unknown)}", file=sys.stderr)
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / ".download"
    requirements = [f"{name}=={pins[name.lower().replace('_', '-')]}" for name in packages]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(staging),
               "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)
    for wheel in sorted(staging.glob("*.whl")):
        if wheel.name.startswith("bitsandbytes-"):
            target, dropped = slim_bitsandbytes(wheel, dest, cuda_versions)
            print(f"{target.name}: dropped {len(dropped)} native libraries, kept cpu + cuda {', '.join(cuda_versions)}")
            wheel.unlink()
        else:
            wheel.replace(dest / wheel.name)
    staging.rmdir()
    total = sum(path.stat().st_size for path in dest.glob("*.whl")) / 2**20
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {total:.1f} MiB (limit {limit_mib:g} MiB)")
    return 0 if total <= limit_mib else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="the lock's wheels of --packages for another Python/platform")
    get.add_argument("dest", type=Path)
    get.add_argument("--packages", nargs="+", required=True)
    get.add_argument("--python-version", default="3.12")
    get.add_argument("--cuda", nargs="+", default=["130", "132"], help="bitsandbytes CUDA libraries to keep")
    get.add_argument("--limit-mib", type=float, default=64)
    slim = commands.add_parser("slim-bnb", help="repack a bitsandbytes wheel with fewer native libraries")
    slim.add_argument("wheel", type=Path)
    slim.add_argument("out_dir", type=Path)
    slim.add_argument("--cuda", nargs="+", default=["130", "132"])
    args = parser.parse_args(argv)
    if args.command == "download":
        return download(args.dest, args.packages, args.python_version, args.cuda, args.limit_mib)
    target, dropped = slim_bitsandbytes(args.wheel, args.out_dir, args.cuda)
    print(f"{target}: dropped {len(dropped)} native libraries: {', '.join(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
