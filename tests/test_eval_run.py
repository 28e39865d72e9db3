"""Sequential runs: results file, evaluations, interruption and resume, config checks."""

from __future__ import annotations

import json

import pytest

import encore_fast.eval.run as run_mod
import encore_fast.eval.runfolder as folder_mod
from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.run import (
    EvalSettings,
    Evaluator,
    RunConfigError,
    read_results,
    run_sequential,
)
from encore_fast.eval.scores import Forgetting
from encore_fast.eval.testing import FakeEditor
from encore_fast.requests import EditRequest


def stream(n=10):
    return [
        EvalRecord(
            EditRequest(f"x{i} lives in", f"x{i}", "y", "z", case_id=i),
            "counterfact",
            ["x lives in"],
            ["x is in"],
            "z",
            index=i,
        )
        for i in range(n)
    ]


@pytest.fixture
def settings(tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text("x y z " * 40)
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"prompt": "x is", "attribute": "y"}] * 3))
    return EvalSettings(wikitext=str(wiki), ppl_tokens=32, ppl_window=8, known_facts=str(known))


def batches_of(path):
    return [x["batch"] for x in read_results(path) if x["type"] == "batch"]


def evals_of(path):
    return [x["batches"] for x in read_results(path) if x["type"] == "eval"]


def go(editor, out, settings, **kw):
    kw = {
        "num_edits": 10,
        "batch_size": 3,
        "eval_every": 2,
        "progress": False,
        "make_plots": False,
        **kw,
    }
    return run_sequential(editor, stream(), out, settings=settings, **kw)


def test_full_run_writes_batches_and_evaluations(tmp_path, settings):
    pytest.importorskip("matplotlib")
    log: list = []
    results = go(lambda: FakeEditor(log), tmp_path / "run", settings, make_plots=True)
    assert log == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    lines = read_results(results)
    assert [x["batch"] for x in lines if x["type"] == "batch"] == [0, 1, 2, 3]
    evals = [x for x in lines if x["type"] == "eval"]
    assert [e["batches"] for e in evals] == [0, 2, 4]  # start, every 2 batches, end
    assert [e["edits_done"] for e in evals] == [0, 6, 10]
    assert [e["metrics"]["n_records"] for e in evals] == [10, 6, 10]
    assert evals[0]["weight_norms"] == {"1": 1.0, "2": 2.0}
    assert evals[-1]["weight_norms"]["2"] == pytest.approx(2 * 1.1)
    assert all(e["perplexity"] > 1 and e["known_acc"] is not None for e in evals)
    assert evals[-1]["known_retained"] is None or 0 <= evals[-1]["known_retained"] <= 1
    last_batch = [x for x in lines if x["type"] == "batch"][-1]
    assert last_batch["n_requests"] == 1 and last_batch["edits_done"] == 10
    assert last_batch["steps"] == [3] and "wall_seconds" in last_batch
    assert sorted(p.name for p in (tmp_path / "run").glob("edits-*")) == ["edits-00004.safetensors"]
    assert {p.name for p in (tmp_path / "run" / "plots").iterdir()} == {
        "norm_growth.png",
        "metrics.png",
        "perplexity.png",
    }


def test_interrupted_run_resumes_without_redoing_batches(tmp_path, settings):
    log: list = []
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="interrupted"):
        go(lambda: FakeEditor(log, fail_at=2), out, settings)
    assert log == [[0, 1, 2], [3, 4, 5]]
    assert batches_of(out / "results.jsonl") == [0, 1]
    # a write torn by the interruption
    with open(out / "results.jsonl", "ab") as fh:
        fh.write(b'{"type": "batch", "ba')
    go(lambda: FakeEditor(log), out, settings, resume=True)
    assert log == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # batches 0 and 1 not redone
    assert batches_of(out / "results.jsonl") == [0, 1, 2, 3]
    assert evals_of(out / "results.jsonl") == [0, 2, 4]
    assert b'"ba\n' not in (out / "results.jsonl").read_bytes()
    # resuming a finished run does nothing more
    go(lambda: FakeEditor(log), out, settings, resume=True)
    assert len(log) == 4 and evals_of(out / "results.jsonl") == [0, 2, 4]


