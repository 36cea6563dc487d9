"""pipeline.core.textmetrics against references: Flesch worked by hand from the published formula,
cosine against plain numpy, and the near-duplicate index against a brute-force loop."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.core.assets import ensure_nltk_cmudict
from pipeline.core.config import EmbeddingsConfig
from pipeline.core.textmetrics import (
    NearDuplicateIndex,
    cosine_matrix,
    cosine_similarity,
    flesch_reading_ease,
    flesch_reading_ease_batch,
    load_embedder,
)
from tests.conftest import REPO_ROOT


def published_flesch(words: int, sentences: int, syllables: int) -> float:
    """Flesch (1948): 206.835 - 1.015 * words/sentence - 84.6 * syllables/word."""
    return 206.835 - 1.015 * (words / sentences) - 84.6 * (syllables / words)


# Counted by hand; syllables follow the CMU dictionary, which textstat uses.
HAND_WORKED = [
    # the(1) cat(1) sat(1) on(1) the(1) mat(1): 6 words, 1 sentence, 6 syllables -> 116.145
    ("The cat sat on the mat.", 6, 1, 6),
    # 6 words/6 syllables + it(1) was(1) a(1) sun-ny(2) day(1) and(1) ev-ery-thing(3) was(1)
    # won-der-ful(3): 9 words/14 syllables -> 15 words, 2 sentences, 20 syllables -> 86.4225
    ("The cat sat on the mat. It was a sunny day and everything was wonderful.", 15, 2, 20),
    # pho-to-syn-the-sis(5) con-verts(2) sun-light(2) in-to(2) chem-i-cal(3) en-er-gy(3):
    # 6 words, 1 sentence, 17 syllables -> -38.955 (Flesch is not bounded below)
    ("Photosynthesis converts sunlight into chemical energy.", 6, 1, 17),
    # do(1) you(1) like(1) tea(1): 4 words, 1 sentence, 4 syllables -> 118.175
    ("Do you like tea?", 4, 1, 4),
]


@pytest.mark.parametrize(("text", "words", "sentences", "syllables"), HAND_WORKED)
def test_flesch_matches_the_published_formula_worked_by_hand(text, words, sentences, syllables):
    ensure_nltk_cmudict()  # textstat used directly would otherwise try to download cmudict
    import textstat

    # The hand counts are the ones textstat uses (so a disagreement below is the formula's).
    assert textstat.lexicon_count(text) == words
    assert textstat.sentence_count(text) == sentences
    assert textstat.syllable_count(text) == syllables
    assert flesch_reading_ease(text) == pytest.approx(published_flesch(words, sentences, syllables), abs=1e-9)


def test_hand_worked_values():
    """The numbers in the comments above, so the reference itself is checked."""
    assert published_flesch(6, 1, 6) == pytest.approx(116.145)
    assert published_flesch(15, 2, 20) == pytest.approx(86.4225)
    assert published_flesch(6, 1, 17) == pytest.approx(-38.955)


def test_flesch_batch_matches_single_and_keeps_order():
    texts = [text for text, *_ in HAND_WORKED] + [""]
    scores = flesch_reading_ease_batch(iter(texts))  # any iterable, e.g. a generator
    assert scores.dtype == np.float64 and scores.shape == (len(texts),)
    assert scores.tolist() == [flesch_reading_ease(text) for text in texts]
    assert scores[-1] == 0.0  # textstat's value for an empty text
    assert flesch_reading_ease_batch([]).shape == (0,)


def test_flesch_works_offline_from_the_project_cmudict(tmp_path):
    """A fresh process with no NLTK data of its own must not try to download cmudict."""
    probe = (
        "import sys\n"
        "from pipeline.core.textmetrics import flesch_reading_ease\n"
        "print(flesch_reading_ease('Do you like tea?'))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NLTK_DATA": str(tmp_path / "empty")}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(118.175)


def test_importing_textmetrics_stays_light():
    probe = (
        "import sys, pipeline.core.textmetrics\n"
        "print([m for m in ('textstat', 'torch', 'sentence_transformers', 'nltk') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# --------------------------------------------------------------------------- cosine


def test_cosine_similarity_is_rowwise_and_normalises_defensively():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    expected = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b, strict=True)])
    np.testing.assert_allclose(cosine_similarity(a, b), expected, atol=1e-6)
    np.testing.assert_allclose(cosine_similarity(3.0 * a, 0.5 * b), expected, atol=1e-6)
    assert cosine_similarity(a, b).shape == (5,)
    np.testing.assert_allclose(cosine_similarity(a, a), np.ones(5), atol=1e-6)
    with pytest.raises(ValueError, match="paired rows"):
        cosine_similarity(a, b[:3])


def test_cosine_matrix_matches_numpy_and_zero_rows_score_zero():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    result = cosine_matrix(a, b)
    assert result.shape == (4, 3)
    np.testing.assert_allclose(result, expected, atol=1e-6)
    with_zero = np.vstack([a, np.zeros(6)])
    assert np.all(cosine_matrix(with_zero, b)[-1] == 0.0)


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(EmbeddingsConfig())


def test_embedder_returns_unit_float32_rows(embedder):
    questions = ["What is the capital of France?", "Which city is France's capital?", "How do bees make honey?"]
    vectors = embedder.encode(questions)
    assert embedder.dim == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = cosine_matrix(vectors, vectors)
    assert similarity[0, 1] > 0.8 > similarity[0, 2], similarity  # paraphrase vs unrelated
    assert embedder.encode([]).shape == (0, 384)


def test_embedder_is_cached_and_batching_does_not_change_vectors(embedder):
    assert load_embedder(EmbeddingsConfig()) is embedder
    other_batch = load_embedder(EmbeddingsConfig(batch_size=2))
    assert other_batch.batch_size == 2 and other_batch._model is embedder._model  # one model in memory
    texts = [f"Question number {i} about the history of Rome?" for i in range(5)]
    together = embedder.encode(texts)
    one_by_one = np.vstack([embedder.encode([text]) for text in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    np.testing.assert_allclose(other_batch.encode(texts), together, atol=1e-5)


def test_progress_bar_only_for_long_inputs(embedder, capfd):
    embedder.encode(["a short question?"] * 3)
    assert "Batches" not in capfd.readouterr().err
    embedder.encode(["a short question?"] * 3, show_progress=True)
    assert "Batches" in capfd.readouterr().err
    embedder.encode([f"q{i}" for i in range(500)])
    assert "Batches" in capfd.readouterr().err


# --------------------------------------------------------------------------- dedup


def brute_force_dedup(vectors: np.ndarray, threshold: float):
    """Reference: walk the rows in order, compare each with every row accepted before it."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors.astype(np.float64) / np.maximum(norms, 1e-12)
    kept: list[int] = []
    accepted, nearest, similarity = [], [], []
    for row in range(len(unit)):
        best, best_at = -1.0, -1
        if kept:
            cosines = unit[kept] @ unit[row]
            best_at = int(np.argmax(cosines))  # the first one on ties
            best = float(cosines[best_at])
        is_kept = best_at == -1 or not best > threshold
        accepted.append(is_kept)
        nearest.append(best_at)
        similarity.append(best)
        if is_kept:
            kept.append(row)
    return np.array(accepted, bool), np.array(nearest, int), np.array(similarity), unit[kept]


