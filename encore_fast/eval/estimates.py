"""Intervals from an evaluation's outcome rows (:mod:`encore_fast.eval.outcomes`): what the
report prints as ``0.72 [0.69, 0.75]``.

* a share of 0/1 outcomes (ES of one rewrite prompt per fact, realistic ES, known facts
  retained): Wilson;
* a mean of per-record shares (PS, NS over several prompts): bootstrap over records;
* S, the harmonic mean of the groups' means: bootstrap over records (a record's groups resampled
  together);
* a downstream task's F1: bootstrap over its examples; a mean over tasks: stratified bootstrap
  (each task's examples resampled on their own);
* perplexity: bootstrap over windows; its ratio to the unedited model's: paired over windows.

Every value is the aggregate the evaluation line holds, computed from the rows in the same order
(so the two agree to the last bit); only the interval comes from resampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from encore_fast.eval.degradation import perplexity_of
from encore_fast.eval.downstream import f1_weighted
from encore_fast.eval.intervals import Estimate, bootstrap, mean, wilson
from encore_fast.eval.metrics import harmonic_mean
from encore_fast.eval.outcomes import Row, rows_of
from encore_fast.eval.protocol import informative_tasks, majority_levels
from encore_fast.eval.results import RunData

Rows = Sequence[Mapping[str, Any]]
Examples = dict[str, tuple[list[int], list[int]]]  # task -> (gold, predicted), example order


def _exact(est: Estimate, value: float, n: int | None = None) -> Estimate:
    """``est`` with the aggregate's own value (and ``n``)."""
    return dataclasses.replace(est, value=value, n=est.n if n is None else n)


def values(rows: Rows, metric: str, key: str) -> list[float]:
    """The values under ``key`` of ``metric``'s rows that have one, in row order."""
    return [float(r[key]) for r in rows_of(rows, metric) if r.get(key) is not None]


def share(vals: Sequence[float]) -> Estimate | None:
    """The mean of per-item values: Wilson when they are all 0/1, else a bootstrap over the
    items (None for none)."""
    if not vals:
        return None
    value = sum(vals) / len(vals)
    if all(v in (0.0, 1.0) for v in vals):
        return _exact(wilson(int(sum(vals)), len(vals)), value)
    return _exact(mean(vals), value)


def harmonic(rows: Rows, metric: str, keys: Sequence[str]) -> Estimate | None:
    """The harmonic mean of ``keys``' means over ``metric``'s records (S, real S), with a
    bootstrap over the records; keys no record has are left out, as the line leaves them."""
    present = [k for k in keys if values(rows, metric, k)]
    if not present:
        return None
    mine = rows_of(rows, metric)
    table = np.array([[np.nan if r.get(k) is None else float(r[k]) for k in present]
                      for r in mine])
    value = harmonic_mean([sum(v) / len(v) for v in (values(rows, metric, k) for k in present)])

    def statistic(idx: np.ndarray) -> float:
        cols = table[idx.astype(int)]
        means = [float(np.nanmean(c)) for c in cols.T if not np.isnan(c).all()]
        return harmonic_mean(means) if means else float("nan")

    return _exact(bootstrap([np.arange(len(mine))], statistic), value)


def examples(rows: Rows) -> Examples:
    """Per downstream task: the gold and predicted labels of its examples (row order)."""
    out: Examples = {}
    for r in rows_of(rows, "downstream"):
        gold, pred = out.setdefault(r["task"], ([], []))
        gold.append(int(r["gold"]))
        pred.append(int(r["pred"]))
    return out


def _classes(gold: Sequence[int], pred: Sequence[int]) -> int:
    """Classes enough for the labels seen (a class neither present nor predicted weighs 0 in
    the weighted F1, so this gives the task's F1)."""
    return max(max(gold), max(pred)) + 1


def f1_of_codes(codes: np.ndarray, k: int) -> float:
    """Weighted F1 of examples coded ``gold * k + pred`` (vectorised, for resampling)."""
    m = np.bincount(codes.astype(int), minlength=k * k).reshape(k, k)
    support, predicted, tp = m.sum(1), m.sum(0), np.diag(m)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float((f1 * support).sum() / support.sum())


def _codes(gold: Sequence[int], pred: Sequence[int], k: int) -> np.ndarray:
    return np.asarray(gold) * k + np.asarray(pred)


def task_f1(gold: Sequence[int], pred: Sequence[int]) -> Estimate:
    """A task's weighted F1 with a bootstrap over its examples."""
    k = _classes(gold, pred)
    est = bootstrap([_codes(gold, pred, k)], lambda c: f1_of_codes(c, k))
    return _exact(est, f1_weighted(gold, pred, k))


def mean_f1(tasks: Examples) -> Estimate | None:
    """The mean F1 over ``tasks`` with a stratified bootstrap (each task's examples resampled
    on their own); ``n``: the examples (None for no task)."""
    if not tasks:
        return None
    ks = [_classes(g, p) for g, p in tasks.values()]
    codes = [_codes(g, p, k) for (g, p), k in zip(tasks.values(), ks, strict=True)]

    def statistic(*arrays: np.ndarray) -> float:
        return float(np.mean([f1_of_codes(a, k) for a, k in zip(arrays, ks, strict=True)]))

    value = sum(f1_weighted(g, p, k) for (g, p), k in zip(tasks.values(), ks, strict=True))
    est = bootstrap(codes, statistic)
    return _exact(est, value / len(tasks), sum(len(g) for g, _ in tasks.values()))


