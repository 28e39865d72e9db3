"""Two runs compared fact by fact: ``A − B = +0.05 [+0.02, +0.08]`` on the study's primary
endpoints, with bootstrap p-values and Holm's correction over the whole family.

Both runs must have scored the same items at an edit count (the study's nested sample of edited
facts is the same for every method, and so are the downstream examples): the difference is then
bootstrapped paired -- the same facts (or examples) drawn for both sides -- which is what makes
a few points of difference readable. The primary endpoints (:data:`ENDPOINTS`):

* ``s``: S, the harmonic mean of ES, PS and NS (resampled over the facts);
* ``real_s``: the harmonic mean of real_es, real_ps and real_ns where present (over the facts);
* ``informative_f1``: the mean F1 over the downstream tasks informative in both runs' unedited
  evaluations (each task's examples resampled on their own, both runs at the same examples).

A verdict ("A > B") is given only where Holm's step-down correction over every comparison of the
table (endpoints x edit counts) keeps it significant at ``alpha``. :func:`write_comparison` writes
the markdown table with :func:`~encore_fast.eval.intervals.provenance` (SciPy's version, seed,
resamples) beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encore_fast.eval import estimates
from encore_fast.eval.intervals import (
    RESAMPLES,
    SEED,
    Estimate,
    bootstrap,
    holm,
    provenance,
    stratified_pvalue,
)
from encore_fast.eval.metrics import harmonic_mean
from encore_fast.eval.outcomes import rows_of
from encore_fast.eval.results import RunData
from encore_fast.io import atomic_write_text

ENDPOINTS = ("s", "real_s", "informative_f1")
NAMES = {"s": "S", "real_s": "real S", "informative_f1": "informative downstream mean F1"}
GROUPS = {"s": ("counterfact", ("es", "ps", "ns")),
          "real_s": ("realistic", ("real_es", "real_ps", "real_ns"))}
Difference = Callable[[list[np.ndarray]], float]  # index arrays, one per stratum -> A - B


@dataclass(frozen=True)
class Comparison:
    """One endpoint of two runs at one edit count."""

    endpoint: str
    edits: int
    a: Estimate
    b: Estimate
    difference: Estimate  # A - B, paired bootstrap
    p: float  # two-sided bootstrap p-value of A - B = 0
    significant: bool = False  # after Holm's correction over the table

    def verdict(self, a: str = "A", b: str = "B") -> str:
        """``A > B``, ``A < B`` or ``no difference`` (Holm-corrected)."""
        if not self.significant:
            return "no difference"
        return f"{a} > {b}" if self.difference.value > 0 else f"{a} < {b}"

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "edits": self.edits, "a": self.a.to_dict(),
                "b": self.b.to_dict(), "difference": self.difference.to_dict(), "p": self.p,
                "significant": self.significant}


class NotPaired(ValueError):
    """Two evaluations that did not score the same facts or examples."""


def _paired(sizes: Sequence[int], difference: Difference, value: float, n: int,
            resamples: int, seed: int) -> tuple[Estimate, float]:
    """The paired interval and p-value of a difference read at resampled indices."""
    est = bootstrap([np.arange(k) for k in sizes],
                    lambda *idx: difference([i.astype(int) for i in idx]),
                    resamples=resamples, seed=seed)
    p = stratified_pvalue(sizes, difference, resamples=resamples, seed=seed)
    return dataclasses.replace(est, value=value, n=n, method="bootstrap-paired"), p


def _record_table(rows: Sequence[Mapping[str, Any]], metric: str,
                  keys: Sequence[str]) -> dict[int, list[float]]:
    """Per scored record (stream position): its values of ``keys`` (NaN: none)."""
    return {int(r["record"]): [np.nan if r.get(k) is None else float(r[k]) for k in keys]
            for r in rows_of(rows, metric)}


def _harmonic_of(table: np.ndarray) -> float:
    means = [float(np.nanmean(c)) for c in table.T if not np.isnan(c).all()]
    return harmonic_mean(means) if means else float("nan")


def compare_harmonic(endpoint: str, rows_a: Sequence[Mapping[str, Any]],
                     rows_b: Sequence[Mapping[str, Any]], edits: int, *,
                     resamples: int = RESAMPLES, seed: int = SEED) -> Comparison | None:
    """S or real S of two evaluations, paired over their facts (None: a side has no rows)."""
    metric, keys = GROUPS[endpoint]
    a, b = _record_table(rows_a, metric, keys), _record_table(rows_b, metric, keys)
    est_a, est_b = (estimates.harmonic(r, metric, keys) for r in (rows_a, rows_b))
    if est_a is None or est_b is None:
        return None
    if set(a) != set(b):
        raise NotPaired(f"{endpoint} at {edits} edits: the runs scored different facts "
                        f"({len(set(a) ^ set(b))} differ)")
    order = sorted(a)
    ta, tb = np.array([a[r] for r in order]), np.array([b[r] for r in order])
    diff, p = _paired([len(order)], lambda idx: _harmonic_of(ta[idx[0]]) -
                      _harmonic_of(tb[idx[0]]), est_a.value - est_b.value, len(order),
                      resamples, seed)
    return Comparison(endpoint, edits, est_a, est_b, diff, p)


def _f1s(codes: np.ndarray, k: int) -> tuple[float, float]:
    """Weighted F1 of both sides of examples coded ``(gold * k + a) * k + b``."""
    gold, a, b = codes // (k * k), codes // k % k, codes % k
    return (estimates.f1_of_codes(gold * k + a, k), estimates.f1_of_codes(gold * k + b, k))


def compare_downstream(tasks: Sequence[str], rows_a: Sequence[Mapping[str, Any]],
                       rows_b: Sequence[Mapping[str, Any]], edits: int, *,
                       resamples: int = RESAMPLES, seed: int = SEED) -> Comparison | None:
    """The mean F1 over ``tasks`` of two evaluations, paired over each task's examples and
    stratified by task (None: no such task in both)."""
    ex_a, ex_b = estimates.examples(rows_a), estimates.examples(rows_b)
    chosen = [t for t in tasks if t in ex_a and t in ex_b]
    if not chosen:
        return None
    codes, ks = [], []
    for t in chosen:
        (gold, pa), (gold_b, pb) = ex_a[t], ex_b[t]
        if gold != gold_b:
            raise NotPaired(f"downstream task {t} at {edits} edits: different examples")
        k = max(max(gold), max(pa), max(pb)) + 1
        codes.append((np.asarray(gold) * k + np.asarray(pa)) * k + np.asarray(pb))
        ks.append(k)
    est_a = estimates.mean_f1({t: ex_a[t] for t in chosen})
    est_b = estimates.mean_f1({t: ex_b[t] for t in chosen})
    assert est_a is not None and est_b is not None

    def difference(idx: list[np.ndarray]) -> float:
        pairs = [_f1s(c[i], k) for c, i, k in zip(codes, idx, ks, strict=True)]
        return float(np.mean([x for x, _ in pairs]) - np.mean([y for _, y in pairs]))

    diff, p = _paired([len(c) for c in codes], difference, est_a.value - est_b.value,
                      est_a.n, resamples, seed)
    return Comparison("informative_f1", edits, est_a, est_b, diff, p)


def _line_at(run: RunData, edits: int) -> dict[str, Any] | None:
    return next((line for line in run.evals if line["edits_done"] == edits), None)


def common_edits(a: RunData, b: RunData) -> list[int]:
    """The edit counts (after 0) at which both runs have an evaluation with outcome rows."""
    def counts(run: RunData) -> set[int]:
        return {line["edits_done"] for line in run.evals
                if line["edits_done"] and run.outcomes(line) is not None}
    return sorted(counts(a) & counts(b))


def compare_runs(a: RunData, b: RunData, edits: Sequence[int] | None = None,
                 endpoints: Sequence[str] = ENDPOINTS, *, alpha: float = 0.05,
                 resamples: int = RESAMPLES, seed: int = SEED) -> list[Comparison]:
    """Every endpoint of ``a`` against ``b`` at each edit count (default: all both evaluated
    with outcome rows), with Holm's verdicts over them all. An endpoint a run lacks rows for is
    left out; runs that scored different items raise :class:`NotPaired`."""
    tasks = sorted(set(estimates.run_informative(a) or ()) &
                   set(estimates.run_informative(b) or ()))
    found: list[Comparison] = []
    for count in edits if edits is not None else common_edits(a, b):
        la, lb = _line_at(a, count), _line_at(b, count)
        ra = a.outcomes(la) if la is not None else None
        rb = b.outcomes(lb) if lb is not None else None
        if ra is None or rb is None:
            continue
        for endpoint in endpoints:
            kw = {"resamples": resamples, "seed": seed}
            got = compare_downstream(tasks, ra, rb, count, **kw) \
                if endpoint == "informative_f1" else compare_harmonic(endpoint, ra, rb, count,
                                                                      **kw)
            if got is not None:
                found.append(got)
    verdicts = holm([c.p for c in found], alpha)
    return [dataclasses.replace(c, significant=v) for c, v in zip(found, verdicts, strict=True)]


def holm_jointly(tables: Sequence[Sequence[Comparison]], alpha: float = 0.05
                 ) -> list[list[Comparison]]:
    """The tables with Holm's verdicts taken over all their comparisons together (one family:
    e.g. a base method against each other method, every endpoint and edit count)."""
    flat = [c for table in tables for c in table]
    verdicts = iter(holm([c.p for c in flat], alpha))
    return [[dataclasses.replace(c, significant=next(verdicts)) for c in table]
            for table in tables]


def comparison_table(comparisons: Sequence[Comparison], a: str = "A", b: str = "B") -> str:
    """A markdown table: endpoint, edits, both runs, ``A − B`` with its interval, p, verdict."""
    out = [f"| endpoint | edits | {a} | {b} | {a} − {b} | p | Holm |", "|" + "---|" * 7]
    for c in comparisons:
        out.append(f"| {NAMES.get(c.endpoint, c.endpoint)} | {c.edits} | {c.a} n={c.a.n} | "
                   f"{c.b} n={c.b.n} | {c.difference.format(signed=True)} | {c.p:.3g} | "
                   f"{c.verdict(a, b)} |")
    return "\n".join(out) + "\n"


def write_comparison(path: str | os.PathLike[str], comparisons: Sequence[Comparison],
                     a: str = "A", b: str = "B", *, alpha: float = 0.05,
                     resamples: int = RESAMPLES, seed: int = SEED,
                     family: int | None = None) -> Path:
    """Write the markdown table with what the intervals were computed with below it, and the
    same as JSON beside it (``<path>.json``). ``family``: how many comparisons Holm's
    correction was taken over (default: this table's)."""
    path = Path(path)
    family = len(comparisons) if family is None else family
    prov = {**provenance(seed, resamples), "alpha": alpha, "correction": "holm",
            "comparisons": family}
    scope = "" if family == len(comparisons) else f" (this table's {len(comparisons)} and " \
        "the other tables' of the same report)"
    text = comparison_table(comparisons, a, b) + "\n" + (
        f"Paired percentile bootstrap ({prov['resamples']} resamples, seed {prov['seed']}, "
        f"SciPy {prov['scipy']}); Holm over {family} comparisons{scope} at "
        f"alpha {alpha}.\n")
    atomic_write_text(path, text)
    atomic_write_text(path.with_name(path.name + ".json"), json.dumps(
        {"a": a, "b": b, "provenance": prov,
         "comparisons": [c.to_dict() for c in comparisons]}, indent=2))
    return path
