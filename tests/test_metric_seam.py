"""A new evaluation metric is one object and one registration, in user code: "mean_logit"
(defined here alone, with one setting and one CLI option) shows up in a real run's evaluation
lines, in the CLI, in the summary table and in the plots, and is gone once unregistered. The
built-in metrics still write today's evaluation lines."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import pytest
import torch
from helpers import small_editor

import encore_fast.eval.cli as eval_cli
from encore_fast.cli import build_parser
from encore_fast.eval import EvalSettings, Figure, Metric, Option, Series, run_sequential
from encore_fast.eval.datasets import load_dataset, parse_records
from encore_fast.eval.degradation import wikitext_perplexity
from encore_fast.eval.evaluator import Evaluator
from encore_fast.eval.registry import register, registered, unregister
from encore_fast.eval.report import load_run, markdown_table, summarize_run
from encore_fast.eval.results import read_results
from encore_fast.eval.seam import first_value
from encore_fast.eval.testing import FakeEditor
from encore_fast.requests import encode

pytest.importorskip("matplotlib")
from encore_fast.eval.plots import draw_figure, metrics_figure, plot_runs  # noqa: E402


@torch.no_grad()
def top_logit(model, tokenizer, prompts) -> float:
    """Mean over prompts of the largest next-token logit."""
    values = [model(input_ids=torch.tensor([encode(tokenizer, p)])).logits[0, -1].max()
              for p in prompts]
    return float(sum(values) / len(values))


class MeanLogit(Metric):
    """The mean top next-token logit after the first sampled records' rewrite prompts, and its
    change since the unedited model (its baseline)."""

    name = "mean_logit"
    settings = {"mean_logit_records": 0}
    options = (Option("--mean-logit-records", "mean_logit_records", type=int, minimum=0,
                      default=0, help="records whose top logit is averaged (0: off)"),)
    series = (Series("mean_logit", bounded=False),)
    figures = (Figure("mean_logit.png", lambda runs: [Series("mean_logit_change", "change",
                                                             bounded=False)], cols=1),)

    def enabled(self, settings):
        return self.setting(settings, "mean_logit_records") > 0

    def prepare(self, tokenizer, stream, settings):
        return {"baseline": None}

    def restore(self, data, lines):
        data["baseline"] = first_value(lines, "mean_logit_baseline")

    def evaluate(self, point, data):
        n = self.setting(point.settings, "mean_logit_records")
        value = top_logit(point.model, point.tokenizer,
                          [rec.request.text for rec in point.records[:n]])
        out = {"metrics": {"mean_logit": value}}
        if data["baseline"] is None:
            data["baseline"] = out["mean_logit_baseline"] = value
        out["mean_logit_change"] = value - data["baseline"]
        return out


@pytest.fixture
def mean_logit():
    metric = register(MeanLogit())
    yield metric
    unregister(metric.name)


def eval_parser():
    parser = argparse.ArgumentParser()
    eval_cli.add_eval_arguments(parser)
    return parser


def test_registered_metric_in_a_real_run_report_and_plot(mean_logit, tiny_models, tokenizer,
                                                         corpus, data_dir, tmp_path):
    records = load_dataset(data_dir / "counterfact" / "counterfact-edit.json", limit=4)
    model = tiny_models["llama"]
    out = tmp_path / "run"
    settings = EvalSettings(metric_settings={"mean_logit_records": 2})
    run_sequential(lambda: small_editor(copy.deepcopy(model), tokenizer, corpus), records, out,
                   batch_size=2, eval_every=1, settings=settings, progress=False)
    evals = [x for x in read_results(out / "results.jsonl") if x["type"] == "eval"]
    assert [x["edits_done"] for x in evals] == [0, 2, 4]
    values = [x["metrics"]["mean_logit"] for x in evals]
    want = top_logit(model, tokenizer, [rec.request.text for rec in records[:2]])
    assert values[0] == pytest.approx(want)  # the unedited model's
    assert evals[0]["mean_logit_baseline"] == values[0]
    assert "mean_logit_baseline" not in evals[1]
    assert [x["mean_logit_change"] for x in evals] == pytest.approx([v - values[0]
                                                                     for v in values])
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["metric_settings"] == {"mean_logit_records": 2}
    # the baseline comes back in a new session
    ev = Evaluator(tokenizer, records, settings)
    ev.restore(evals)
    again = ev(model, 4)
    assert "mean_logit_baseline" not in again
    assert again["mean_logit_change"] == pytest.approx(again["metrics"]["mean_logit"] - values[0])
    # the report: its column
    run = load_run(out)
    row = summarize_run(run)
    assert row["mean_logit"] == values[-1]
    assert "| mean_logit |" in markdown_table([row])
    # the plots: its panel in metrics.png, and its own figure
    fig = draw_figure(metrics_figure(), [run])
    panel = next(ax for ax in fig.axes if ax.get_title() == "mean_logit")
    assert list(panel.lines[0].get_xdata()) == [0, 2, 4]
    assert list(panel.lines[0].get_ydata()) == pytest.approx(values)
    assert (out / "plots" / "mean_logit.png").exists()  # (the run drew its plots)
    names = [p.name for p in plot_runs([out], tmp_path / "plots")]
    assert names == ["norm_growth.png", "metrics.png", "perplexity.png", "mean_logit.png"]


def easyedit(n):
    return [{"case_id": i, "prompt": f"x{i} lives in", "subject": f"x{i}", "target_new": "y",
             "ground_truth": "z", "rephrase_prompt": f"where x{i} lives",
             "locality_prompt": "x lives in", "locality_ground_truth": "z"} for i in range(n)]


def test_registered_metric_in_the_cli(mean_logit, tmp_path, monkeypatch, capsys):
    no_data = ["--wikitext", "none", "--known-facts", "none"]  # (the metric's option alone)
    args = eval_parser().parse_args(["--mean-logit-records", "3", *no_data])
    settings = eval_cli.settings_from_args(args)
    assert settings.metric_settings == {"mean_logit_records": 3}
    assert mean_logit.enabled(settings)
    default = eval_cli.settings_from_args(eval_parser().parse_args(no_data))
    assert default.metric_settings == {} and not mean_logit.enabled(default)
    assert "records whose top logit is averaged" in eval_parser().format_help()
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--mean-logit-records", "-1"])
    main = build_parser().parse_args(["eval", "--mean-logit-records", "2"])  # the main CLI
    assert main.mean_logit_records == 2
    capsys.readouterr()
    # a whole `encore-fast eval` run with it
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(easyedit(4)))
    monkeypatch.setattr(eval_cli, "editor_factory", lambda args, method, overrides: FakeEditor)
    out = tmp_path / "r"
    args = eval_parser().parse_args(
        ["--dataset", str(data), "--num-edits", "4", "--batch-size", "2", "--wikitext", "none",
         "--known-facts", "none", "--out", str(out), "--quiet", "--no-plots",
         "--mean-logit-records", "2"])
    assert eval_cli.run_eval(args) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "| mean_logit |" in header
    evals = [x for x in read_results(out / "results.jsonl") if x["type"] == "eval"]
    assert all(isinstance(x["metrics"]["mean_logit"], float) for x in evals)


class Clash(Metric):
    name = "clash"
    settings = {"mean_logit_records": 1}


def test_unregistered_metric_is_gone_and_registration_is_checked(tmp_path):
    metric = register(MeanLogit())
    try:
        assert metric in registered()
        with pytest.raises(ValueError, match="already registered"):
            register(MeanLogit())
        with pytest.raises(ValueError, match="belongs to 'mean_logit'"):
            register(Clash())
    finally:
        unregister("mean_logit")
    assert "mean_logit" not in [m.name for m in registered()]
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["--mean-logit-records", "2"])
    with pytest.raises(ValueError, match="belong to no registered metric"):
        Evaluator(FakeEditor().tokenizer, [],
                  EvalSettings(metric_settings={"mean_logit_records": 2}))
    out = tmp_path / "run"
    run_sequential(FakeEditor, parse_records(easyedit(2)), out, batch_size=2, progress=False,
                   make_plots=False)
    assert "mean_logit" not in summarize_run(load_run(out))


BUILTIN = ["counterfact", "immediate", "realistic", "chat", "generation", "zsre", "perplexity",
           "known_facts", "weight_norms", "edit_time", "downstream", "forgetting"]
# (the issue "A benchmark you can trust" added the n beside each score: n_<score>, n_known,
# n_known_before, n_ppl_windows, n_ppl_tokens, and real_s)
LINE = {"type", "batches", "edits_done", "metrics", "downstream", "perplexity", "known_acc",
        "known_correct", "known_retained", "weight_norms", "seconds", "n_known",
        "n_known_before", "n_ppl_windows", "n_ppl_tokens"}
METRICS = {"n_records", "es", "ps", "ns", "s", "ge", "real_es", "real_ps", "real_ns",
           "real_s", "n_es", "n_ps", "n_ns", "n_real_es", "n_real_ps", "n_real_ns"}
SETTINGS = {"sample", "seed", "batch_size", "generation_tokens", "generation_source",
            "wikitext", "ppl_tokens", "ppl_window", "known_facts", "known_n", "downstream",
            "downstream_n", "downstream_shots", "realistic", "realistic_neighbours",
            "forgetting", "defer"}


def test_builtin_metrics_write_todays_evaluation_lines(tiny_models, tokenizer, corpus,
                                                      data_dir, tmp_path):
    assert [m.name for m in registered()] == BUILTIN
    records = load_dataset(data_dir / "counterfact" / "counterfact-edit.json", limit=4)
    records = [dataclasses.replace(rec, generation_prompts=[f"{rec.request.subject} is"])
               for rec in records]  # (for GE)
    model = tiny_models["llama"]
    wiki = data_dir / "wikitext-2" / "test.txt"
    settings = EvalSettings(
        sample=3, batch_size=4, generation_tokens=4, wikitext=str(wiki), ppl_tokens=256,
        ppl_window=64, known_facts=str(data_dir / "known_1000.json"), known_n=8,
        downstream=str(data_dir / "downstream"), downstream_n=2, downstream_shots=1,
        realistic=True, realistic_neighbours=1, forgetting=2)
    out = tmp_path / "run"
    run_sequential(lambda: small_editor(copy.deepcopy(model), tokenizer, corpus), records, out,
                   batch_size=2, eval_every=1, settings=settings, progress=False,
                   make_plots=False)
    evals = [x for x in read_results(out / "results.jsonl") if x["type"] == "eval"]
    assert set(evals[0]) == LINE | {"neighbour_answers"}
    assert all(set(x) == LINE | {"forgetting"} for x in evals[1:])
    assert all(set(x["metrics"]) == METRICS for x in evals)
    assert all(set(x["forgetting"]) == {"n_records", "es", "ps", "s", "real_es", "n_es",
                                        "n_ps", "n_real_es"} for x in evals[1:])
    assert evals[0]["metrics"]["real_ns"] == 1.0
    assert evals[0]["perplexity"] == pytest.approx(
        wikitext_perplexity(model, tokenizer, wiki, 256, 64))
    config = json.loads((out / "config.json").read_text())
    assert set(config["settings"]) == SETTINGS  # (as runs written before: they resume)
    row = summarize_run(load_run(out))
    assert list(row) == ["run", "edits", "es", "ps", "ns", "s", "real_es", "real_ps", "real_ns",
                         "real_s", "ge", "ppl_before", "ppl_after", "ppl_ratio", "known_before",
                         "known_after", "known_retained", "norm_growth", "sec_per_edit",
                         "downstream_f1", "informative_f1", "informative", "forget_es",
                         "collapse"]  # (the last ones: from the outcome files)
