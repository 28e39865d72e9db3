"""One helper for the benchmarks' CSV files: append rows, each stamped with where it came from.

Every row gets the stamp of :func:`encore_fast.provenance.stamp` (command, commit, machine, date,
library versions) in columns after the benchmark's own, so a number can be reproduced from its
row. A file written before the stamp existed is rewritten once (atomically) with those columns
added and left empty in its old rows: what is not known is not invented.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from encore_fast.io import atomic_write_text
from encore_fast.provenance import stamp, stamp_columns


def append_rows(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]],
                command: str | Sequence[str] | None = None) -> None:
    """Append ``rows`` (columns ``header``) to the CSV at ``path``, each with the provenance
    stamp of this run (``command``: default the running program's command line)."""
    out = Path(path)
    extra = stamp_columns(stamp(command))
    full = [*header, *(k for k in extra if k not in header)]
    stamped = [[*row, *(extra[k] for k in full[len(header):])] for row in rows]
    old = list(csv.reader(out.open(newline=""))) if out.exists() else []
    if old and old[0] != full:
        if old[0] != list(full[: len(old[0])]):
            raise ValueError(f"{out}: its columns {old[0]} are not {list(header)}; write the "
                             "rows to another file")
        old = [full] + [r + [""] * (len(full) - len(r)) for r in old[1:]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows((old or [full]) + stamped)
    atomic_write_text(out, buf.getvalue())
