"""The study protocol on the evaluation seam ("A benchmark you can trust"): the paired, nested
sample of edited facts; per-item outcome files that reproduce the lines' aggregates; intervals
in the report; paired comparisons with Holm's verdicts; the collapse rule and stop_on_collapse;
immediate efficacy; ``--protocol study``; provenance stamps. Fast: the scripted FakeEditor and
hand-made run folders (the real tiny model: tests/test_eval_deferred.py)."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import time

import pytest

import encore_fast.eval.cli as cli
import encore_fast.eval.run as run_mod
from encore_fast.eval.compare import NotPaired, compare_runs, write_comparison
from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.evaluator import Evaluator
from encore_fast.eval.intervals import Measure
from encore_fast.eval.metrics import harmonic_mean
from encore_fast.eval.outcomes import read_outcomes, rows_of, write_outcomes
from encore_fast.eval.protocol import scored_facts
from encore_fast.eval.report import csv_table, load_run, markdown_table, summarize_run
from encore_fast.eval.results import read_results
from encore_fast.eval.run import EvalSettings, run_sequential
from encore_fast.eval.settings import STUDY
from encore_fast.eval.testing import FakeEditor
from encore_fast.requests import EditRequest

N = 20
WORDS = ["where", "is", "about", "near", "fact", "of", "y", "z", "w",
         *(f"x{i}" for i in range(N))]
MADE = {0, 2, 3, 5, 8, 9, 11, 14, 15, 18}  # the facts the scripted model "knows" as edited


def stream(n: int = N) -> list[EvalRecord]:
    return [EvalRecord(EditRequest(f"where is x{i}", f"x{i}", "y", "z", case_id=100 + i),
                       "counterfact", [f"about x{i}", "about w"], ["near w"], "z", index=i)
            for i in range(n)]


def scripted(ed: FakeEditor) -> FakeEditor:
    """After x_i the new target "y" wins for the facts in MADE, the true "z" for the others;
    after "w" the true answer wins (so each PS is 1/2 or 0, and NS is 1)."""
    tok, lm = ed.tokenizer, ed.model
    y, z = tok.id("y"), tok.id("z")
    for i in range(N):
        lm.set_next(tok.id(f"x{i}"), {y: 0.6, z: 0.1} if i in MADE else {z: 0.6, y: 0.1})
    lm.set_next(tok.id("w"), {z: 0.5, y: 0.2})
    return ed


class Other(FakeEditor):
    method = "other"


def editor(cls: type = FakeEditor):
    return lambda: scripted(cls(words=WORDS))


@pytest.fixture
def data(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("w z x1 y where is x2 " * 20)
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"prompt": f"fact of x{i}", "attribute": "y"}
                                 for i in range(12)]))
    return {"wikitext": str(wiki), "ppl_tokens": 64, "ppl_window": 8,
            "known_facts": str(known), "known_n": None}


def go(factory, out, settings, **kw):
    kw = {"num_edits": N, "batch_size": 4, "eval_every": 1, "progress": False,
          "make_plots": False, **kw}
    return run_sequential(factory, stream(), out, settings=settings, **kw)


def evals(out, name="results.jsonl"):
    return [x for x in read_results(out / name) if x["type"] == "eval"]


def outcome_rows(out, batches, kind="eval"):
    return read_outcomes(out / "outcomes" / f"{kind}-{batches:05d}.jsonl.gz")[1]


# --- the sample -------------------------------------------------------------------------------

def test_edited_sample_is_the_same_for_every_method_and_nested(tmp_path, data):
    settings = EvalSettings(sampling="edited", sample=6, seed=3, **data)
    a = go(editor(), tmp_path / "a", settings).parent
    b = go(editor(Other), tmp_path / "b", settings).parent
    assert json.loads((b / "config.json").read_text())["method"] == "other"
    scored = {}
    for line_a, line_b in zip(evals(a), evals(b), strict=True):
        k, edits = line_a["batches"], line_a["edits_done"]
        assert (line_b["batches"], line_b["edits_done"]) == (k, edits)
        recs_a = [r["record"] for r in rows_of(outcome_rows(a, k), "counterfact")]
        recs_b = [r["record"] for r in rows_of(outcome_rows(b, k), "counterfact")]
        assert recs_a == recs_b == scored_facts(N, edits, 6, 3)
        assert len(recs_a) == (6 if edits == 0 else min(6, edits))
        scored[edits] = set(recs_a)
    points = sorted(e for e in scored if e)
    for early, late in zip(points, points[1:], strict=False):  # nested
        assert {i for i in scored[late] if i < early} <= scored[early]
    # the stream sampling of runs written before stays as it was
    ev = Evaluator(FakeEditor().tokenizer, stream(), EvalSettings(sample=6, seed=3))
    assert ev.indices_at(8) == [i for i in ev.sample if i < 8]


def test_settings_default_to_the_stream_sampling_of_older_runs():
    config = EvalSettings().as_config()
    assert "sampling" not in config and "immediate" not in config  # (older configs resume)
    assert EvalSettings(sampling="edited", immediate=True).as_config()["sampling"] == "edited"
    with pytest.raises(ValueError, match="sampling"):
        EvalSettings(sampling="random")
    ev = Evaluator(FakeEditor().tokenizer, stream(), EvalSettings(sampling="edited"))
    assert ev.indices_at(0) == scored_facts(N, 0)  # (None: the protocol's 1000, here all)


# --- outcome files ----------------------------------------------------------------------------

def test_outcome_files_reproduce_the_lines_exactly(tmp_path, data):
    settings = EvalSettings(sampling="edited", sample=8, forgetting=5, **data)
    out = go(editor(), tmp_path / "run", settings).parent
    for line in evals(out):
        path = out / "outcomes" / f"eval-{line['batches']:05d}.jsonl.gz"
        with gzip.open(path, "rt") as fh:  # gzip JSON lines, a header first
            header = json.loads(fh.readline())
        assert header["format"] == "encore_fast.outcomes/1"
        assert header["edits_done"] == line["edits_done"]
        rows = outcome_rows(out, line["batches"])
        assert "outcomes" not in line  # (never inside results.jsonl)
        m = line["metrics"]
        cf = rows_of(rows, "counterfact")
        assert [r["case_id"] for r in cf] == [100 + r["record"] for r in cf]
        for key in ("es", "ps", "ns"):
            vals = [r[key] for r in cf]
            assert m[key] == sum(vals) / len(vals) and m[f"n_{key}"] == len(vals)
        assert m["s"] == harmonic_mean([m["es"], m["ps"], m["ns"]])
        assert {r["ps"] for r in cf} <= {0.0, 0.5}
        windows = rows_of(rows, "perplexity")
        assert line["perplexity"] == math.exp(sum(w["nll"] for w in windows)
                                              / sum(w["tokens"] for w in windows))
        assert line["n_ppl_windows"] == len(windows) == 8
        facts = rows_of(rows, "known_facts")
        assert line["known_acc"] == sum(f["correct"] for f in facts) / len(facts)
        before = [f for f in facts if f["known_before"]]
        assert line["known_retained"] == sum(f["correct"] for f in before) / len(before)
        assert (line["n_known"], line["n_known_before"]) == (12, len(before))
        if line["edits_done"]:
            first = rows_of(rows, "forgetting")
            assert [r["record"] for r in first] == list(range(min(5, line["edits_done"])))
            assert line["forgetting"]["es"] == sum(r["es"] for r in first) / len(first)


def test_a_metric_adds_its_own_outcomes_through_the_seam(tmp_path):
    from encore_fast.eval.registry import register, unregister
    from encore_fast.eval.seam import OUTCOME_ROWS, Metric

    class Lengths(Metric):
        name = "lengths"

        def evaluate(self, point, data):
            rows = [{"record": i, "length": len(r.request.text)}
                    for i, r in zip(point.indices, point.records, strict=True)]
            return {"mean_length": sum(r["length"] for r in rows) / len(rows),
                    OUTCOME_ROWS: rows}

    register(Lengths())
    try:
        out = go(editor(), tmp_path / "run", EvalSettings(), num_edits=8).parent
    finally:
        unregister("lengths")
    line = evals(out)[-1]
    mine = rows_of(outcome_rows(out, line["batches"]), "lengths")
    assert line["mean_length"] == sum(r["length"] for r in mine) / len(mine)


# --- the report -------------------------------------------------------------------------------

def test_report_cells_print_intervals_and_n(tmp_path, data):
    out = go(editor(), tmp_path / "run", EvalSettings(sampling="edited", **data)).parent
    row = summarize_run(load_run(out))
    es = row["es"]
    assert isinstance(es, Measure) and es == evals(out)[-1]["metrics"]["es"] == 0.5
    assert es.estimate.method == "wilson" and es.estimate.n == N
    assert es.estimate.low < 0.5 < es.estimate.high
    assert isinstance(row["ps"], Measure) and row["ps"].estimate.method == "bootstrap"
    assert isinstance(row["ppl_ratio"], Measure) and row["ppl_ratio"] == pytest.approx(1.0)
    assert isinstance(row["known_retained"], Measure)
    md = markdown_table([row])
    assert f"{es.estimate} n={N}" in md and "0.50 [" in md
    header, values = csv_table([row]).splitlines()
    cols = header.split(",")
    assert cols[cols.index("es") + 1 : cols.index("es") + 4] == ["es_low", "es_high", "es_n"]
    assert values.split(",")[cols.index("es_n")] == str(N)
    assert row["collapse"] == "none"
    # a folder without outcome files keeps today's plain numbers
    plain = load_run(out)
    plain.outcome_files.clear()
    again = summarize_run(plain)
    assert type(again["es"]) is float and "collapse" not in again


# --- hand-made run folders: comparison, informative tasks, collapse -----------------------------

def write_run(path, method, points):
    """A run folder by hand: ``points`` are (edits, line extras, outcome rows)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"method": method}))
    lines = []
    for k, (edits, extra, rows) in enumerate(points):
        lines.append({"type": "eval", "batches": k, "edits_done": edits, **extra})
        write_outcomes(path / "outcomes" / f"eval-{k:05d}.jsonl.gz", rows,
                       {"batches": k, "edits_done": edits})
    (path / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def records(metric, n, **columns):
    """Rows of ``n`` records, each column a function of the record index."""
    return [{"metric": metric, "record": i, "case_id": i,
             **{k: f(i) for k, f in columns.items()}} for i in range(n)]


def examples(task, gold, pred):
    return [{"metric": "downstream", "task": task, "example": i, "gold": g, "pred": p}
            for i, (g, p) in enumerate(zip(gold, pred, strict=True))]


GOLD = [i % 2 for i in range(100)]  # two balanced classes: majority-class F1 1/3
UNEDITED = (examples("sst2", GOLD, GOLD) + examples("mrpc", GOLD, [0] * 100)
            + records("counterfact", 200, es=lambda i: 0.0, ps=lambda i: 0.0,
                      ns=lambda i: 1.0))
CHANCE = {"sst2": {"majority_f1": 1 / 3}, "mrpc": {"majority_f1": 1 / 3}}


def comparable(tmp_path, name, es, real_es, sst2_pred):
    later = (records("counterfact", 200, es=es, ps=lambda i: 0.5, ns=lambda i: 0.9)
             + records("realistic", 200, real_es=real_es, real_ps=lambda i: 0.5)
             + examples("sst2", GOLD, sst2_pred) + examples("mrpc", GOLD, [0] * 100))
    return load_run(write_run(tmp_path / name, name, [
        (0, {"downstream": CHANCE}, UNEDITED),
        (100, {"downstream": CHANCE, "metrics": {}}, later)]), name)


def test_paired_comparison_with_holm_verdicts(tmp_path):
    a = comparable(tmp_path, "a", lambda i: float(i % 10 != 0), lambda i: float(i % 5 != 0),
                   GOLD)
    b = comparable(tmp_path, "b", lambda i: float(i % 2 == 0), lambda i: float(i % 5 != 1),
                   [g if i % 10 else 1 - g for i, g in enumerate(GOLD)])
    found = {c.endpoint: c for c in compare_runs(a, b, resamples=500)}
    s, real, down = found["s"], found["real_s"], found["informative_f1"]
    assert s.difference.value == s.a.value - s.b.value > 0.1  # ES 0.9 vs 0.5
    assert s.difference.excludes(0) and s.significant and s.verdict("a", "b") == "a > b"
    assert real.difference.value == pytest.approx(0.0)  # the same share, other facts
    assert not real.significant and real.verdict() == "no difference" and real.p > 0.5
    assert down.a.value == 1.0 and down.b.n == 100 and down.difference.value > 0
    assert down.significant  # only sst2 is informative: mrpc is at its majority level
    assert summarize_run(a)["informative"] == "sst2"
    md = write_comparison(tmp_path / "compare.md", list(found.values()), "a", "b",
                          resamples=500)
    text = md.read_text()
    assert "| S | 100 |" in text and f"{s.difference.format(signed=True)}" in text
    assert s.difference.format(signed=True).startswith("+")
    saved = json.loads((tmp_path / "compare.md.json").read_text())
    assert saved["provenance"]["scipy"] and saved["provenance"]["resamples"] == 500
    assert [c["significant"] for c in saved["comparisons"]] == [True, False, True]


def test_plots_draw_bands_where_intervals_exist(tmp_path):
    pytest.importorskip("matplotlib")
    from encore_fast.eval.health import INFORMATIVE, Downstream
    from encore_fast.eval.plots import draw_figure, plot_runs

    a = comparable(tmp_path, "a", lambda i: 1.0, lambda i: 1.0, GOLD)
    band = INFORMATIVE.band(a)
    assert band is not None and band[0] == [0, 100] and band[1][0] <= 1.0 <= band[2][0]
    spec = Downstream.figures[0]
    assert INFORMATIVE in spec.panels([a])
    fig = draw_figure(spec, [a])
    assert any(ax.collections for ax in fig.axes)  # (fill_between: the bands)
    names = [p.name for p in plot_runs([a.path], tmp_path / "plots")]
    assert "downstream.png" in names


def test_comparison_needs_the_same_facts(tmp_path):
    a = comparable(tmp_path, "a", lambda i: 1.0, lambda i: 1.0, GOLD)
    other = load_run(write_run(tmp_path / "c", "c", [
        (0, {}, UNEDITED), (100, {}, records("counterfact", 150, es=lambda i: 1.0,
                                             ps=lambda i: 1.0, ns=lambda i: 1.0))]))
    with pytest.raises(NotPaired, match="different facts"):
        compare_runs(a, other, endpoints=("s",), resamples=100)


def collapsing(tmp_path, name, ppls, sst2_preds):
    points = [(100 * k, {"perplexity": p, "downstream": CHANCE},
               examples("sst2", GOLD, pred) + examples("mrpc", GOLD, [0] * 100))
              for k, (p, pred) in enumerate(zip(ppls, sst2_preds, strict=True))]
    return load_run(write_run(tmp_path / name, name, points))


def test_collapse_point_from_evaluations(tmp_path):
    from encore_fast.eval.collapse import run_collapse

    good, chance = GOLD, [0] * 100
    run = collapsing(tmp_path, "ppl", [10, 20, 150, 30, 120, 400, 500], [good] * 7)
    found = run_collapse(run)  # 200 alone does not count (300 recovers); 400 and 500 do
    assert found.edits == 400 and "perplexity x12.0" in found.reasons[0]
    assert summarize_run(run)["collapse"].startswith("400: perplexity")
    down = collapsing(tmp_path, "down", [10] * 5, [good, good, chance, chance, good])
    found = run_collapse(down)
    assert found.edits == 200 and "downstream" in found.reasons[0]
    assert run_collapse(collapsing(tmp_path, "ok", [10, 11, 200], [good] * 3)) is None


# --- stop_on_collapse -------------------------------------------------------------------------

class Exploding(FakeEditor):
    """From its third batch on, the text after "w" becomes nearly impossible."""

    def edit(self, requests, batch_size=None, progress=True):
        out = super().edit(requests, batch_size, progress)
        if self.num_batches >= 3:
            self.model.set_next(self.tokenizer.id("w"), {self.tokenizer.id("y"): 1 - 1e-9})
        return out


def test_stop_on_collapse_ends_a_run_after_two_collapsed_evaluations(tmp_path, data):
    settings = EvalSettings(**{**data, "known_facts": None})
    out = tmp_path / "run"
    go(editor(Exploding), out, settings, stop_on_collapse=True)
    lines = read_results(out / "results.jsonl")
    assert [x["batch"] for x in lines if x["type"] == "batch"] == [0, 1, 2, 3]
    assert [x["edits_done"] for x in lines if x["type"] == "eval"] == [0, 4, 8, 12, 16]
    stop = lines[-1]
    assert stop["type"] == "stopped" and stop["collapsed_at"] == 12
    assert stop["edits_done"] == 16 and "perplexity" in stop["criteria"][0]
    go(editor(Exploding), out, settings, stop_on_collapse=True, resume=True)  # stays stopped
    assert read_results(out / "results.jsonl") == lines


def test_a_deferred_run_stops_on_the_evaluations_written_beside_it(tmp_path, data, monkeypatch):
    """eval-snapshots (here called from each edit, as --follow would beside the run) writes
    the evaluations; the deferred run reads them at its snapshots and stops at the collapse;
    a following evaluation ends with the run's last snapshot instead of waiting."""
    settings = EvalSettings(**{**data, "known_facts": None})
    out = tmp_path / "run"

    class Beside(Exploding):
        def edit(self, requests, batch_size=None, progress=True):
            fresh = Exploding(words=WORDS)
            run_mod.evaluate_snapshots(out, fresh.model, fresh.tokenizer, stream(), settings,
                                       progress=False)
            return super().edit(requests, batch_size, progress)

    go(editor(Beside), out, dataclasses.replace(settings, defer=True), batch_size=2,
       stop_on_collapse=True)
    lines = read_results(out / "results.jsonl")
    assert [x["batch"] for x in lines if x["type"] == "batch"] == [0, 1, 2, 3, 4]
    assert [x["edits_done"] for x in evals(out, "evals.jsonl")] == [0, 2, 4, 6, 8]
    stop = lines[-1]
    assert stop["type"] == "stopped" and (stop["collapsed_at"], stop["edits_done"]) == (6, 10)

    def no_wait(seconds):
        raise AssertionError("eval-snapshots --follow waited for a stopped run")

    monkeypatch.setattr(run_mod.time, "sleep", no_wait)
    fresh = Exploding(words=WORDS)
    run_mod.evaluate_snapshots(out, fresh.model, fresh.tokenizer, stream(), settings,
                               follow=True, progress=False)
    assert [x["edits_done"] for x in evals(out, "evals.jsonl")] == [0, 2, 4, 6, 8, 10]


def test_snapshot_evaluations_stop_after_a_collapse(tmp_path, data):
    """A deferred run is edited to its end; its snapshots are evaluated up to its collapse."""
    settings = EvalSettings(**{**data, "known_facts": None})
    out = tmp_path / "run"
    go(editor(Exploding), out, dataclasses.replace(settings, defer=True))
    assert len(list((out / "snapshots").glob("weights-*.safetensors"))) == N // 4 + 1
    for _ in range(2):  # (again: nothing more is evaluated)
        fresh = Exploding(words=WORDS)
        run_mod.evaluate_snapshots(out, fresh.model, fresh.tokenizer, stream(), settings,
                                   progress=False, stop_on_collapse=True)
        assert [x["edits_done"] for x in evals(out, "evals.jsonl")] == [0, 4, 8, 12, 16]
    fresh = Exploding(words=WORDS)  # (a fresh original: the last call loaded snapshots)
    run_mod.evaluate_snapshots(out, fresh.model, fresh.tokenizer, stream(), settings,
                               progress=False)  # (without the rule: every snapshot)
    assert [x["edits_done"] for x in evals(out, "evals.jsonl")] == list(range(0, N + 1, 4))


# --- immediate efficacy -----------------------------------------------------------------------

def test_immediate_efficacy_in_batch_lines_out_of_their_seconds(tmp_path, monkeypatch):
    real = run_mod.score_batch

    def slow(*args, **kw):
        time.sleep(0.3)
        return real(*args, **kw)

    monkeypatch.setattr(run_mod, "score_batch", slow)
    out = go(editor(), tmp_path / "run", EvalSettings(immediate=True, sample=4)).parent
    batches = [x for x in read_results(out / "results.jsonl") if x["type"] == "batch"]
    for b in batches:
        part = b["immediate"]
        assert part["n"] == 4 and part["seconds"] >= 0.3 > b["wall_seconds"]
        rows = read_outcomes(out / "outcomes" / f"batch-{b['batch']:05d}.jsonl.gz")[1]
        first = 4 * b["batch"]
        assert [r["record"] for r in rows] == list(range(first, first + 4))
        assert part["es"] == sum(r["es"] for r in rows) / 4 == part["top1"]
        assert part["es"] == sum(i in MADE for i in range(first, first + 4)) / 4
    row = summarize_run(load_run(out))
    assert row["sec_per_edit"] == pytest.approx(0.01)  # (FakeReport's: unchanged)
    assert isinstance(row["immediate_es"], Measure) and row["immediate_es"] == 0.5
    assert row["immediate_es"].estimate.n == N
    assert list(row).index("immediate_es") == list(row).index("s") + 1


# --- the study protocol, provenance -----------------------------------------------------------

def parse(args):
    parser = argparse.ArgumentParser()
    cli.add_eval_arguments(parser)
    return parser.parse_args(args)


def test_protocol_study_sets_what_it_says():
    quiet = ["--wikitext", "none", "--known-facts", "none"]
    study = cli.settings_from_args(parse(["--protocol", "study", *quiet]))
    assert {k: getattr(study, k) for k in STUDY} == STUDY == {
        "sampling": "edited", "sample": 1000, "downstream_n": 400, "known_n": None,
        "realistic": True, "forgetting": 1000, "immediate": True}
    assert study == EvalSettings.study(wikitext=None, known_facts=None)
    plain = cli.settings_from_args(parse(quiet))
    assert (plain.sampling, plain.sample, plain.known_n, plain.immediate) == (
        "stream", 100, 200, False)
    mine = cli.settings_from_args(parse(["--protocol", "study", "--eval-sample", "500",
                                         "--forgetting", "20", *quiet]))
    assert (mine.sample, mine.forgetting, mine.downstream_n) == (500, 20, 400)
    edited = cli.settings_from_args(parse(["--eval-sampling", "edited", *quiet]))
    assert edited.sampling == "edited" and not edited.immediate


def test_each_session_stamps_the_config(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        go(lambda: scripted(FakeEditor(words=WORDS, fail_at=2)), out, EvalSettings())
    first = json.loads((out / "config.json").read_text())["provenance"]
    assert len(first) == 1 and set(first[0]) == {"command", "commit", "versions", "machine",
                                                 "date"}
    go(editor(), out, EvalSettings(), resume=True)
    again = json.loads((out / "config.json").read_text())["provenance"]
    assert len(again) == 2 and again[0] == first[0]