def add_in_batches(vectors: np.ndarray, threshold: float, cuts: list[int]) -> tuple[NearDuplicateIndex, list]:
    """Feed `vectors` to a fresh index, split at `cuts`; return the index and per-batch results."""
    index = NearDuplicateIndex(vectors.shape[1], threshold)
    bounds = [0, *sorted(set(cuts)), len(vectors)]
    results = [index.add(vectors[start:stop]) for start, stop in itertools.pairwise(bounds)]
    return index, results


def concatenated(results, field: str) -> np.ndarray:
    return np.concatenate([getattr(result, field) for result in results])


@st.composite
def dedup_problems(draw):
    """Random vectors with planted (scaled) exact duplicates, a threshold, two batch splits."""
    n = draw(st.integers(0, 70))
    dim = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    for row in range(1, n):
        if rng.random() < 0.15:  # a near-copy of an earlier row, as LLM outputs repeat themselves
            vectors[row] = vectors[rng.integers(0, row)] * np.float32(rng.uniform(0.5, 2.0))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.95]))
    cuts_a = draw(st.lists(st.integers(0, n), max_size=6))
    cuts_b = draw(st.lists(st.integers(0, n), max_size=6))
    return vectors, threshold, cuts_a, cuts_b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(dedup_problems())
def test_dedup_matches_brute_force_for_any_batch_split(problem):
    vectors, threshold, cuts_a, cuts_b = problem
    accepted, nearest, similarity, kept_vectors = brute_force_dedup(vectors, threshold)
    # A cosine within float32 rounding of the threshold could go either way; skip those draws.
    if len(vectors):
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        gram = unit.astype(np.float64) @ unit.T.astype(np.float64)
        assume(np.all(np.abs(gram[np.triu_indices(len(vectors), 1)] - threshold) > 1e-5))

    index_a, results_a = add_in_batches(vectors, threshold, cuts_a)
    index_b, results_b = add_in_batches(vectors, threshold, cuts_b)

    for index, results in ((index_a, results_a), (index_b, results_b)):
        np.testing.assert_array_equal(concatenated(results, "accepted"), accepted)
        np.testing.assert_array_equal(concatenated(results, "nearest"), nearest)
        np.testing.assert_allclose(concatenated(results, "similarity"), similarity, atol=1e-5)
        assert len(index) == int(accepted.sum())
        np.testing.assert_allclose(index.vectors, kept_vectors.reshape(-1, vectors.shape[1]), atol=1e-6)
    np.testing.assert_array_equal(index_a.vectors, index_b.vectors)


