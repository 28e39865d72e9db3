"""Reading finished (or running) runs back, and summing them up in tables.

The summary of a run is what the method comparison reports: its columns are those of the
registered metrics (:mod:`encore_fast.eval.registry`), in their order -- final edit metrics,
perplexity and known-fact accuracy before/after, final norm growth, editing time per edit, ...

Where the run wrote outcome files (:mod:`encore_fast.eval.outcomes`) a number comes with its
interval (a :class:`~encore_fast.eval.intervals.Measure`: a float that the markdown table prints
as ``0.72 [0.69, 0.75] n=300`` and the CSV table as the value with ``_low``, ``_high`` and
``_n`` columns), and the summary names where the study's collapse rule says the run collapsed
(:mod:`encore_fast.eval.collapse`). Runs without them keep their plain numbers. Two runs are
compared fact by fact in :mod:`encore_fast.eval.compare`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from encore_fast.eval.collapse import judged, run_collapse
from encore_fast.eval.intervals import Measure
from encore_fast.eval.registry import registered
from encore_fast.eval.results import RunData, load_run

__all__ = ["RunData", "csv_table", "load_run", "markdown_table", "summarize_run"]


def summarize_run(run: RunData) -> dict[str, Any]:
    """The run's label and edits, then each registered metric's summary columns (e.g. final
    edit metrics, degradation before/after, final norm growth, seconds per edit)."""
    last = run.evals[-1] if run.evals else {}
    out: dict[str, Any] = {"run": run.label, "edits": last.get("edits_done", 0)}
    for metric in registered():
        out.update(metric.summary(run))
    if run.outcome_files and judged(run):
        found = run_collapse(run)
        out["collapse"] = str(found) if found is not None else "none"
    return out


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Measure):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub markdown table of summary rows (union of their keys as columns)."""
    cols = _columns(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in rows]
    return "\n".join(out) + "\n"


def csv_table(rows: Sequence[dict[str, Any]]) -> str:
    """The same rows as CSV (full precision; a value with an interval adds ``<column>_low``,
    ``_high`` and ``_n`` columns after its own)."""
    flat = [_flat(row) for row in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(flat), lineterminator="\n")
    writer.writeheader()
    for row in flat:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row with each value that has an interval as four plain columns."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, Measure):
            est = value.estimate
            out.update({key: float(value), f"{key}_low": est.low, f"{key}_high": est.high,
                        f"{key}_n": est.n})
        else:
            out[key] = value
    return out
