"""The 10,000-edit study's rules (benchmarks/study_report.py) on hand-made evaluation lines: when
a run counts as collapsed (and only at two evaluations in a row), which tuning setting is
picked, the seconds per edit it reports, and the tables it writes."""

from __future__ import annotations

import csv
import json
import sys
from types import SimpleNamespace

import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def sr():
    mod = load_benchmark("study_report")
    yield mod
    sys.modules.pop("study_report", None)


def line(edits: int, es: float = 0.9, f1: float = 0.45, ppl: float = 40.0) -> dict:
    return {"edits_done": edits, "metrics": {"es": es}, "downstream": {"mean_f1": f1},
            "perplexity": ppl}


BASE = line(0, es=0.3, f1=0.45, ppl=40.0)


def test_each_collapse_criterion(sr):
    assert sr.collapsed(BASE, line(1000)) is None
    assert "ES" in sr.collapsed(BASE, line(1000, es=0.3))  # no better than unedited
    assert sr.collapsed(BASE, line(1000, es=0.31)) is None
    # downstream: margin over one-class F1 (1/3) was 0.45 - 1/3 = 0.117; half of it is lost
    # below 1/3 + 0.058 = 0.392
    assert "downstream" in sr.collapsed(BASE, line(1000, f1=0.39))
    assert sr.collapsed(BASE, line(1000, f1=0.40)) is None
    assert "perplexity" in sr.collapsed(BASE, line(1000, ppl=401.0))
    assert sr.collapsed(BASE, line(1000, ppl=399.0)) is None
    both = sr.collapsed(BASE, line(1000, f1=0.36, ppl=500.0))  # every criterion met is named
    assert "downstream" in both and "perplexity" in both and "ES" not in both


def test_collapse_needs_two_evaluations_in_a_row(sr):
    evals = [BASE, line(1000), line(2000, ppl=500.0), line(3000), line(4000, es=0.2),
             line(5000, ppl=900.0), line(6000, ppl=950.0)]
    # 2,000 alone does not count (3,000 recovers); 4,000 and 5,000 do, for different reasons
    edits, why = sr.collapse_point(evals)
    assert edits == 4000 and "ES" in why
    assert sr.collapse_point(evals[:5]) is None  # the last evaluation alone: not yet
    assert sr.collapse_point([BASE]) is None and sr.collapse_point([]) is None


def test_tuning_rule_picks_least_perplexity_growth_among_made_edits(sr):
    rows = [{"run": "a", "es": 0.96, "ppl_ratio": 1.30},
            {"run": "b", "es": 0.87, "ppl_ratio": 1.06},
            {"run": "c", "es": 0.70, "ppl_ratio": 1.02},
            {"run": "d", "es": 0.90, "ppl_ratio": None}]
    assert sr.choose(rows)["run"] == "b"  # c's edits are not made, d has no perplexity
    assert sr.choose(rows, min_es=0.95)["run"] == "a"
    assert sr.choose(rows, min_es=0.99) is None


def test_seconds_per_edit_is_the_median_batch(sr):
    run = SimpleNamespace(batches=[{"seconds": s, "n_requests": 100} for s in (300, 50, 60, 55)])
    assert sr.seconds_per_edit(run) == pytest.approx(0.60)  # upper median of 0.5, 0.55, 0.6, 3
    assert sr.seconds_per_edit(SimpleNamespace(batches=[])) is None


def _write_run(path, method: str, evals: list[dict]) -> None:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"method": method}))
    batches = [{"type": "batch", "batches": e["edits_done"] // 100,
                "edits_done": e["edits_done"], "seconds": 50.0, "n_requests": 100}
               for e in evals[1:]]
    (path / "results.jsonl").write_text("".join(json.dumps(b) + "\n" for b in batches))
    (path / "evals.jsonl").write_text("".join(
        json.dumps({"type": "eval", "batches": e["edits_done"] // 100, **e}) + "\n"
        for e in evals))


def test_report_tables_the_chosen_points_and_each_runs_collapse(sr, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _write_run(runs / "encore", "encore", [BASE] + [line(n) for n in range(1000, 6000, 1000)])
    # the baseline falls below the downstream bound at 3,000 and stays there at 4,000
    _write_run(runs / "memit-seq", "memit-seq",
               [BASE, line(1000), line(2000), line(3000, f1=0.36), line(4000, f1=0.35)])
    monkeypatch.setitem(sys.modules, "encore_fast.eval.plots", None)  # (no plots: faster)
    out = tmp_path / "out"
    assert sr.main(["--runs", str(runs), "--out", str(out), "--methods", "encore",
                    "memit-seq", "alphaedit", "--points", "1000", "3000"]) == 0
    with open(out / "table.csv") as f:
        tabled = [(r["method"], int(r["edits"])) for r in csv.DictReader(f)]
    # the points asked for, then each run's last evaluation; alphaedit has no run: no rows
    assert tabled == [("encore", 1000), ("encore", 3000), ("encore", 5000),
                      ("memit-seq", 1000), ("memit-seq", 3000), ("memit-seq", 4000)]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encore"]["collapsed_at"] is None
    assert summary["memit-seq"]["collapsed_at"][0] == 3000
    assert summary["memit-seq"]["edits"] == 4000
    assert summary["memit-seq"]["sec_per_edit"] == pytest.approx(0.5)
    assert (out / "memit-seq" / "evals.jsonl").exists()  # each run's files copied beside it
