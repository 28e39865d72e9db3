"""The study under the evaluation protocol: tables with intervals, paired comparisons with Holm's
verdicts, each run's collapse point, the run files and plots, from the runs' folders.

    python benchmarks/study2_report.py --runs ~/.cache/encore_fast/study2 \\
        --out benchmarks/results/study2-smollm2 --methods encore memit-seq alphaedit \\
        --points 1000 2000 3000 5000 7500 10000

Writes into ``--out``: ``table.md`` / ``table.csv`` (each method at each point it was evaluated
at: every cell with its interval and n), ``compare-<base>-vs-<method>.md`` (+ ``.json``: the
primary endpoints' paired differences at the primary points both runs reached, ``--primary``:
1k, 3k, 5k, 10k, named before the runs; Holm's correction over every comparison of the report
together, all methods against the base),
``summary.json`` (per run: last point, collapse point with its criteria, s/edit, the machine of
its stamps) and each run's files (config, results, evaluations, outcome files) under
``<method>/``, and ``plots/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encore_fast.eval.collapse import run_collapse
from encore_fast.eval.compare import compare_runs, holm_jointly, write_comparison
from encore_fast.eval.report import csv_table, markdown_table, summarize_run
from encore_fast.eval.results import RunData, load_run
from encore_fast.io import atomic_write_text

RUN_FILES = ("config.json", "results.jsonl", "evals.jsonl")
PRIMARY = (1000, 3000, 5000, 10000)  # the points of the primary comparisons (issue 24)


def at_point(run: RunData, edits: int) -> RunData | None:
    """``run`` as it stood at its evaluation after ``edits`` edits (None: not evaluated there)."""
    if not any(line["edits_done"] == edits for line in run.evals):
        return None
    return dataclasses.replace(
        run, evals=[x for x in run.evals if x["edits_done"] <= edits],
        batches=[b for b in run.batches if b["edits_done"] <= edits], memo={})


def table_rows(runs: dict[str, RunData], points: Sequence[int]) -> list[dict[str, Any]]:
    """One summary row per method and point it was evaluated at (the unedited model first:
    its evaluation is shared by the runs of one stream)."""
    def row(name: str, cut: RunData) -> dict[str, Any]:
        return {"method": name, **{k: v for k, v in summarize_run(cut).items() if k != "run"}}

    unedited = at_point(next(iter(runs.values())), 0)
    rows = [row("unedited", unedited)] if unedited is not None else []
    for point in points:
        rows += [row(name, cut) for name, run in runs.items()
                 if (cut := at_point(run, point)) is not None]
    return rows


def run_summary(run: RunData) -> dict[str, Any]:
    """Last point, collapse (edits and criteria), s/edit and the machines that ran it."""
    collapse = run_collapse(run)
    stamps = run.config.get("provenance") or []
    return {"evaluated_to": run.evals[-1]["edits_done"] if run.evals else None,
            "edited_to": run.batches[-1]["edits_done"] if run.batches else 0,
            "collapse": None if collapse is None else {"edits": collapse.edits,
                                                        "criteria": collapse.reasons},
            "sec_per_edit": summarize_run(run).get("sec_per_edit"),
            "machines": sorted({s.get("machine", "") for s in stamps})}


def copy_run(run: RunData, target: Path) -> None:
    """The run's files that the tables come from (not its checkpoints or snapshots)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        if (run.path / name).exists():
            shutil.copy2(run.path / name, target / name)
    if (run.path / "outcomes").is_dir():
        shutil.copytree(run.path / "outcomes", target / "outcomes", dirs_exist_ok=True)


def report(runs_dir: Path, out: Path, methods: Sequence[str], points: Sequence[int],
           base: str | None = None, primary: Sequence[int] = PRIMARY) -> dict[str, Any]:
    """Write every file of the report (see the module docstring); returns the summary."""
    runs = {m: load_run(runs_dir / m, label=m) for m in methods}
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs, points)
    atomic_write_text(out / "table.md", markdown_table(rows))
    atomic_write_text(out / "table.csv", csv_table(rows))
    base = base or methods[0]
    others = [m for m in methods if m != base]
    tables = holm_jointly([compare_runs(runs[base], runs[name], edits=[
        p for p in points if p in primary and at_point(runs[base], p) and at_point(runs[name], p)
    ]) for name in others])
    for name, found in zip(others, tables, strict=True):
        write_comparison(out / f"compare-{base}-vs-{name}.md", found, base, name,
                         family=sum(map(len, tables)))
    summary = {name: run_summary(run) for name, run in runs.items()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    for name, run in runs.items():
        copy_run(run, out / name)
    try:
        from encore_fast.eval.plots import plot_runs
    except ImportError:  # (matplotlib: extra "eval")
        return summary
    plot_runs([out / m for m in methods], out / "plots", labels=list(methods))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True, help="folder of the run folders")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", nargs="+", required=True, help="run folder names")
    p.add_argument("--points", nargs="+", type=int, default=[1000, 2000, 3000, 5000, 7500,
                                                             10000])
    p.add_argument("--base", default=None, help="the method the others are compared with "
                                                "(default: the first)")
    p.add_argument("--primary", nargs="+", type=int, default=list(PRIMARY),
                   help="the points at which the methods are compared (Holm over them all)")
    args = p.parse_args(argv)
    summary = report(args.runs, args.out, args.methods, args.points, args.base, args.primary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
