"""The protocol study's report on two scripted runs: tables with intervals at each point,
the paired comparison with Holm's verdicts, collapse points, the run files and plots."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from helpers import load_benchmark
from test_eval_protocol import Other, data, editor, go  # noqa: F401 (data: a fixture)

from encore_fast.eval.results import load_run
from encore_fast.eval.run import EvalSettings

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def study2():
    yield load_benchmark("study2_report")
    sys.modules.pop("study2_report", None)


def test_report_of_two_runs(study2, tmp_path, data):  # noqa: F811
    pytest.importorskip("matplotlib")
    settings = EvalSettings(sampling="edited", sample=10, **data)
    runs = tmp_path / "runs"
    go(editor(), runs / "encore", settings)
    go(editor(Other), runs / "other", settings)
    go(editor(Other), runs / "third", settings)
    out = tmp_path / "report"
    summary = study2.main(["--runs", str(runs), "--out", str(out), "--methods", "encore",
                           "other", "third", "--points", "8", "20", "13", "--primary", "8",
                           "20"])
    assert summary == 0
    table = (out / "table.md").read_text().splitlines()
    assert table[2].startswith("| unedited | 0 |")
    assert [line.split("|")[1:3] for line in table[3:]] == [
        [" encore ", " 8 "], [" other ", " 8 "], [" third ", " 8 "], [" encore ", " 20 "],
        [" other ", " 20 "], [" third ", " 20 "]]
    assert "n=8" in table[3] and "[" in table[3]  # cells with intervals and n
    compare = (out / "compare-encore-vs-other.md").read_text()
    assert "| S | 8 |" in compare and "| S | 20 |" in compare and "Holm" in compare
    # compared at the primary points only, Holm over both tables' comparisons together
    both = [json.loads((out / f"compare-encore-vs-{m}.md.json").read_text())["comparisons"]
            for m in ("other", "third")]
    assert {c["edits"] for c in both[0]} == {8, 20} and len(both[0]) == len(both[1])
    family = len(both[0]) + len(both[1])
    assert f"Holm over {family} comparisons" in compare
    from encore_fast.eval.intervals import holm
    flat = [c for table in both for c in table]
    assert [c["significant"] for c in flat] == holm([c["p"] for c in flat])
    # the claims block from these files: every run, every comparison, the family, the cost
    sys.path.insert(0, str(BENCH))
    try:
        claims = importlib.import_module("claims_blocks.study2").claims(out)
    finally:
        sys.path.remove(str(BENCH))
        for name in [m for m in sys.modules if m == "tuned" or m.startswith("claims_blocks")]:
            sys.modules.pop(name, None)
    for name in ("encore", "other", "third"):
        assert f"* `{name}`: edited to 20, evaluated to 20; no collapse" in claims
    assert claims.count("| `other` |") == 2 and claims.count("| `third` |") == 2
    assert f"Holm's correction over all {family} comparisons" in claims
    significant = sum(c["significant"] for c in flat)
    assert claims.count("**significant**") == significant
    assert "An evaluation point took" in claims
    saved = json.loads((out / "summary.json").read_text())
    assert saved["encore"]["evaluated_to"] == 20 and saved["other"]["edited_to"] == 20
    assert saved["encore"]["collapse"] is None
    assert (out / "encore" / "outcomes").is_dir() and (out / "other" / "config.json").exists()
    assert list((out / "plots").glob("*.png"))


def test_which_methods_go_on_to_the_long_study(study2, tmp_path, data):  # noqa: F811
    """The compare25 block's verdict per new method: on, or stopped by a collapse criterion at
    the comparison's point, or by being a study method's update by equation."""
    settings = EvalSettings(sampling="edited", sample=10, **data)
    runs = tmp_path / "runs"
    go(editor(), runs / "encore", settings)
    for name in ("other", "third", "fourth"):
        go(editor(Other), runs / name, settings)
    for name, method in (("third", "emmet"), ("fourth", "evoedit")):
        config = json.loads((runs / name / "config.json").read_text())
        (runs / name / "config.json").write_text(json.dumps({**config, "method": method}))
    lines = (runs / "fourth" / "results.jsonl").read_text().splitlines()
    for i, line in enumerate(lines):  # the fourth run's perplexity x20 at 8 edits
        x = json.loads(line)
        if x["type"] == "eval" and x["edits_done"] == 8:
            lines[i] = json.dumps({**x, "perplexity": 20 * x["perplexity"]})
    (runs / "fourth" / "results.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    assert study2.main(["--runs", str(runs), "--out", str(out), "--methods", "encore", "other",
                        "third", "fourth", "--points", "8", "--primary", "8"]) == 0
    sys.path.insert(0, str(BENCH))
    try:
        block = importlib.import_module("claims_blocks.compare25")
        runs = {n: load_run(out / n) for n in ("encore", "other", "third", "fourth")}
        said = block.goes_on(runs, at=8)
        later = block.goes_on({"other": runs["other"]}, at=13)
    finally:
        sys.path.remove(str(BENCH))
        for name in [m for m in sys.modules if m == "tuned" or m.startswith("claims_blocks")]:
            sys.modules.pop(name, None)
    assert said[0] == "* `other`: **goes on**: no criterion of the collapse rule met at 8 edits."
    assert said[1].startswith("* `third`: stops: its update is `memit-seq`'s")
    assert said[2].startswith("* `fourth`: stops: at 8 edits it meets the collapse rule's "
                              "perplexity x20.0 >= x10")
    assert len(said) == 3  # (ENCORE, a study method, is not judged)
    assert later == ["* `other`: not evaluated at 13 yet."]
