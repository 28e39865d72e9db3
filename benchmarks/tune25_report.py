"""The tuning table of the new methods (benchmarks/results/tuning-25/README.md: the runs and the
rule), from their run folders; writes ``table.md`` and ``summary.json`` there and copies each
run's ``config.json`` and ``results.jsonl`` beside them.

    python benchmarks/tune25_report.py [--runs ~/.cache/encore_fast/tuning-25]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from encore_fast.eval.intervals import wilson
from encore_fast.io import atomic_write_text
from encore_fast.provenance import stamp

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks" / "results" / "tuning-25"
EDITS = 500
PPL_LIMIT = 1.10  # the rule: perplexity at most 1.10 x the unedited model's


def candidates(path: Path = FOLDER / "candidates.tsv") -> list[tuple[str, str, str]]:
    """``(name, method, settings)`` per line of the candidates file, in order."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, method, settings = line.split("\t")
            out.append((name, method, settings))
    return out


def outcome(run: Path) -> dict[str, Any] | None:
    """A finished run's scores after 500 edits and its perplexity ratio (None: not finished)."""
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()
             if x.strip().endswith("}")] if (run / "results.jsonl").exists() else []
    evals = {x["edits_done"]: x for x in lines if x.get("type") == "eval"}
    if EDITS not in evals or 0 not in evals:
        return None
    m, end = evals[EDITS]["metrics"], evals[EDITS]
    n = int(m["n_es"])
    return {"es": wilson(round(m["es"] * n), n).to_dict(), "ps": m["ps"], "ns": m["ns"],
            "s": m["s"], "n": n, "ppl_ratio": end["perplexity"] / evals[0]["perplexity"]}


def choose(rows: list[dict[str, Any]]) -> str | None:
    """The rule: the qualifying candidate (ppl ratio <= 1.10) with the highest S, the first
    listed on a tie; none qualifying: the lowest perplexity ratio. None until every candidate
    of the method has run."""
    done = [r for r in rows if r["outcome"] is not None]
    if not done or len(done) < len(rows):
        return None
    ok = [r for r in done if r["outcome"]["ppl_ratio"] <= PPL_LIMIT]
    if ok:
        return max(ok, key=lambda r: (r["outcome"]["s"], -rows.index(r)))["name"]
    return min(done, key=lambda r: r["outcome"]["ppl_ratio"])["name"]


def table(rows: list[dict[str, Any]], chosen: dict[str, str | None]) -> str:
    """The markdown table: every candidate, chosen or not."""
    lines = ["| method | candidate | settings | ES [95% CI] | PS | NS | S | perplexity × | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o = r["outcome"]
        if o is None:
            lines.append(f"| {r['method']} | {r['name']} | `{r['settings']}` | not run yet |"
                         " | | | | |")
            continue
        es = o["es"]
        mark = "**chosen**" if chosen.get(r["method"]) == r["name"] else (
            "" if o["ppl_ratio"] <= PPL_LIMIT else "ppl > 1.10")
        lines.append(
            f"| {r['method']} | {r['name']} | `{r['settings']}` | {es['value']:.2f} "
            f"[{es['low']:.2f}, {es['high']:.2f}] | {o['ps']:.2f} | {o['ns']:.2f} | "
            f"{o['s']:.2f} | {o['ppl_ratio']:.3f} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=Path, default=Path.home() / ".cache/encore_fast/tuning-25")
    args = p.parse_args(argv)
    rows = []
    for name, method, settings in candidates():
        run = args.runs / name
        rows.append({"name": name, "method": method, "settings": settings,
                     "outcome": outcome(run) if run.exists() else None})
        if rows[-1]["outcome"] is not None:
            (FOLDER / "runs" / name).mkdir(parents=True, exist_ok=True)
            for f in ("config.json", "results.jsonl"):
                shutil.copyfile(run / f, FOLDER / "runs" / name / f)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    chosen = {m: choose([r for r in rows if r["method"] == m]) for m in methods}
    atomic_write_text(FOLDER / "table.md", table(rows, chosen) + "\n")
    atomic_write_text(FOLDER / "summary.json", json.dumps(
        {"rows": rows, "chosen": chosen, "stamp": stamp()}, indent=1))
    print(table(rows, chosen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