def test_rejection_is_strictly_greater_than_threshold():
    """The paper drops a text only when its cosine EXCEEDS the threshold; equal is kept.
    These cosines are exact in float32: 0 for orthogonal unit vectors, 1 for identical ones."""
    orthogonal = NearDuplicateIndex(dim=2, threshold=0.0).add(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert orthogonal.accepted.tolist() == [True, True]
    identical = NearDuplicateIndex(dim=2, threshold=1.0).add(np.array([[1.0, 0.0], [2.0, 0.0]]))
    assert identical.accepted.tolist() == [True, True]
    duplicate = NearDuplicateIndex(dim=2, threshold=0.99).add(np.array([[1.0, 0.0], [2.0, 0.0]]))
    assert duplicate.accepted.tolist() == [True, False]
    assert duplicate.nearest.tolist() == [-1, 0]
    assert duplicate.similarity.tolist() == pytest.approx([-1.0, 1.0])


def test_in_batch_duplicates_are_caught_and_rejected_rows_are_not_stored():
    index = NearDuplicateIndex(dim=3, threshold=0.8)
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    first = index.add(np.vstack([a, a, b]))  # second row duplicates the first, same batch
    assert first.accepted.tolist() == [True, False, True]
    assert first.nearest.tolist() == [-1, 0, 0]
    second = index.add(np.vstack([b * 3, np.array([0.0, 0.0, 1.0])]))
    assert second.accepted.tolist() == [False, True]
    assert second.nearest.tolist() == [1, 0]  # b was the 2nd vector accepted
    assert len(index) == 3
    np.testing.assert_allclose(index.vectors, np.eye(3)[[0, 1, 2]])


def test_index_grows_past_its_initial_capacity_and_chunks_large_batches():
    """3,000 vectors in one add (3 chunks) and then 64-row batches: storage doubles twice."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(3_000, 48)).astype(np.float32)
    accepted, nearest, _, kept = brute_force_dedup(vectors, 0.5)
    index = NearDuplicateIndex(dim=48, threshold=0.5)
    result = index.add(vectors)
    np.testing.assert_array_equal(result.accepted, accepted)
    np.testing.assert_array_equal(result.nearest, nearest)
    assert len(index) == int(accepted.sum()) > 2_048
    np.testing.assert_allclose(index.vectors, kept, atol=1e-6)
    more = rng.normal(size=(128, 48)).astype(np.float32)
    for start in range(0, 128, 64):
        index.add(more[start : start + 64])
    assert len(index) >= int(accepted.sum())


def test_empty_add_and_bad_input():
    index = NearDuplicateIndex(dim=4, threshold=0.8)
    empty = index.add(np.zeros((0, 4), np.float32))
    assert empty.accepted.shape == empty.nearest.shape == empty.similarity.shape == (0,)
    assert len(index) == 0 and index.vectors.shape == (0, 4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        index.add(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicateIndex(dim=4, threshold=1.5)
    with pytest.raises(ValueError, match="dim"):
        NearDuplicateIndex(dim=0, threshold=0.5)


def test_stored_vectors_cannot_be_modified_through_the_view():
    index = NearDuplicateIndex(dim=2, threshold=0.5)
    index.add(np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError):
        index.vectors[0, 0] = 5.0


# A greedy decoding loop as the demo's bf16 adapter produced it (issue: "six times"), and a clean answer.
LOOPING_ANSWER = "Ibn Rushd studied medicine. " + "He was also a teacher of the school of Sharia, which is the Islamic law. " * 6
CLEAN_ANSWER = ("The sky looks blue because air scatters short blue light waves more than red ones, "
                "so blue light reaches your eyes from every part of the sky.")


def test_repeated_ngram_rate_counts_a_loop_and_not_clean_prose():
    from pipeline.core.textmetrics import ngram_words, repeated_ngram_rate

    words = ngram_words(LOOPING_ANSWER)
    sentence = len(ngram_words("He was also a teacher of the school of Sharia, which is the Islamic law."))
    assert len(words) == 4 + 6 * sentence
    # n-grams: len(words) - 3. New ones: the 4 lead-in words' grams, then one pass of the sentence
    # (its grams, plus the 3 that wrap into the next repeat); every other gram repeats one of those.
    total = len(words) - 3
    new = 4 + sentence
    assert repeated_ngram_rate(LOOPING_ANSWER) == pytest.approx((total - new) / total)
    assert repeated_ngram_rate(LOOPING_ANSWER) > 0.7
    assert repeated_ngram_rate(CLEAN_ANSWER) == 0.0
    # case and punctuation do not make a repeat look new; fewer than n words have no n-grams
    assert repeated_ngram_rate("Yes, I can. yes I can!", n=3) == pytest.approx(1 / 4)  # 4 grams, the last repeats the first
    assert repeated_ngram_rate("one two three", n=4) == 0.0 and repeated_ngram_rate("", n=4) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        repeated_ngram_rate("a b", n=0)
