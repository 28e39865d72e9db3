"""Reading finished (or running) runs back, and summing them up in tables.

The summary of a run is what the method comparison reports: final edit metrics, perplexity
and known-fact accuracy before/after, final norm growth and editing time per edit.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encore_fast.eval.results import CONFIG_FILE, EVALS_FILE, RESULTS_FILE, read_results

# Edit metrics in display order (CounterFact, then zsRE).
METRIC_KEYS = ("es", "ps", "ns", "s", "real_es", "real_ps", "real_ns", "ge", "rewrite_acc",
               "paraphrase_acc", "neighborhood_acc")


@dataclass
class RunData:
    """One run folder: its config, batch lines and evaluation lines."""

    label: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def original_norms(self) -> dict[int, float]:
        """Edited matrices' norms before any edit (the evaluation at 0 edits)."""
        for line in self.evals:
            if line.get("edits_done") == 0 and line.get("weight_norms"):
                return _int_keys(line["weight_norms"])
        return {}

    def norm_series(self) -> tuple[list[int], dict[int, list[float]]]:
        """Edits done, and per layer ``||W||/||W_0||`` after each batch (0 edits included)."""
        original = self.original_norms()
        points = [(0, original)] if original else []
        points += [
            (b["edits_done"], _int_keys(b["weight_norms"]))
            for b in self.batches
            if b.get("weight_norms")
        ]
        edits = [e for e, _ in points]
        ratios = {
            layer: [norms.get(layer, float("nan")) / w0 for _, norms in points]
            for layer, w0 in sorted(original.items())
        }
        return edits, ratios


def load_run(path: str | os.PathLike[str], label: str | None = None) -> RunData:
    """Read a run folder written by :func:`encore_fast.eval.run.run_sequential`."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    lines = read_results(path / RESULTS_FILE)
    deferred = [x for x in read_results(path / EVALS_FILE) if x.get("type") == "eval"]
    later = {x["batches"] for x in deferred}  # (a snapshot's later evaluation wins)
    evals = [x for x in lines if x.get("type") == "eval" and x["batches"] not in later]
    evals = sorted(evals + deferred, key=lambda x: x["batches"])
    info = config.get("run_info") or {}
    label = label or info.get("label") or config.get("method") or path.name
    return RunData(
        label=str(label),
        path=path,
        config=config,
        batches=[x for x in lines if x.get("type") == "batch"],
        evals=evals,
    )


def summarize_run(run: RunData) -> dict[str, Any]:
    """Final metrics, degradation before/after, mean final norm growth, seconds per edit."""
    first = run.evals[0] if run.evals else {}
    last = run.evals[-1] if run.evals else {}
    out: dict[str, Any] = {"run": run.label, "edits": last.get("edits_done", 0)}
    metrics = last.get("metrics", {})
    for key in METRIC_KEYS:
        if metrics.get(key) is not None:
            out[key] = metrics[key]
    out["ppl_before"] = first.get("perplexity")
    out["ppl_after"] = last.get("perplexity")
    out["ppl_ratio"] = _ratio(out["ppl_after"], out["ppl_before"])
    out["known_before"] = first.get("known_acc")
    out["known_after"] = last.get("known_acc")
    out["known_retained"] = last.get("known_retained")
    edits, ratios = run.norm_series()
    finals = [series[-1] for series in ratios.values() if series]
    out["norm_growth"] = sum(finals) / len(finals) if finals and edits[-1] > 0 else None
    seconds, timed_edits, prev = 0.0, 0, 0
    for b in run.batches:
        size, prev = b["edits_done"] - prev, b["edits_done"]
        secs = b.get("seconds", b.get("wall_seconds"))
        if not b.get("recovered") and secs is not None:
            seconds, timed_edits = seconds + secs, timed_edits + size
    out["sec_per_edit"] = seconds / timed_edits if timed_edits else None
    down = last.get("downstream") or {}
    out["downstream_f1"] = down.get("mean_f1")
    out["forget_es"] = (last.get("forgetting") or {}).get("es")
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _int_keys(d: dict[str, float]) -> dict[int, float]:
    return {int(k): float(v) for k, v in d.items()}


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
