"""Paired statistics for decisions about models, on per-question scores, through scipy.stats.

What a decision needs and nothing more:

- `mean_bound`: a one-sided confidence bound on the mean of per-question values, by BCa bootstrap
  (`scipy.stats.bootstrap`, seeded). Applied to paired differences (candidate minus base, question
  by question) it is the paired bound that superiority and non-inferiority read.
- `proportion_bound`: an exact (Clopper-Pearson) one-sided bound on a share (`scipy.stats.binomtest`).
- `mcnemar_greater`: the exact McNemar test that a challenger is on-style on more questions than
  an incumbent (`binomtest` on the discordant pairs); no seed, no approximation.
- `required_n` / `power`: the sample size and the power of a one-sided paired design under the
  normal approximation, for a declared margin and an assumed per-question SD.

No I/O and no MLflow: callers pass arrays and get numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def mean_bound(values: Sequence[float] | np.ndarray, alpha: float, side: str, n_resamples: int, seed: int) -> float:
    """One-sided (1 - alpha) bound on the mean of `values`: side `lower` gives L with
    P(mean >= L) = 1 - alpha, side `upper` gives U with P(mean <= U) = 1 - alpha.

    BCa bootstrap with a seeded generator, so a bound is reproducible for a seed; when every value
    is the same there is nothing to resample and the bound is that value.
    """
    from scipy.stats import bootstrap

    if side not in ("lower", "upper"):
        raise ValueError(f"side must be 'lower' or 'upper', got {side!r}")
    data = np.asarray(values, dtype=float)
    data = data[np.isfinite(data)]
    if data.size == 0:
        return math.nan
    if np.ptp(data) == 0:
        return float(data[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning for near-constant data
        result = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=1 - alpha, method="BCa",
                           alternative="greater" if side == "lower" else "less", rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    bound = float(interval.low if side == "lower" else interval.high)
    if not math.isfinite(bound):  # BCa undefined (e.g. a single discordant value): fall back to percentile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bootstrap((data,), np.mean, n_resamples=n_resamples, confidence_level=1 - alpha,
                               method="percentile", alternative="greater" if side == "lower" else "less",
                               rng=np.random.default_rng(seed))
        bound = float(result.confidence_interval.low if side == "lower" else result.confidence_interval.high)
    return bound


def proportion_bound(successes: int, n: int, alpha: float, side: str) -> float:
    """Exact (Clopper-Pearson) one-sided (1 - alpha) bound on a share, in [0, 1]."""
    from scipy.stats import binomtest

    if n == 0:
        return math.nan
    alternative = "greater" if side == "lower" else "less"
    interval = binomtest(int(successes), int(n), alternative=alternative).proportion_ci(confidence_level=1 - alpha,
                                                                                        method="exact")
    return float(interval.low if side == "lower" else interval.high)


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs and the exact one-sided p-value that the challenger wins more of them."""

    challenger_only: int  # questions on-style for the challenger, not for the incumbent
    incumbent_only: int
    p_value: float


def mcnemar_greater(challenger: Sequence[bool] | np.ndarray, incumbent: Sequence[bool] | np.ndarray) -> McNemar:
    """Exact McNemar test, one-sided: is the challenger on-style more often, question by question?"""
    from scipy.stats import binomtest

    a, b = np.asarray(challenger, dtype=bool), np.asarray(incumbent, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired arrays differ in length: {a.size} vs {b.size}")
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    p_value = 1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)
    return McNemar(wins, losses, p_value)


def required_n(gap: float, sd: float, alpha: float, power: float) -> int:
    """Questions a one-sided paired test at level `alpha` needs to show, with probability `power`,
    that the mean difference clears a limit `gap` away from its true value (normal approximation)."""
    from scipy.stats import norm

    if gap <= 0:
        return math.inf  # type: ignore[return-value]
    return int(math.ceil(((norm.ppf(1 - alpha) + norm.ppf(power)) * sd / gap) ** 2))


def power(n: int, gap: float, sd: float, alpha: float) -> float:
    """Probability that the one-sided bound clears a limit `gap` away from the true mean difference."""
    from scipy.stats import norm

    if n <= 0 or sd <= 0:
        return math.nan
    return float(norm.cdf(gap * math.sqrt(n) / sd - norm.ppf(1 - alpha)))
