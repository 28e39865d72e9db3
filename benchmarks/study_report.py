"""The 10,000-edit study (issue 15): table, plots and the collapse check of the study's runs.

Reads the run folders written by ``scripts/study_run.sh`` (edits, snapshots) and
``scripts/study_eval.sh`` (their evaluations), and writes into ``--out``: ``table.md`` /
``table.csv`` (per method, at 1k, 5k, 10k edits or ``--points`` and the last evaluation;
``n_sampled``: how many of the sampled records were edited by then and scored), ``plots/`` (edit
metrics, realistic accuracy and forgetting curve, downstream tasks, perplexity, norm growth per
layer, the methods overlaid), and each run's ``config.json``, ``results.jsonl``, ``evals.jsonl``.

Collapse (when a baseline's run is stopped): at an evaluation, the edit score on the edited
facts (ES) is no better than the unedited model's, or the downstream mean F1 has lost more than
half of its margin over chance (0.5 F1 for the two-class tasks is not what "chance" means for
weighted F1, so the margin is measured against the score of always answering one class), or the
perplexity has grown tenfold — at two evaluations in a row (the downstream mean over 100
examples per task moves by a few points between evaluations on its own); the first of the two
is reported.

    python benchmarks/study_report.py --runs ~/.cache/encore_fast/study \
        --out benchmarks/results/study-smollm2-10k

Tuning (``--tune``): one row per run of ``scripts/study_tune.sh`` (``<runs>/tune/<name>``, ENCORE
on counterfact-train.json), at its last evaluation, with the setting tried, into ``tuning.md`` /
``tuning.csv``. The rule that picks the setting is fixed before the runs: among the settings
whose edits are still made (ES >= ``MIN_ES`` on the edited facts), the one whose perplexity
grew least; the downstream mean and known facts are shown beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from encore_fast.eval.report import RunData, csv_table, load_run, markdown_table

METHODS = ("encore", "memit-seq", "alphaedit", "encore-preset")  # (the last: λ_p 150, λ_n 2)
POINTS = (1000, 5000, 10000)
ONE_CLASS_F1 = 1 / 3  # weighted F1 of always answering one class on balanced two-class data


def _at(run: RunData, edits: int) -> dict[str, Any] | None:
    return next((e for e in run.evals if e["edits_done"] == edits), None)


def _norm_growth(run: RunData, edits: int) -> float | None:
    x, ratios = run.norm_series()
    if edits not in x:
        return None
    i = x.index(edits)
    vals = [series[i] for series in ratios.values()]
    return sum(vals) / len(vals) if vals else None


def row(run: RunData, line: dict[str, Any]) -> dict[str, Any]:
    """One table row: a run at one evaluation."""
    m, f = line.get("metrics", {}), line.get("forgetting") or {}
    down = line.get("downstream") or {}
    out = {"method": run.label, "edits": line["edits_done"], "n_sampled": m.get("n_records")}
    for key in ("es", "ps", "ns", "s", "real_es", "real_ps", "real_ns"):
        out[key] = m.get(key)
    out["first1k_es"], out["first1k_real_es"] = f.get("es"), f.get("real_es")
    out["downstream_f1"] = down.get("mean_f1")
    for task in ("sst2", "rte"):
        out[f"{task}_f1"] = (down.get(task) or {}).get("f1")
    out["ppl"] = line.get("perplexity")
    out["known_acc"] = line.get("known_acc")
    out["norm_growth"] = _norm_growth(run, line["edits_done"])
    return out


def collapsed(base: dict[str, Any], line: dict[str, Any]) -> str | None:
    """Why the run counts as collapsed at ``line``, every criterion it meets (None: it has not)."""
    m0, m = base.get("metrics", {}), line.get("metrics", {})
    why = []
    if line["edits_done"] and m.get("es") is not None and m["es"] <= m0.get("es", 0):
        why.append(f"ES {m['es']:.3f} <= unedited {m0.get('es'):.3f}")
    d0 = (base.get("downstream") or {}).get("mean_f1")
    d = (line.get("downstream") or {}).get("mean_f1")
    if d0 is not None and d is not None and d - ONE_CLASS_F1 < 0.5 * (d0 - ONE_CLASS_F1):
        why.append(f"downstream mean F1 {d:.3f} (unedited {d0:.3f})")
    p0, p = base.get("perplexity"), line.get("perplexity")
    if p0 and p and p > 10 * p0:
        why.append(f"perplexity {p:.1f} > 10x unedited {p0:.1f}")
    return "; ".join(why) or None


def collapse_point(evals: list[dict[str, Any]]) -> tuple[int, str] | None:
    """``(edits, why)`` of the first evaluation that counts as collapsed, with the one after it
    collapsed too (the first line is the unedited model's); None: the run has not collapsed."""
    if not evals:
        return None
    base = evals[0]
    pairs = zip(evals, evals[1:], strict=False)
    return next(((e["edits_done"], why) for e, after in pairs
                 if (why := collapsed(base, e)) and collapsed(base, after)), None)


TUNED = ("lambda_p", "lambda_n", "mpes_extra_steps")
MIN_ES = 0.85


def tune_row(run: RunData, at_start: bool = False) -> dict[str, Any]:
    """One tuning-table row: the setting tried, then the run at its last evaluation (or, with
    ``at_start``, the unedited model as that run evaluated it)."""
    hp = run.config.get("hparams") or {}
    out: dict[str, Any] = {"run": run.label, **{k: hp.get(k) for k in TUNED}}
    base = run.evals[0]
    last = base if at_start else run.evals[-1]
    if at_start:
        out = {"run": "unedited", **{k: None for k in TUNED}}
    full = row(run, last)
    for key in ("edits", "es", "ps", "ns", "real_es", "real_ns", "first1k_es", "downstream_f1"):
        out[key] = full[key]
    p0 = base.get("perplexity")
    out["ppl_ratio"] = last["perplexity"] / p0 if p0 and last.get("perplexity") else None
    out["known_retained"] = last.get("known_retained")
    out["norm_growth"] = full["norm_growth"]
    out["sec_per_edit"] = None if at_start else seconds_per_edit(run)
    return out


def choose(rows: list[dict[str, Any]], min_es: float = MIN_ES) -> dict[str, Any] | None:
    """The setting the tuning picks: edits made (ES >= ``min_es``), least perplexity growth."""
    ok = [r for r in rows if (r.get("es") or 0) >= min_es and r.get("ppl_ratio")]
    return min(ok, key=lambda r: r["ppl_ratio"]) if ok else None


def tuning_report(runs_dir: Path, out: Path) -> None:
    """Write ``tuning.md`` / ``tuning.csv`` (and each run's files) from ``runs_dir/tune``."""
    runs = [load_run(p, p.name) for p in sorted((runs_dir / "tune").iterdir())
            if (p / "config.json").exists()]
    rows = [tune_row(r) for r in runs if len(r.evals) > 1]
    rows.sort(key=lambda r: (r["edits"], r["run"]))
    for run in runs:
        _copy_run(run, out / "tune" / run.label)
    longest = max((r["edits"] for r in rows), default=0)
    pick = choose([r for r in rows if r["edits"] == longest])
    first = next((r for r in runs if r.evals), None)
    unedited = [tune_row(first, at_start=True)] if first else []
    text = markdown_table(unedited + rows) + (
        f"\nPicked (ES >= {MIN_ES}, least perplexity growth): "
        f"{pick['run'] if pick else 'none'}\n")
    (out / "tuning.md").write_text(text, encoding="utf-8")
    (out / "tuning.csv").write_text(csv_table(unedited + rows), encoding="utf-8")
    print(text, end="")


def _copy_run(run: RunData, dst: Path) -> None:
    for name in ("config.json", "results.jsonl", "evals.jsonl"):
        src = run.path / name
        if src.exists():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst / name)


