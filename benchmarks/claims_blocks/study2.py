"""The study's claims as the READMEs state them (the block ``study2``):
how far each method went and whether it collapsed, which primary differences between the base
method and each other one are significant after Holm's correction, and what an evaluation point
cost -- all read from a study report's folder (``study2_report.py``'s ``summary.json``,
``compare-*.md.json``, the runs' evaluation lines)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from encore_fast.eval.results import load_run

from .registry import generator, results

NAMES = {"s": "S", "real_s": "real S", "informative_f1": "informative downstream F1"}


def _diff(c: dict[str, Any]) -> str:
    d = c["difference"]
    return f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def runs_text(summary: dict[str, Any]) -> list[str]:
    """One line per run: how far it was edited and evaluated, and its collapse."""
    lines = []
    for name, run in summary.items():
        fate = "no collapse by the rule" if run["collapse"] is None else (
            f"**collapsed at {run['collapse']['edits']:,} edits** "
            f"({'; '.join(run['collapse']['criteria'])})")
        lines.append(f"* `{name}`: edited to {run['edited_to']:,}, evaluated to "
                     f"{run['evaluated_to'] or 0:,}; {fate}.")
    return lines


def comparisons_text(folder: Path, base: str) -> list[str]:
    """The primary differences, a table row per method and point, then the significant ones
    said plainly (and the ones that are not)."""
    files = sorted(folder.glob(f"compare-{base}-vs-*.md.json"))
    if not files:
        return [f"No comparison yet: only `{base}`'s arm is evaluated, so nothing is claimed "
                "about the methods' order."]
    tables = [json.loads(f.read_text()) for f in files]
    family = tables[0]["provenance"]["comparisons"]
    out = [f"| {base} − method | edits | " + " | ".join(NAMES.values()) + " |",
           "|---|---|" + "---|" * len(NAMES)]
    yes, no = [], []
    for t in tables:
        for edits in sorted({c["edits"] for c in t["comparisons"]}):
            cells = []
            for endpoint in NAMES:
                c = next((c for c in t["comparisons"] if c["edits"] == edits
                          and c["endpoint"] == endpoint), None)
                if c is None:
                    cells.append("—")
                    continue
                mark = " **significant**" if c["significant"] else ""
                cells.append(_diff(c) + mark)
                say = f"{NAMES[endpoint]} at {edits:,} vs `{t['b']}` ({_diff(c)})"
                (yes if c["significant"] else no).append(say)
            out.append(f"| `{t['b']}` | {edits:,} | " + " | ".join(cells) + " |")
    out += ["", f"Paired bootstrap over the same facts and examples; Holm's correction over all "
                f"{family} comparisons. Significant: " + ("; ".join(yes) or "none") + ". "
                "Not significant: " + ("; ".join(no) or "none") + "."]
    return out


def eval_cost(folder: Path, methods: list[str]) -> str:
    """The evaluation points' seconds (after edits; the unedited one apart)."""
    secs = [x["seconds"] for m in methods if (folder / m).is_dir()
            for x in load_run(folder / m).evals if x["edits_done"] > 0 and "seconds" in x]
    if not secs:
        return ""
    return (f"An evaluation point took {min(secs):.0f}–{max(secs):.0f} s ({len(secs)} points; "
            "the machines each run's `config.json` names).")


def claims(folder: Path, base: str = "encore") -> str:
    """The block's markdown for the report in ``folder``."""
    summary = json.loads((folder / "summary.json").read_text())
    parts = ["\n".join(runs_text(summary)), "\n".join(comparisons_text(folder, base)),
             eval_cost(folder, list(summary))]
    return "\n\n".join(p for p in parts if p)


def ns_caveat(path: Path) -> str:
    """Where realistic NS (a part of real S) rests on fewer facts than a point scores: runs
    whose unedited evaluation answered only its own sample's neighbourhood prompts."""
    short = [(r["method"], int(r["edits"]), int(r["real_ns_n"]), int(r["s_n"]))
             for r in csv.DictReader(path.open(newline=""))
             if r.get("real_ns_n") and r.get("s_n") and int(r["real_ns_n"]) < int(r["s_n"])]
    if not short:
        return ""
    cells = ", ".join(f"`{m}` at {e:,}: {ns:,} of {n:,}" for m, e, ns, n in short)
    return ("**Realistic NS, and so real S, is not comparable across points here**: the unedited "
            "evaluation of these runs answered only its own sample's neighbourhood prompts, so "
            "NS was scored on fewer facts than the point scored (" + cells + "), and real S "
            "took NS's mean over those alone. Between methods at one point the facts are the "
            "same (the paired comparisons stand); "
            "across points, and against runs evaluated since the fix (commit `28394b7`), they "
            "are not.")


@generator("study2")
def study2(root: Path) -> str:
    """The 10,000-edit study under the protocol (``results/study2-smollm2``)."""
    folder = results(root, "study2-smollm2")
    parts = [narrow_table(folder / "table.csv"), ns_caveat(folder / "table.csv"), claims(folder)]
    return "\n\n".join(p for p in parts if p)


COLUMNS = {"s": "S", "real_s": "real S", "informative_f1": "informative F1",
           "ppl_ratio": "perplexity ×", "known_retained": "known kept",
           "immediate_es": "immediate ES"}


def narrow_table(path: Path) -> str:
    """The report's table with the primary endpoints and a few secondary ones (every cell with
    its 95% interval; ``n`` is in the full ``table.md``)."""
    def cell(row: dict[str, str], key: str) -> str:
        if not row.get(key):
            return "—"
        value, low, high = (float(row[key + x]) for x in ("", "_low", "_high"))
        return f"{value:.2f} [{low:.2f}, {high:.2f}]"

    lines = ["| method | edits | " + " | ".join(COLUMNS.values()) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for row in csv.DictReader(path.open(newline="")):
        lines.append(f"| `{row['method']}` | {int(row['edits']):,} | "
                     + " | ".join(cell(row, k) for k in COLUMNS) + " |")
    return "\n".join(lines)
