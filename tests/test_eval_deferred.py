"""The study protocol on a real (tiny, random) Llama: downstream chance levels from the scored
labels, and the deferred path end to end -- a run that only saves snapshots, evaluated later
with every metric (downstream tasks and the forgetting subset included, on hand-made data), gives
at each snapshot the scores and per-item outcomes of evaluating the live editor there."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from helpers import small_editor

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.downstream import f1_weighted
from encore_fast.eval.evaluator import Evaluator
from encore_fast.eval.outcomes import read_outcomes, rows_of
from encore_fast.eval.results import read_results
from encore_fast.eval.run import EvalSettings, evaluate_snapshots, run_sequential
from encore_fast.eval.snapshots import list_snapshots, read_snapshot
from encore_fast.requests import EditRequest

CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Vienna", "Oslo"]
CORPUS = [f"The weather in {c} was {w} on day {d}, and people walked to the market."
          for c in CITIES for w in ("cold", "warm", "grey") for d in (1, 2)] + [
          f"A short note number {i} about rivers, mountains and old roads." for i in range(8)]


def write_tasks(folder, golds: dict[str, list[int]]):
    """The six task files of eval/downstream.py, each one few-shot record then ``golds``."""
    folder.mkdir()

    def pair(g, i):
        return {"sentence1": f"The cat sat {i}.", "sentence2": f"A cat is sitting {i}.",
                "label": g}

    makers = {
        "sst2": lambda g, i: {"sentence": f"a film number {i}", "label": g},
        "mrpc": pair, "rte": pair,
        "cola": lambda g, i: {"sentence": f"The dog barks {i}.", "label": g},
        "nli": lambda g, i: {**pair(g, i), "label": ["entailment", "not_entailment"][g]},
        "mmlu": lambda g, i: {"question": f"What is {i} plus one?", "answer": g,
                              "choices": [str(i + 1), str(i), str(i + 2), str(i - 1)]},
    }
    for task, make in makers.items():
        gold = golds.get(task, [0, 1, 0, 1])
        (folder / f"{task}.json").write_text(json.dumps(
            [make(0, 99)] + [make(g, i) for i, g in enumerate(gold)]))
    return folder


def test_chance_levels_from_the_scored_labels(tiny_models, tokenizer, tmp_path):
    folder = write_tasks(tmp_path / "down", {"mmlu": [0, 1, 2, 3] * 2, "sst2": [1, 1, 1, 0]})
    settings = EvalSettings(downstream=str(folder), downstream_n=400, downstream_shots=1)
    ev = Evaluator(tokenizer, [], settings)
    line = ev(tiny_models["llama"], 0)["downstream"]
    mmlu, sst2, mrpc = line["mmlu"], line["sst2"], line["mrpc"]
    assert (mmlu["n"], mmlu["majority_acc"]) == (8, 0.25)  # all of a file's examples
    assert mmlu["majority_f1"] == pytest.approx(0.10)  # 4 balanced classes
    assert sst2["majority_acc"] == 0.75 and sst2["majority_f1"] == pytest.approx(0.75 * 6 / 7)
    assert mrpc["majority_acc"] == 0.5 and mrpc["majority_f1"] == pytest.approx(1 / 3)
    examples = rows_of(ev.outcomes, "downstream")
    assert len(examples) == sum(v["n"] for v in line.values() if isinstance(v, dict))
    for task in ("mmlu", "sst2"):
        mine = [r for r in examples if r["task"] == task]
        gold, pred = [r["gold"] for r in mine], [r["pred"] for r in mine]
        assert line[task]["f1"] == f1_weighted(gold, pred, 4 if task == "mmlu" else 2)
    few = EvalSettings(downstream=str(folder), downstream_n=3, downstream_shots=1)
    assert Evaluator(tokenizer, [], few)(tiny_models["llama"], 0)["downstream"]["mmlu"]["n"] == 3


def records() -> list[EvalRecord]:
    return [EvalRecord(EditRequest(f"{c} is the capital of", c, "Japan", "France", case_id=i),
                       "counterfact", [f"The city of {c} is the capital of"],
                       ["Lyon is a city in", "Nice is a city in"], "France", index=i)
            for i, c in enumerate(CITIES)]


def test_deferred_evaluation_matches_the_live_editor(tiny_models, tokenizer, tmp_path):
    model = tiny_models["llama"]
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" ".join(CORPUS) * 3)
    known = tmp_path / "known.json"
    known.write_text(json.dumps([{"prompt": f"{c} is a city in", "attribute": "Europe"}
                                 for c in CITIES]))
    settings = EvalSettings(
        sampling="edited", sample=4, batch_size=8, wikitext=str(wiki), ppl_tokens=64,
        ppl_window=16, known_facts=str(known), known_n=None,
        downstream=str(write_tasks(tmp_path / "down", {})), downstream_n=4,
        downstream_shots=1, realistic=True, realistic_neighbours=1, forgetting=2)
    kw = {"batch_size": 2, "eval_every": 1, "progress": False, "make_plots": False}

    def factory():
        return small_editor(copy.deepcopy(model), tokenizer, CORPUS)

    torch.manual_seed(0)
    inline = run_sequential(factory, records(), tmp_path / "inline", settings=settings, **kw)
    out = tmp_path / "deferred"
    torch.manual_seed(0)
    run_sequential(factory, records(), out, settings=dataclasses.replace(settings, defer=True),
                   **kw)
    snaps = list_snapshots(out / "snapshots")
    assert list(snaps) == [0, 1, 2, 3]
    weights = [read_snapshot(p)[0] for p in snaps.values()]
    for before, after in zip(weights, weights[1:], strict=False):  # each batch moved them
        assert any(not torch.equal(before[k], after[k]) for k in before)
    evaluate_snapshots(out, copy.deepcopy(model), tokenizer, records(), settings,
                       progress=False)
    got = [x for x in read_results(out / "evals.jsonl") if x["type"] == "eval"]
    want = [x for x in read_results(inline) if x["type"] == "eval"]
    strip = lambda x: {k: v for k, v in x.items() if k != "seconds"}  # noqa: E731
    assert [strip(x) for x in got] == [strip(x) for x in want]
    for line in got:
        k = line["batches"]
        mine = read_outcomes(out / "outcomes" / f"snapshot-{k:05d}.jsonl.gz")[1]
        live = read_outcomes(inline.parent / "outcomes" / f"eval-{k:05d}.jsonl.gz")[1]
        assert mine == live
        assert set(line["downstream"]["sst2"]) >= {"f1", "n", "majority_acc", "majority_f1"}
        assert len(rows_of(mine, "downstream")) == 6 * 4
        assert ("forgetting" in line) == (k > 0)
        if k:
            first = rows_of(mine, "forgetting")
            assert [r["record"] for r in first] == [0, 1]
            assert line["forgetting"]["real_es"] == sum(r["real_es"] for r in first) / 2
    assert got[0]["metrics"] != got[-1]["metrics"] or got[0]["perplexity"] != \
        got[-1]["perplexity"]  # (the edits changed the model's scores)


def test_the_unedited_evaluation_answers_every_record_a_later_one_scores(tiny_models,
                                                                          tokenizer):
    """Realistic NS compares with the unedited model's answers: the first evaluation answers
    the neighbourhood prompts of every record the nested sample scores at any later point, so
    each point's NS rests on all its scored records (here the unedited model again: NS 1);
    a baseline that lacks some is refused, not silently narrowed."""
    from encore_fast.eval.protocol import ever_scored, scored_facts
    from encore_fast.eval.results import RunConfigError

    stream = [EvalRecord(EditRequest(f"{c} is the capital of", c, "Japan", "France",
                                     case_id=i), "counterfact", [],
                         [f"The river of {c} flows into the"], "sea", index=i)
              for i, c in enumerate(CITIES)]
    settings = EvalSettings(sampling="edited", sample=2, batch_size=4, wikitext=None,
                            known_facts=None, realistic=True, realistic_neighbours=1)
    model = tiny_models["llama"]
    ev = Evaluator(tokenizer, stream, settings)
    first = {"edits_done": 0, "type": "eval", **ev(model, 0)}
    answered = set(first["neighbour_answers"])
    wanted = ever_scored(len(stream), 2)
    assert len(wanted) > 2  # (more than the first evaluation scores itself)
    assert answered == {stream[i].neighborhood_prompts[0] for i in wanted}
    for edits in range(1, len(stream) + 1):
        line = ev(model, edits)["metrics"]
        assert line["n_records"] == len(scored_facts(len(stream), edits, 2))
        assert line["n_real_ns"] == line["n_records"] and line["real_ns"] == 1.0
    own = {stream[i].neighborhood_prompts[0] for i in scored_facts(len(stream), 0, 2)}
    narrowed = {**first, "neighbour_answers": {  # (as before the fix: its own records only)
        p: a for p, a in first["neighbour_answers"].items() if p in own}}
    again = Evaluator(tokenizer, stream, settings)
    again.restore([narrowed])
    with pytest.raises(RunConfigError, match="no neighbourhood answers for"):
        for edits in range(1, len(stream) + 1):
            again(model, edits)