def chance_f1(line: Mapping[str, Any], tasks: Examples) -> dict[str, float]:
    """Each task's majority-class F1: the line's (written from the scored labels), else from
    the outcome rows' gold labels."""
    down = line.get("downstream") or {}
    out = {}
    for task, (gold, pred) in tasks.items():
        written = (down.get(task) or {}).get("majority_f1")
        out[task] = written if written is not None else majority_levels(
            gold, _classes(gold, pred))["f1"]
    return out


def informative(unedited_line: Mapping[str, Any], unedited_rows: Rows) -> list[str]:
    """The downstream tasks whose unedited F1 interval lies above their majority-class F1
    (:func:`~encore_fast.eval.protocol.informative_tasks`)."""
    tasks = {t: ex for t, ex in examples(unedited_rows).items() if len(ex[0]) >= 2}
    f1s = {t: task_f1(*ex) for t, ex in tasks.items()}
    return informative_tasks(f1s, chance_f1(unedited_line, tasks))


def unedited(run: RunData) -> dict[str, Any] | None:
    """The run's evaluation of the unedited model (its first, at 0 edits), or None."""
    return run.evals[0] if run.evals and run.evals[0].get("edits_done") == 0 else None


def run_informative(run: RunData) -> list[str] | None:
    """The run's informative downstream tasks, from its unedited evaluation's outcome rows
    (None: no such rows)."""
    base = unedited(run)
    if base is None:
        return None
    if "informative" not in run.memo:
        rows = run.outcomes(base)
        found = examples(rows) if rows is not None else {}
        run.memo["informative"] = informative(base, rows or ()) if found else None
    return run.memo["informative"]


def run_informative_mean(run: RunData, line: Mapping[str, Any]) -> tuple[
        Estimate | None, float | None]:
    """The mean F1 over the run's informative tasks at ``line`` (stratified bootstrap), and
    their mean majority-class F1 (None, None: no informative task, or no rows)."""
    key = ("informative_mean", line.get("batches"))
    if key not in run.memo:
        run.memo[key] = _informative_mean(line, run_informative(run), run.outcomes(line))
    return run.memo[key]


def _informative_mean(line: Mapping[str, Any], tasks: list[str] | None,
                      rows: Rows | None) -> tuple[Estimate | None, float | None]:
    found = examples(rows) if tasks and rows is not None else {}
    chosen = {t: found[t] for t in tasks or () if t in found}
    if not chosen:
        return None, None
    chance = chance_f1(line, chosen)
    return mean_f1(chosen), sum(chance.values()) / len(chance)


def perplexity_windows(rows: Rows) -> dict[int, tuple[float, int]]:
    """Per window index: its NLL sum and token count."""
    return {int(r["window"]): (float(r["nll"]), int(r["tokens"]))
            for r in rows_of(rows, "perplexity")}


def _ppl(table: np.ndarray) -> float:
    return float(np.exp(table[:, 0].sum() / table[:, 1].sum()))


def perplexity(rows: Rows) -> Estimate | None:
    """Perplexity with a bootstrap over its windows."""
    windows = list(perplexity_windows(rows).values())
    if not windows:
        return None
    table = np.array(windows, dtype=float)
    est = bootstrap([np.arange(len(table))], lambda i: _ppl(table[i.astype(int)]))
    return _exact(est, perplexity_of(windows))


def perplexity_ratio(rows: Rows, unedited_rows: Rows) -> Estimate | None:
    """Perplexity over the unedited model's, paired over the windows both scored."""
    now, base = perplexity_windows(rows), perplexity_windows(unedited_rows)
    common = sorted(set(now) & set(base))
    if not common:
        return None
    a = np.array([now[w] for w in common], dtype=float)
    b = np.array([base[w] for w in common], dtype=float)
    est = bootstrap([np.arange(len(common))],
                    lambda i: _ppl(a[i.astype(int)]) / _ppl(b[i.astype(int)]))
    value = perplexity_of([now[w] for w in common]) / perplexity_of([base[w] for w in common])
    return _exact(est, value)


def known(rows: Rows) -> tuple[Estimate | None, Estimate | None]:
    """Known-fact accuracy, and the share of the facts the unedited model knew that are still
    known (both Wilson)."""
    facts = rows_of(rows, "known_facts")
    acc = share([float(bool(r["correct"])) for r in facts])
    kept = share([float(bool(r["correct"])) for r in facts if r.get("known_before")])
    return acc, kept


def pooled(row_lists: Sequence[Sequence[Row]], metric: str, key: str) -> Estimate | None:
    """One share over the rows of several files (e.g. every batch's immediate ES)."""
    return share([v for rows in row_lists for v in values(rows, metric, key)])