def test_interrupted_after_saving_before_logging(tmp_path, settings, monkeypatch):
    log: list = []
    out = tmp_path / "run"
    real_append = folder_mod.append_jsonl  # (the run folder appends the lines)

    def append(path, line):
        if line.get("type") == "batch" and line.get("batch") == 1:
            raise KeyboardInterrupt
        real_append(path, line)

    monkeypatch.setattr(folder_mod, "append_jsonl", append)
    with pytest.raises(KeyboardInterrupt):
        go(lambda: FakeEditor(log), out, settings)
    monkeypatch.setattr(folder_mod, "append_jsonl", real_append)
    go(lambda: FakeEditor(log), out, settings, resume=True)
    assert log == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    lines = read_results(out / "results.jsonl")
    # The line saved with the edits is written as it was: the same as an uninterrupted run's.
    whole = go(lambda: FakeEditor(), tmp_path / "whole", settings)
    untimed = [{k: v for k, v in x.items() if "seconds" not in k}
               for x in read_results(whole) if x["type"] == "batch"]
    recovered = [{k: v for k, v in x.items() if "seconds" not in k}
                 for x in lines if x["type"] == "batch" and x["batch"] == 1]
    assert recovered == [untimed[1]] and "recovered" not in recovered[0]
    assert recovered[0]["weight_norms"]["1"] == pytest.approx(1.06)
    assert batches_of(out / "results.jsonl") == [0, 1, 2, 3]
    assert evals_of(out / "results.jsonl") == [0, 2, 4]


def test_interrupted_evaluation_is_redone_once(tmp_path, settings, monkeypatch):
    log: list = []
    out = tmp_path / "run"
    real_call = Evaluator.__call__
    failed = []

    def flaky(self, model, edits_done):
        if edits_done == 6 and not failed:
            failed.append(1)
            raise KeyboardInterrupt
        return real_call(self, model, edits_done)

    monkeypatch.setattr(Evaluator, "__call__", flaky)
    with pytest.raises(KeyboardInterrupt):
        go(lambda: FakeEditor(log), out, settings)
    assert evals_of(out / "results.jsonl") == [0]
    go(lambda: FakeEditor(log), out, settings, resume=True)
    assert log == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert evals_of(out / "results.jsonl") == [0, 2, 4]


