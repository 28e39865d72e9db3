"""The README's table of every method on SmolLM2-135M: the settings for long streams
(:mod:`tuned`) and the seconds per edit measured side by side (``results/methods_cpu.csv``,
``bench_methods.py``): the block ``methods-smollm2``; and the new methods' tuning table with
what its rule chose (``tuning-25``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tune25_report import PPL_LIMIT
from tuned import NotTuned, tuned

from encore_fast.methods import canonical

from .registry import generator, results

# every method of the README's method table, in its order (compositions as published)
METHODS = ("memit", "memit-seq", "encore", "alphaedit", "emmet", "evoedit", "rlsedit",
           "ultraedit", "alphaedit+nas", "alphaedit+sphere", "memit-seq+rect", "memit-seq+prune")
RUN_KEYS = ("date", "cpu", "threads", "dtype", "edits", "batch", "command", "commit")


def bench_runs(path: Path) -> list[list[dict[str, str]]]:
    """The benchmark's runs: rows appended together (same date, machine, sizes, command and
    commit), in file order; a run that names a method twice is two runs."""
    runs: list[list[dict[str, str]]] = []
    for row in csv.DictReader(path.open(newline="")) if path.exists() else []:
        key = [row.get(k, "") for k in RUN_KEYS]
        last = runs[-1] if runs else None
        if last and [last[0].get(k, "") for k in RUN_KEYS] == key and \
                canonical(row["method"]) not in {canonical(r["method"]) for r in last}:
            last.append(row)
        else:
            runs.append([row])
    return runs


def speeds(runs: list[list[dict[str, str]]]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Per method its s/edit over the runs like the newest one (same machine, threads, dtype,
    sizes and command), and what those runs were."""
    if not runs:
        return {}, {}
    like = [k for k in RUN_KEYS if k not in ("date", "commit")]
    newest = runs[-1][0]
    same = [run for run in runs if all(run[0].get(k, "") == newest.get(k, "") for k in like)]
    out: dict[str, list[float]] = {}
    for run in same:
        for row in run:
            if row.get("status", "ok") in ("ok", "") and row.get("s_per_edit"):
                out.setdefault(canonical(row["method"]), []).append(float(row["s_per_edit"]))
    dates = sorted({run[0]["date"] for run in same})
    return out, {"runs": str(len(same)), "dates": ", ".join(dates), **newest}


def speed_range(got: list[float]) -> str:
    """s/edit over like runs: one value, or ``low–high`` when they differ at two decimals."""
    low, high = f"{min(got):.2f}", f"{max(got):.2f}"
    return low if low == high else f"{low}–{high}"


def settings_cell(method: str, summary: Path) -> tuple[str, str]:
    """``method``'s settings and where they come from (``summary``: the tuning's), as cells."""
    try:
        words, source = tuned(method, summary)
    except NotTuned:
        return "its family's preset (not tuned yet)", "—"
    if source == "study":
        return (f"`{words}`", "stream tuning (results README)") if words else \
            ("the preset's", "the studies' choice, not tuned for streams")
    return f"`{words}`", f"tuning candidate `{source}`"


@generator("methods-smollm2")
def table(root: Path) -> str:
    """The generated block: one row per method, then how the speeds were measured."""
    per, run = speeds(bench_runs(results(root, "methods_cpu.csv")))
    summary = results(root, "tuning-25", "summary.json")
    lines = ["| method | settings on SmolLM2-135M (long streams) | chosen by | s/edit |",
             "|---|---|---|---|"]
    for method in METHODS:
        cells = settings_cell(method, summary) if method != "memit" else (
            "the preset's", "— (not a sequential method)")
        got = per.get(canonical(method), [])
        speed = "not measured yet" if not got else speed_range(got) if len(got) == 1 else \
            f"{speed_range(got)} ({len(got)} runs)"
        lines.append(f"| `{method}` | {cells[0]} | {cells[1]} | {speed} |")
    if run:
        lines += ["", f"s/edit: `benchmarks/bench_methods.py`, the methods side by side on the "
                      f"same {run['edits']} requests of `counterfact-edit.json` (batch "
                      f"{run['batch']}, {run['dtype']}), {run['runs']} run(s) ({run['dates']}), "
                      f"{run['threads']} threads on {run['cpu']}; "
                      f"`results/methods_cpu.csv`."]
    return "\n".join(lines)



@generator("tuning-25")
def tuning(root: Path) -> str:
    """The new methods' tuning: the committed table and, per method, what the rule chose and
    why (``results/tuning-25``)."""
    folder = results(root, "tuning-25")
    data = json.loads((folder / "summary.json").read_text())
    said = []
    for method, name in data["chosen"].items():
        rows = [r for r in data["rows"] if r["method"] == method]
        if name is None:
            done = sum(r["outcome"] is not None for r in rows)
            said.append(f"`{method}`: {done} of {len(rows)} candidates run, none chosen yet")
            continue
        o = next(r for r in rows if r["name"] == name)["outcome"]
        fits = [r for r in rows if r["outcome"]["ppl_ratio"] <= PPL_LIMIT]
        why = (f"the highest S of the {len(fits)} within the perplexity bound" if fits else
               "none within the perplexity bound: the lowest perplexity")
        said.append(f"`{method}`: `{name}` ({why}; S {o['s']:.2f}, perplexity "
                    f"×{o['ppl_ratio']:.3f})")
    return ((folder / "table.md").read_text().strip() + "\n\nChosen by the rule: "
            + "; ".join(said) + ".")
