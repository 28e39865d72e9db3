"""The README's per-method table (benchmarks/claims_blocks/methods.py): benchmark runs told apart
as appended, speeds only over runs like the newest, every method in a row."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
COLS = ["date", "cpu", "threads", "dtype", "edits", "batch", "method", "s_per_edit", "status",
        "command", "commit"]


@pytest.fixture
def mt(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    yield importlib.import_module("claims_blocks.methods")
    for name in [m for m in sys.modules if m == "tuned" or m.startswith("claims_blocks")]:
        sys.modules.pop(name, None)


def write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLS)
        w.writerows(rows)


def row(method, s, threads="2", command="bench --tuned", date="2026-12-08", status="ok"):
    return [date, "EPYC", threads, "bf16", "100", "100", method, s, status, command, "abc"]


def test_runs_as_appended_and_speeds_over_like_runs(mt, tmp_path):
    path = tmp_path / "m.csv"
    write(path, [row("encore", 9.0, threads="1"),                        # unlike: 1 thread
                 row("encore", 0.7), row("nas", 1.2), row("emmet", 0, status="failed"),
                 row("encore", 0.8), row("alphaedit+nas", 1.4)])        # a second, like run
    runs = mt.bench_runs(path)
    assert [len(r) for r in runs] == [1, 3, 2]  # (encore twice: two runs)
    per, info = mt.speeds(runs)
    assert per == {"encore": [0.7, 0.8], "alphaedit+nas": [1.2, 1.4]}
    assert info["runs"] == "2" and info["threads"] == "2"
    assert mt.speeds([]) == ({}, {})


def test_the_table_has_every_method_and_the_committed_speeds(mt):
    text = mt.table(BENCH.parent)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(mt.METHODS)
    assert "s/edit: `benchmarks/bench_methods.py`" in text
