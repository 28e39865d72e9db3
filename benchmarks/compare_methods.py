"""Compare ENCORE, MEMIT and AlphaEdit on the same sequential edit stream and model.

Each method gets its own resumable run in ``<out>/<method>`` (see encore_fast.eval.run); then
a table (``<out>/table.md``, ``<out>/table.csv``) of final ES/PS/NS/S (or zsRE accuracies),
perplexity before/after, known-fact accuracy and retention, mean final norm growth
(``||W||/||W_0||`` over the edited layers) and seconds per edit, and the overlaid plots in
``<out>/plots``.

    python benchmarks/compare_methods.py --num-edits 500 --batch-size 100 \
        --out benchmarks/results/compare --method-set encore:lambda_p=150
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from encore_fast.config import parse_overrides
from encore_fast.eval.cli import (
    add_common_arguments,
    editor_factory,
    records_from_args,
    run_info,
    settings_from_args,
)
from encore_fast.eval.datasets import DatasetError
from encore_fast.eval.plots import plot_runs
from encore_fast.eval.report import csv_table, load_run, markdown_table, summarize_run
from encore_fast.eval.run import RunConfigError, run_sequential


def per_method_overrides(items: list[str]) -> dict[str, dict]:
    """``["encore:lambda_p=150"]`` -> ``{"encore": {"lambda_p": 150}}``."""
    out: dict[str, dict] = {}
    for item in items:
        method, sep, rest = item.partition(":")
        if not sep:
            raise ValueError(f"--method-set expects METHOD:KEY=VALUE, got {item!r}")
        out.setdefault(method, {}).update(parse_overrides([rest]))
    return out


def write_report(dirs: list[Path], out: Path) -> str:
    """Summarise the runs into table.md / table.csv and plots; return the markdown."""
    rows = [summarize_run(load_run(d)) for d in dirs]
    md = markdown_table(rows)
    (out / "table.md").write_text(md, encoding="utf-8")
    (out / "table.csv").write_text(csv_table(rows), encoding="utf-8")
    plot_runs(dirs, out / "plots")
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["encore", "memit", "alphaedit"])
    parser.add_argument("--out", default="benchmarks/results/compare")
    parser.add_argument("--resume", action="store_true", help="continue unfinished runs")
    parser.add_argument(
        "--method-set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="override for one method only (after the common --set ones); repeatable",
    )
    parser.add_argument("--report-only", action="store_true", help="only redo table and plots")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    dirs = [out / m for m in args.methods]
    try:
        if not args.report_only:
            records = records_from_args(args)
            settings = settings_from_args(args)
            common = parse_overrides(args.overrides)
            specific = per_method_overrides(args.method_set)
            for method, run_dir in zip(args.methods, dirs, strict=True):
                overrides = {**common, **specific.get(method, {})}
                run_sequential(
                    editor_factory(args, method, overrides),
                    records,
                    run_dir,
                    num_edits=min(args.num_edits, len(records)),
                    batch_size=args.batch_size,
                    eval_every=args.eval_every,
                    settings=settings,
                    resume=args.resume,
                    run_info=run_info(args, method, overrides),
                    progress=not args.quiet,
                    make_plots=False,
                )
        print(write_report(dirs, out), end="")
    except (DatasetError, RunConfigError, ValueError, FileNotFoundError) as exc:
        print(f"compare_methods: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
