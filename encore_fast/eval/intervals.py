"""How sure a number is: Wilson intervals for proportions, a seeded percentile bootstrap for
everything else (paired where two sides share facts or examples), and Holm's correction.

A study table cell is an :class:`Estimate` printed as ``0.72 [0.69, 0.75]``; a comparison is
the paired interval of ``A - B``, and "A beats B" only when that interval excludes 0 (after
Holm's correction when several comparisons are read together). SciPy computes the intervals;
:func:`provenance` records its version and the seed beside the results. SciPy is an optional
dependency (extra ``eval``): it is imported when an interval is computed, so that the rest of the
evaluation (and the command line, which imports it) works without it.

In a summary table an estimate is a :class:`Measure`: a float (the value itself, so code that
reads the summary as numbers goes on working) that prints with its interval and ``n``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval and the number of facts or examples behind it."""

    value: float
    low: float
    high: float
    n: int
    method: str  # "wilson", "bootstrap" or "bootstrap-paired"

    def __str__(self) -> str:
        return self.format()

    def format(self, digits: int = 2, signed: bool = False) -> str:
        """``0.72 [0.69, 0.75]`` (``signed``: ``+0.05 [+0.02, +0.08]``, for differences)."""
        f = f"{{:{'+' if signed else ''}.{digits}f}}"
        return f"{f.format(self.value)} [{f.format(self.low)}, {f.format(self.high)}]"

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval."""
        return not self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def number(self) -> Measure:
        """The value as a float that carries this estimate (a summary table's cell)."""
        return Measure(self)


class Measure(float):
    """A float equal to an estimate's value, printed as ``0.72 [0.69, 0.75] n=300`` (a table
    cell); ``estimate`` holds the interval."""

    estimate: Estimate

    def __new__(cls, estimate: Estimate) -> Measure:
        self = super().__new__(cls, estimate.value)
        self.estimate = estimate
        return self

    def __str__(self) -> str:
        return f"{self.estimate} n={self.estimate.n}"

    def __reduce__(self) -> Any:  # (copies and pickles keep the estimate)
        return (Measure, (self.estimate,))


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """The proportion ``successes / n`` with its Wilson score interval."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n and n > 0, got {successes}/{n}")
    from scipy import stats

    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return Estimate(successes / n, float(ci.low), float(ci.high), int(n), "wilson")


def proportion(outcomes: Sequence[bool | int | float]) -> Estimate:
    """Wilson interval of a list of 0/1 outcomes (one per fact or example)."""
    values = np.asarray(outcomes, dtype=float)
    if values.size and not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("proportion: outcomes must be 0/1")
    return wilson(int(values.sum()), int(values.size))


def bootstrap(samples: Sequence[Sequence[float]], statistic: Callable[..., float], *,
              paired: bool = False, resamples: int = RESAMPLES, seed: int = SEED,
              confidence: float = CONFIDENCE) -> Estimate:
    """``statistic(*samples)`` with a percentile bootstrap interval.

    ``paired``: the samples are aligned (entry i of each is the same fact or example), so they
    are resampled together; otherwise each one on its own (e.g. the tasks of a downstream mean).
    """
    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = min(a.size for a in arrays)
    value = float(statistic(*arrays))
    if n < 2:
        return Estimate(value, float("nan"), float("nan"), n, "bootstrap")
    from scipy import stats

    res = stats.bootstrap(arrays, statistic, paired=paired, vectorized=False,
                          n_resamples=resamples, confidence_level=confidence,
                          method="percentile", rng=np.random.default_rng(seed))
    low, high = (float(x) for x in res.confidence_interval)
    return Estimate(value, low, high, n, "bootstrap-paired" if paired else "bootstrap")


def mean(values: Sequence[float], **kw: Any) -> Estimate:
    """The mean of per-fact (or per-example) values, bootstrapped."""
    return bootstrap([values], np.mean, **kw)


def paired_difference(a: Sequence[float], b: Sequence[float],
                      statistic: Callable[[np.ndarray], float] = np.mean,
                      **kw: Any) -> Estimate:
    """``statistic(a) - statistic(b)`` over the same facts, with a paired bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} values; pairs need the same "
                         "facts on both sides")
    return bootstrap([a, b], lambda x, y: statistic(x) - statistic(y), paired=True, **kw)


def bootstrap_pvalue(a: Sequence[float], b: Sequence[float],
                     statistic: Callable[[np.ndarray], float] = np.mean, *,
                     resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of ``statistic(a) - statistic(b) = 0`` from the paired bootstrap
    distribution (twice the smaller tail beyond 0; at least ``1 / (resamples + 1)``)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size != y.size or x.size < 2:
        raise ValueError("bootstrap_pvalue: needs two aligned samples of at least 2 values")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    return two_sided([statistic(x[i]) - statistic(y[i]) for i in idx])


def stratified_pvalue(sizes: Sequence[int], difference: Callable[[list[np.ndarray]], float],
                      *, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of ``difference = 0``, where ``difference`` reads one array of item
    indices per stratum (e.g. the examples of each downstream task): each resample draws every
    stratum's indices on its own, and both sides of a pair are read at the same indices."""
    if not sizes or min(sizes) < 2:
        raise ValueError("stratified_pvalue: every stratum needs at least 2 items")
    rng = np.random.default_rng(seed)
    return two_sided([difference([rng.integers(0, n, n) for n in sizes])
                      for _ in range(resamples)])


def two_sided(diffs: Sequence[float]) -> float:
    """The p-value of 0 from a bootstrap distribution of differences: twice the smaller tail
    beyond 0, at least ``1 / (resamples + 1)``."""
    d = np.asarray(diffs, dtype=float)
    tail = min((d <= 0).sum(), (d >= 0).sum())
    return float(min(1.0, max(2 * tail, 1) / (d.size + 1)))


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which of the comparisons are significant at family-wise
    level ``alpha`` (in the order given)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    verdict = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        verdict[i] = True
    return verdict


def provenance(seed: int = SEED, resamples: int = RESAMPLES) -> dict[str, Any]:
    """What the intervals were computed with (stored beside the results)."""
    return {"scipy": importlib.metadata.version("scipy"), "numpy": np.__version__, "seed": seed,
            "resamples": resamples, "confidence": CONFIDENCE, "bootstrap": "percentile",
            "proportions": "wilson"}
