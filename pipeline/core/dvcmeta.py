"""What DVC knows about a file: its md5, the stage that made it, and whether it changed since.

DVC 3 identifies a file by the plain md5 of its bytes and a directory by the md5 of a `.dir`
manifest (a JSON list of {md5, relpath}) kept in the cache. These helpers read `dvc.lock` and
that manifest directly (no DVC import: 2 s saved per call) so lineage can be recorded by
training runs and audited later: "does the file on disk still match dvc.lock?".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

try:  # libyaml's safe loader: the same mapping as yaml.SafeLoader, ~7x faster on a 65 kB lock
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # a PyYAML built without libyaml
    from yaml import SafeLoader

DVC_LOCK = Path("dvc.lock")
DVC_CACHE = Path(".dvc/cache/files/md5")


def _file_digest(path: str | Path, algorithm: str, chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file's bytes with hashlib's `algorithm`, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_md5(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """md5 of a file's bytes, the hash DVC 3 records for a file."""
    return _file_digest(path, "md5", chunk_size)


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (names an exact GGUF: the one the base came from, or an export)."""
    return _file_digest(path, "sha256", chunk_size)


@dataclass(frozen=True)
class LockedOutput:
    """One `outs` entry of dvc.lock, and the stage that produced it."""

    stage: str
    path: str
    md5: str
    is_dir: bool


def read_lock(lock_path: str | Path = DVC_LOCK) -> dict:
    """dvc.lock as a mapping ({} when it does not exist yet)."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return {}
    return yaml.load(lock_path.read_text(), Loader=SafeLoader) or {}


def locked_outputs(lock_path: str | Path = DVC_LOCK) -> list[LockedOutput]:
    """Every output recorded in dvc.lock."""
    outputs = []
    for stage, entry in (read_lock(lock_path).get("stages") or {}).items():
        for out in entry.get("outs") or []:
            md5 = str(out.get("md5", ""))
            outputs.append(LockedOutput(stage, out["path"], md5.removesuffix(".dir"), md5.endswith(".dir")))
    return outputs


def dir_manifest(dir_md5: str, cache_dir: str | Path = DVC_CACHE) -> dict[str, str]:
    """relpath -> md5 for a directory output, from DVC's cached `.dir` manifest ({} if absent)."""
    manifest = Path(cache_dir) / dir_md5[:2] / f"{dir_md5[2:]}.dir"
    if not manifest.exists():
        return {}
    return {entry["relpath"]: entry["md5"] for entry in json.loads(manifest.read_text())}


def locked_md5(path: str | Path, lock_path: str | Path = DVC_LOCK) -> tuple[str, str] | None:
    """(md5, stage) that dvc.lock records for a file, also for a file inside a directory out.

    Returns None when DVC does not track the file (yet)."""
    target = Path(path).as_posix()
    for output in locked_outputs(lock_path):
        if output.path == target and not output.is_dir:
            return output.md5, output.stage
        if output.is_dir and target.startswith(output.path.rstrip("/") + "/"):
            relpath = target[len(output.path.rstrip("/")) + 1 :]
            md5 = dir_manifest(output.md5).get(relpath)
            if md5:
                return md5, output.stage
    return None


PROMOTE_STAGE = "promote"


def lock_digest(lock_path: str | Path = DVC_LOCK, exclude_stages: tuple[str, ...] = (PROMOTE_STAGE,)) -> str | None:
    """md5 naming the pipeline state dvc.lock records, without the entries of `exclude_stages`.

    The promote stage records this digest while it runs, but DVC writes promote's own entry into
    dvc.lock only after it exits: a digest of the whole file would read "changed since promotion"
    right after every promotion. So the digest covers every other stage (md5 of canonical JSON of
    the lock's schema and stages); any change to data, params or code upstream still changes it.
    """
    lock = read_lock(lock_path)
    if not lock:
        return None
    stages = {name: entry for name, entry in (lock.get("stages") or {}).items() if name not in exclude_stages}
    canonical = json.dumps({"schema": lock.get("schema"), "stages": stages}, sort_keys=True, separators=(",", ":"))
    return hashlib.md5(canonical.encode()).hexdigest()
