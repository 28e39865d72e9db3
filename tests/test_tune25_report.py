"""The tuning rule of the new methods, as the report applies it: the qualifying candidate
(perplexity at most 1.10 × unedited) with the highest S, the first listed on a tie; when none
qualifies, the lowest perplexity ratio."""

from __future__ import annotations

import sys

import pytest
from helpers import load_benchmark


@pytest.fixture
def report():
    mod = load_benchmark("tune25_report")
    yield mod
    sys.modules.pop("tune25_report", None)


def _row(name, s, ppl):
    return {"name": name, "outcome": {"s": s, "ppl_ratio": ppl}}


def test_the_rule(report):
    rows = [_row("a", 0.9, 1.2), _row("b", 0.7, 1.05), _row("c", 0.8, 1.10), _row("d", 0.8, 1.0)]
    assert report.choose(rows) == "c"  # (a scores higher but breaks the perplexity bound)
    assert report.choose([_row("a", 0.9, 1.3), _row("b", 0.1, 1.2)]) == "b"
    assert report.choose([{"name": "x", "outcome": None}]) is None
    assert report.choose([_row("a", 0.9, 1.0), {"name": "x", "outcome": None}]) is None


def test_candidates_are_at_most_four_per_method(report):
    rows = report.candidates()
    per = {}
    for _, method, _ in rows:
        per[method] = per.get(method, 0) + 1
    assert per and max(per.values()) <= 4