def seconds_per_edit(run: RunData) -> float | None:
    """Median batch time / batch size over the run's batches."""
    per = sorted(b["seconds"] / b["n_requests"] for b in run.batches
                 if b.get("seconds") and b.get("n_requests"))
    return per[len(per) // 2] if per else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True, help="folder holding one run per method")
    parser.add_argument("--out", required=True, help="results folder")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--points", nargs="+", type=int, default=list(POINTS),
                        help="edits at which each run is tabled (and its last evaluation)")
    parser.add_argument("--tune", action="store_true",
                        help="the tuning table of <runs>/tune instead")
    args = parser.parse_args(argv)
    if args.tune:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        tuning_report(Path(args.runs), Path(args.out))
        return 0
    runs = [load_run(Path(args.runs) / m, m) for m in args.methods
            if (Path(args.runs) / m / "config.json").exists()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = [], {}
    for run in runs:
        if not run.evals:
            continue
        base = run.evals[0]
        picked = [_at(run, n) for n in args.points] + [run.evals[-1]]
        seen = set()
        for line in picked:
            if line is not None and line["edits_done"] not in seen:
                seen.add(line["edits_done"])
                rows.append(row(run, line))
        why = collapse_point(run.evals)
        notes[run.label] = {"edits": run.batches[-1]["edits_done"] if run.batches else 0,
                            "evaluated_to": run.evals[-1]["edits_done"],
                            "collapsed_at": why, "sec_per_edit": seconds_per_edit(run),
                            "unedited": row(run, base)}
        _copy_run(run, out / run.label)
    (out / "table.md").write_text(markdown_table(rows), encoding="utf-8")
    (out / "table.csv").write_text(csv_table(rows), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(notes, indent=2), encoding="utf-8")
    try:
        from encore_fast.eval.plots import plot_runs
    except ImportError:
        print("no matplotlib: no plots")
    else:
        shown = [r for r in runs if r.evals]
        plot_runs([r.path for r in shown], out / "plots", [r.label for r in shown])
    print(markdown_table(rows), end="")
    print(json.dumps(notes, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
