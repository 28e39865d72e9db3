"""Per-item outcomes beside an evaluation's aggregates: every scored fact, example, known fact
and perplexity window, in a gzip-compressed JSON-lines file of the run folder.

``results.jsonl`` keeps the aggregates (ES, F1, perplexity, with their ``n``); what each was
averaged from goes into ``outcomes/``, one file per evaluation or batch, so that the report can
put an interval on every number and compare two runs fact by fact:

* ``outcomes/eval-NNNNN.jsonl.gz`` -- the evaluation after NNNNN batches in ``results.jsonl``;
* ``outcomes/snapshot-NNNNN.jsonl.gz`` -- that of snapshot NNNNN, in ``evals.jsonl``;
* ``outcomes/batch-NNNNN.jsonl.gz`` -- batch NNNNN's own facts, scored right after it was
  edited (immediate efficacy).

The first line is a header (``{"format": "encore_fast.outcomes/1", ...}``: the batches and edits
done), then one JSON object per item, each naming the metric that wrote it (``"metric"``) and
what it is about -- a record (``"record"``: its position in the edit stream, and its
``"case_id"``), a downstream example (``"task"``, ``"example"``), a known fact (``"fact"``), a
perplexity window (``"window"``) -- with its values (see each metric). Files are written whole to
a temporary name and renamed: a reader sees none or all of one.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

OUTCOMES = "outcomes"  # the run folder's outcomes folder
FORMAT = "encore_fast.outcomes/1"
Row = dict[str, Any]


def eval_file(batches: int, deferred: bool = False) -> str:
    """The outcome file of an evaluation after ``batches`` batches, relative to the run folder
    (``deferred``: made by :func:`~encore_fast.eval.run.evaluate_snapshots`)."""
    return f"{OUTCOMES}/{'snapshot' if deferred else 'eval'}-{batches:05d}.jsonl.gz"


def batch_file(batch: int) -> str:
    """The outcome file of batch ``batch``'s immediate scores, relative to the run folder."""
    return f"{OUTCOMES}/batch-{batch:05d}.jsonl.gz"


def write_outcomes(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]],
                   header: Mapping[str, Any]) -> Path:
    """Write ``header`` and ``rows`` as gzip JSON lines, atomically (temporary file, fsync,
    rename). Fast level-1 compression: the rows are small and many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    lines = [_json({"format": FORMAT, **header})] + [_json(row) for row in rows]
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as fh:
            fh.write(("\n".join(lines) + "\n").encode())
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return path


def _json(row: Mapping[str, Any]) -> str:
    """One row as a JSON line (numbers such as numpy's or one-element tensors as plain ones)."""
    return json.dumps(dict(row), sort_keys=True, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def read_outcomes(path: str | os.PathLike[str]) -> tuple[Row, list[Row]]:
    """The header and the rows of an outcome file."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    if not lines or lines[0].get("format") != FORMAT:
        raise ValueError(f"{path} is not an encore_fast outcome file")
    return lines[0], lines[1:]


def rows_of(rows: Iterable[Mapping[str, Any]] | None, metric: str) -> list[Row]:
    """The rows one metric wrote (none for no rows)."""
    return [dict(r) for r in rows or () if r.get("metric") == metric]


def record_rows(indices: Sequence[int], case_ids: Sequence[Any],
                values: Mapping[str, Mapping[int, float]]) -> list[Row]:
    """One row per scored record: its stream position, case id, and each value it has
    (``values``: name -> {position in the scored list: value})."""
    rows = []
    for r, (index, case) in enumerate(zip(indices, case_ids, strict=True)):
        row: Row = {"record": index, "case_id": case}
        row.update({name: v[r] for name, v in values.items() if r in v})
        rows.append(row)
    return rows
