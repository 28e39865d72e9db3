"""Tests cannot pass by skipping unnoticed: without data the suite's summary says how many were
skipped for want of it and how to get it; with ENCORE_FAST_REQUIRE_DATA=1 such a skip fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_DATA = "tests/test_eval_datasets.py::test_shared_data_loads"


def run_without_data(tmp_path, **env):
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k != "ENCORE_FAST_REQUIRE_DATA"}
    full = {**base, "ENCORE_FAST_DATA": str(empty), "ENCORE_FAST_CACHE": str(empty), **env}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           NEEDS_DATA], cwd=ROOT, env=full, capture_output=True, text=True)


def test_a_skip_for_want_of_data_is_counted_and_explained(tmp_path):
    out = run_without_data(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout
    assert "data: 1 test(s) skipped for want of the data sets" in out.stdout
    assert "encore-fast data fetch" in out.stdout and "ENCORE_FAST_DATA" in out.stdout


def test_required_data_turns_the_skip_into_a_failure(tmp_path):
    out = run_without_data(tmp_path, ENCORE_FAST_REQUIRE_DATA="1")
    assert out.returncode == 1 and "1 failed" in out.stdout
    assert "ENCORE_FAST_REQUIRE_DATA=1 forbids skipping" in out.stdout
