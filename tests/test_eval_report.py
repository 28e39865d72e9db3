"""Run summaries, tables, plots, the ``eval`` CLI and the method-comparison script."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import encore_fast.eval.cli as cli  # noqa: E402
from encore_fast.eval.plots import plot_runs  # noqa: E402
from encore_fast.eval.report import csv_table, load_run, markdown_table, summarize_run  # noqa: E402
from encore_fast.eval.run import EvalSettings, run_sequential  # noqa: E402
from encore_fast.eval.testing import FakeEditor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def easyedit(n):
    return [
        {
            "case_id": i,
            "prompt": f"x{i} lives in",
            "subject": f"x{i}",
            "target_new": "y",
            "ground_truth": "z",
            "rephrase_prompt": f"where x{i} lives",
            "locality_prompt": "x lives in",
            "locality_ground_truth": "z",
        }
        for i in range(n)
    ]


def fake_run(tmp_path, name, batch_size):
    from encore_fast.eval.datasets import parse_records

    records = parse_records(easyedit(8))
    out = tmp_path / name
    run_sequential(
        FakeEditor,
        records,
        out,
        batch_size=batch_size,
        eval_every=1,
        settings=EvalSettings(),
        progress=False,
        make_plots=False,
        run_info={"label": name},
    )
    return out


def test_summary_and_tables(tmp_path):
    out = fake_run(tmp_path, "a", 4)
    row = summarize_run(load_run(out))
    assert row["run"] == "a" and row["edits"] == 8
    assert row["norm_growth"] == pytest.approx(1.08)  # FakeEditor: +1% per edit, both layers
    assert row["sec_per_edit"] == pytest.approx(0.01)  # FakeReport: 0.01 s per request
    assert row["es"] == 0.0 and row["s"] == 0.0  # uniform LM: ties fail
    md = markdown_table([row, dict(row, run="b")])
    assert md.splitlines()[0].startswith("| run | edits | es |")
    assert md.count("\n") == 4
    parsed = list(csv.DictReader(io.StringIO(csv_table([row]))))
    assert float(parsed[0]["norm_growth"]) == pytest.approx(1.08)


def test_plots_overlay_runs(tmp_path):
    dirs = [fake_run(tmp_path, "a", 4), fake_run(tmp_path, "b", 2)]
    edits, ratios = load_run(dirs[1]).norm_series()
    assert edits == [0, 2, 4, 6, 8] and ratios[2] == pytest.approx([1, 1.02, 1.04, 1.06, 1.08])
    paths = plot_runs(dirs, tmp_path / "plots")
    assert [p.name for p in paths] == ["norm_growth.png", "metrics.png", "perplexity.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def parse(args):
    parser = argparse.ArgumentParser()
    cli.add_eval_arguments(parser)
    return parser.parse_args(args)


def test_eval_cli(tmp_path, monkeypatch, capsys):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(easyedit(6)))
    made = []

    def factory(args, method, overrides):
        made.append((method, overrides))
        return FakeEditor

    monkeypatch.setattr(cli, "editor_factory", factory)
    args = parse(
        [
            "--dataset",
            str(data),
            "--num-edits",
            "6",
            "--batch-size",
            "3",
            "--wikitext",
            "none",
            "--known-facts",
            "none",
            "--out",
            str(tmp_path / "r"),
            "--set",
            "lambda_p=150",
            "--set",
            "layers=[4,5]",
            "--quiet",
            "--no-plots",
        ]
    )
    assert cli.run_eval(args) == 0
    assert made == [("encore", {"lambda_p": 150, "layers": [4, 5]})]
    assert "| run | edits |" in capsys.readouterr().out
    assert len(load_run(tmp_path / "r").batches) == 2
    # a second start without --resume is refused with a message, not a traceback
    assert cli.run_eval(args) == 2
    assert "--resume" in capsys.readouterr().err
    args.resume = True
    assert cli.run_eval(args) == 0
    assert cli.run_eval(parse(["--dataset", str(tmp_path / "missing.json")])) == 2


def test_compare_methods_script(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "compare_methods", ROOT / "benchmarks" / "compare_methods.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(easyedit(4)))
    seen = []

    def factory(args, method, overrides):
        seen.append((method, overrides))
        return FakeEditor

    monkeypatch.setattr(mod, "editor_factory", factory)
    out = tmp_path / "cmp"
    rc = mod.main(
        [
            "--dataset",
            str(data),
            "--num-edits",
            "4",
            "--batch-size",
            "2",
            "--wikitext",
            "none",
            "--known-facts",
            "none",
            "--out",
            str(out),
            "--quiet",
            "--methods",
            "encore",
            "memit",
            "--method-set",
            "encore:lambda_p=150",
        ]
    )
    assert rc == 0
    assert seen == [("encore", {"lambda_p": 150}), ("memit", {})]
    table = (out / "table.md").read_text()
    assert "| encore |" in table and "| memit |" in table
    assert (out / "table.csv").exists() and (out / "plots" / "norm_growth.png").exists()
    assert "| encore |" in capsys.readouterr().out


class OtherSites(FakeEditor):
    """Edits named sites beside an MLP output (UltraEdit's gate and up projections)."""

    def weight_norms(self):
        grow = 1 + 0.01 * self.num_edits
        return {12: 1.0 * grow, "mlp_up.3": 2.0 * grow, "mlp_gate.10": 3.0 * grow,
                "mlp_gate.9": 4.0}


def test_named_sites_in_the_norms_summary_and_plots(tmp_path):
    from encore_fast.eval.datasets import parse_records

    records = parse_records(easyedit(8))
    out = tmp_path / "sites"
    run_sequential(OtherSites, records, out, batch_size=4, eval_every=1, settings=EvalSettings(),
                   progress=False, make_plots=False, run_info={"label": "sites"})
    run = load_run(out)
    edits, ratios = run.norm_series()
    assert list(ratios) == [12, "mlp_gate.9", "mlp_gate.10", "mlp_up.3"]  # read back, in order
    assert ratios["mlp_gate.10"] == pytest.approx([1, 1.04, 1.08]) and edits == [0, 4, 8]
    assert summarize_run(run)["norm_growth"] == pytest.approx((3 * 1.08 + 1) / 4)
    (path,) = [p for p in plot_runs([out], tmp_path / "plots") if p.name == "norm_growth.png"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
