"""Reading finished (or running) runs back, and summing them up in tables.

The summary of a run is what the method comparison reports: its columns are those of the
registered metrics (:mod:`encore_fast.eval.registry`), in their order -- final edit metrics,
perplexity and known-fact accuracy before/after, final norm growth, editing time per edit, ...
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

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
    return out


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
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
    """The same rows as CSV (full precision)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()
