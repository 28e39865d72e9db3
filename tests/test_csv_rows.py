"""Benchmark CSV rows carry their provenance stamp; old files gain the columns, empty."""

from __future__ import annotations

import csv
import sys

import pytest
from helpers import load_benchmark


@pytest.fixture
def csv_rows():
    yield load_benchmark("csv_rows")
    sys.modules.pop("csv_rows", None)


def read(path):
    return list(csv.DictReader(path.open(newline="")))


def test_new_rows_are_stamped_and_old_files_gain_empty_stamp_columns(csv_rows, tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text("date,s_per_edit\n2026-11-25,0.9\n")  # written before stamps existed
    csv_rows.append_rows(path, ["date", "s_per_edit"], [["2026-12-07", 0.8]],
                         command="bench.py --n 20")
    rows = read(path)
    assert [r["s_per_edit"] for r in rows] == ["0.9", "0.8"]
    assert rows[0]["commit"] == "" and rows[0]["command"] == ""  # not known: not invented
    new = rows[1]
    assert new["command"] == "bench.py --n 20" and new["v_torch"] and new["machine"]
    assert new["commit"] and new["date"] and "v_scipy" in new
    csv_rows.append_rows(path, ["date", "s_per_edit"], [["2026-12-08", 0.7]])
    assert len(read(path)) == 3 and path.read_text().count("s_per_edit") == 1
    with pytest.raises(ValueError, match="are not"):
        csv_rows.append_rows(path, ["date", "other"], [["x", 1]])