def test_refuses_changed_config_and_accidental_reuse(tmp_path, settings):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        go(lambda: FakeEditor(fail_at=1), out, settings)
    with pytest.raises(RunConfigError, match="already holds a run"):
        go(lambda: FakeEditor(), out, settings)
    with pytest.raises(RunConfigError, match="batch_size"):
        go(lambda: FakeEditor(), out, settings, batch_size=4, resume=True)
    with pytest.raises(RunConfigError, match="stream_sha256"):
        run_sequential(
            FakeEditor,
            stream()[::-1],
            out,
            num_edits=10,
            batch_size=3,
            eval_every=2,
            settings=settings,
            resume=True,
            progress=False,
            make_plots=False,
        )
    edited = FakeEditor()
    edited.edit([stream()[0].request])
    with pytest.raises(RunConfigError, match="unedited editor"):
        go(edited, out, settings, resume=True)


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n{oops\n{"b": 2}\n')
    with pytest.raises(RunConfigError, match="line 2"):
        read_results(path)
    path.write_text('{"a": 1}\n{"b": 2')
    assert read_results(path, repair=True) == [{"a": 1}]
    assert path.read_text() == '{"a": 1}\n'


def test_fixed_evaluation_sample():
    ev = Evaluator(FakeEditor().tokenizer, stream(10), EvalSettings(sample=4, seed=1))
    first = [r.index for r in ev.records_at(0)]
    again = Evaluator(FakeEditor().tokenizer, stream(10), EvalSettings(sample=4, seed=1))
    assert len(first) == 4 and [r.index for r in again.records_at(0)] == first
    assert [r.index for r in ev.records_at(5)] == [i for i in first if i < 5]


def test_conflicting_records_move_to_the_next_batch():
    recs = stream(7)
    twin = EvalRecord(EditRequest("x1 lives in", "x1", "other", "z", case_id=99), "counterfact",
                      index=99)  # same prompt and subject as record 1, another target
    order, moved = run_mod.arrange_batches(recs[:3] + [twin] + recs[3:], 3)
    assert moved == [99]
    assert [r.index for r in order] == [0, 1, 2, 99, 3, 4, 5, 6]  # front of the next batch
    for start in range(0, len(order), 3):
        keys = [(r.request.text, r.request.subject) for r in order[start : start + 3]]
        assert len(set(keys)) == len(keys)
    same, none = run_mod.arrange_batches(recs, 3)
    assert same == recs and none == []


def test_deferred_run_snapshots_then_evaluated_like_inline(tmp_path, settings):
    import dataclasses

    from encore_fast.eval.run import EVALS_FILE, evaluate_snapshots
    from encore_fast.eval.snapshots import list_snapshots

    inline = go(lambda: FakeEditor(), tmp_path / "inline", settings)
    deferred = dataclasses.replace(settings, defer=True)
    out = tmp_path / "deferred"
    results = go(lambda: FakeEditor(), out, deferred)
    assert evals_of(results) == []  # the run itself only edits and saves snapshots
    assert list(list_snapshots(out / "snapshots")) == [0, 2, 4]
    ed = FakeEditor()
    evaluate_snapshots(out, ed.model, ed.tokenizer, stream(), settings, progress=False)
    evaluate_snapshots(out, ed.model, ed.tokenizer, stream(), settings, progress=False)  # no-op
    got = [x for x in read_results(out / EVALS_FILE) if x["type"] == "eval"]
    want = [x for x in read_results(inline) if x["type"] == "eval"]
    strip = lambda x: {k: v for k, v in x.items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in got] == [strip(x) for x in want]
    with pytest.raises(RunConfigError, match="not the run's edit stream"):
        evaluate_snapshots(out, ed.model, ed.tokenizer, stream(11)[1:], settings)


def test_forgetting_curve_scores_the_first_edited_facts(settings, monkeypatch):
    import dataclasses

    seen = []
    ed = FakeEditor()
    ev = Evaluator(ed.tokenizer, stream(), dataclasses.replace(settings, forgetting=4))
    monkeypatch.setattr(Forgetting, "first_facts",
                        lambda self, point, first: seen.append([r.index for r in first]) or {})
    for done in (0, 3, 6, 10):
        line = ev(ed.model, done)
        assert ("forgetting" in line) == (done > 0)
    assert seen == [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_snapshots_are_evaluated_only_at_the_edit_counts_asked_for(tmp_path, settings):
    import dataclasses

    from encore_fast.eval.cli import edit_counts
    from encore_fast.eval.run import EVALS_FILE, evaluate_snapshots

    out = tmp_path / "deferred"
    go(lambda: FakeEditor(), out, dataclasses.replace(settings, defer=True), eval_every=1)
    ed = FakeEditor()
    evaluate_snapshots(out, ed.model, ed.tokenizer, stream(), settings, at=edit_counts("0"),
                       progress=False)  # (the unedited model alone)
    assert [x["edits_done"] for x in read_results(out / EVALS_FILE)] == [0]
    with pytest.raises(RunConfigError, match=r"no batch of this run ends at \[5\] edits"):
        evaluate_snapshots(out, ed.model, ed.tokenizer, stream(), settings, at=[5],
                           progress=False)
    evaluate_snapshots(out, ed.model, ed.tokenizer, stream(), settings, at=[6, 10],
                       progress=False)
    got = [x["edits_done"] for x in read_results(out / EVALS_FILE) if x["type"] == "eval"]
    assert got == [0, 6, 10]  # (batches of 3: 3, 6, 9 and the last, 10, were snapshotted)
    evaluate_snapshots(out, ed.model, ed.tokenizer, stream(), settings, progress=False)
    got = [x["edits_done"] for x in read_results(out / EVALS_FILE) if x["type"] == "eval"]
    assert sorted(got) == [0, 3, 6, 9, 10]  # the rest later, on request
    assert edit_counts("1000, 2000,7500") == [1000, 2000, 7500]
    for bad in ("", "ten", "-1,5"):
        with pytest.raises(Exception, match="numbers of edits"):
            edit_counts(bad)
