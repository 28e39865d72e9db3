"""Plain vs chat-template edits, each asked both ways (``scripts/chat26.sh``): the table with
Wilson intervals and the paired differences (bootstrap over the same facts), written to
``benchmarks/results/chat-26/`` with the runs' files.

    python benchmarks/chat26_report.py [--runs ~/.cache/encore_fast/chat-26]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from encore_fast.eval.estimates import share
from encore_fast.eval.intervals import paired_difference
from encore_fast.eval.results import load_run
from encore_fast.io import atomic_write_text
from encore_fast.provenance import stamp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "chat-26"
ASKED = {"plain": ("counterfact", "es"), "chat": ("chat", "chat_es")}  # how a fact is asked


def per_fact(run_dir: Path, edits: int) -> dict[str, dict[int, float]]:
    """At ``edits``: each way of asking -> {case id: 0/1 efficacy}."""
    run = load_run(run_dir)
    line = next(x for x in run.evals if x["edits_done"] == edits)
    rows = run.outcomes(line) or []
    return {way: {r["case_id"]: float(r[key]) for r in rows
                  if r.get("metric") == metric and r.get(key) is not None}
            for way, (metric, key) in ASKED.items()}


def paired(a: dict[int, float], b: dict[int, float]) -> Any:
    """``mean(a) − mean(b)`` over the facts both have, with its paired bootstrap interval."""
    keys = sorted(set(a) & set(b))
    return paired_difference([a[k] for k in keys], [b[k] for k in keys])


def report(runs: Path, edits: int = 200) -> tuple[str, dict[str, Any]]:
    """The markdown table and the numbers behind it."""
    facts = {edited: per_fact(runs / edited, edits) for edited in ("plain", "chat")}
    before = per_fact(runs / "plain", 0)  # (the unedited model, scored on the same facts)
    lines = ["| edited | asked plain (ES) | asked in the chat template (chat ES) | "
             "chat − plain (paired) |", "|---|---|---|---|"]
    numbers: dict[str, Any] = {}
    for edited, ways in {"unedited model": before, **facts}.items():
        cells = {way: share(list(v.values())) for way, v in ways.items()}
        diff = paired(ways["chat"], ways["plain"])
        numbers[edited] = {"plain": cells["plain"].to_dict(), "chat": cells["chat"].to_dict(),
                           "chat_minus_plain": diff.to_dict()}
        lines.append(f"| {edited} | {cells['plain']} n={cells['plain'].n} | "
                     f"{cells['chat']} n={cells['chat'].n} | {diff.format(signed=True)} |")
    same = paired(facts["chat"]["chat"], facts["plain"]["plain"])
    numbers["same_way_chat_minus_plain"] = same.to_dict()
    lines += ["", f"Each edit asked the way it was made: chat-edited (asked in the template) − "
                  f"plain-edited (asked plain) = {same.format(signed=True)} (the same facts)."]
    return "\n".join(lines), numbers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path.home() / ".cache/encore_fast/chat-26")
    args = p.parse_args(argv)
    table, numbers = report(args.runs)
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT / "table.md", table + "\n")
    atomic_write_text(OUT / "summary.json", json.dumps({**numbers, "stamp": stamp()}, indent=1))
    for run in ("plain", "chat"):
        for name in ("config.json", "results.jsonl"):
            (OUT / run).mkdir(exist_ok=True)
            shutil.copyfile(args.runs / run / name, OUT / run / name)
        shutil.copytree(args.runs / run / "outcomes", OUT / run / "outcomes", dirs_exist_ok=True)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
