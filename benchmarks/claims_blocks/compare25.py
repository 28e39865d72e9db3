"""The new methods' 1,000-edit comparison with ENCORE on the study's stream (the block
``compare25``): the study's narrow table, the paired differences with Holm's verdicts, each
method's s/edit from the side-by-side benchmark, and which methods go on to 10,000 edits by the
rule committed before the comparison ran (``results/README.md``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from encore_fast.errors import ConfigError
from encore_fast.eval.collapse import criteria_at, point_at
from encore_fast.eval.results import RunData, load_run
from encore_fast.methods import canonical

from .methods import bench_runs, speed_range, speeds
from .registry import generator, results
from .study2 import claims, narrow_table

AT = 1000
STUDY = ("encore", "memit-seq", "alphaedit")  # (in the long study whatever the comparison says)
# a method whose update at its chosen setting is a study method's by equation
SAME_AS = {"emmet": ("memit-seq", "λ_e = 1 and λ_u = 0 give MEMIT-seq's update "
                                  "(tests/test_frontier_rules.py)")}


def _key(method: str) -> str:
    """``method``'s canonical name (an unknown one as written)."""
    try:
        return canonical(method)
    except ConfigError:
        return method


def goes_on(runs: dict[str, RunData], at: int = AT) -> list[str]:
    """Per new method, whether it goes on to the 10,000-edit study (judged at ``at`` edits),
    and why: those that go on first, in the order they run (informative downstream F1 at
    ``at``, highest first), then those that stop."""
    on, off = [], []
    for name, run in runs.items():
        method = _key(run.config.get("method", name))
        if method in STUDY or name in STUDY:
            continue
        met = criteria_at(run, at)
        if met is None:
            off.append(f"* `{name}`: not evaluated at {at:,} yet.")
        elif met:
            off.append(f"* `{name}`: stops: at {at:,} edits it meets the collapse rule's "
                       + "; ".join(met) + ".")
        elif method in SAME_AS:
            off.append(f"* `{name}`: stops: its update is `{SAME_AS[method][0]}`'s "
                       f"({SAME_AS[method][1]}).")
        else:
            line = next(x for x in run.evals if x["edits_done"] == at)
            f1 = point_at(run, line).downstream
            said = f" (informative downstream F1 {f1.value:.2f})" if f1 else ""
            on.append((-(f1.value if f1 else -1.0), f"* `{name}`: **goes on**{said}: no "
                       f"criterion of the collapse rule met at {at:,} edits."))
    return [text for _, text in sorted(on, key=lambda x: x[0])] + off


def same_scores(path: Path) -> str:
    """Runs whose every score of the report's table is the same (e.g. one method's update
    being another's by equation, or a transform that never acted)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for row in csv.DictReader(path.open(newline="")):
        if row["method"] != "unedited":
            key = tuple(v for k, v in row.items() if k not in ("method", "sec_per_edit"))
            groups.setdefault(key, []).append(f"`{row['method']}`")
    same = [" = ".join(g) for g in groups.values() if len(g) > 1]
    return ("Identical in every score and interval of `table.csv`: " + "; ".join(same) + "."
            ) if same else ""


def speed_line(root: Path, runs: dict[str, RunData]) -> str:
    """Each run's method's s/edit from ``methods_cpu.csv`` (side by side, machine alone)."""
    per, run = speeds(bench_runs(results(root, "methods_cpu.csv")))
    cells = []
    for name, data in runs.items():
        got = per.get(_key(data.config.get("method", name)), [])
        if got:
            cells.append(f"`{name}` {speed_range(got)}")
    if not cells:
        return ""
    return (f"s/edit of each method with the same settings, side by side on {run['edits']} "
            f"requests, {run['threads']} threads on {run['cpu']} with the machine alone "
            f"({run['runs']} runs, `methods_cpu.csv`; the comparison's own runs shared the "
            f"machine, so their times are not speeds): " + ", ".join(cells) + ".")


@generator("compare25")
def compare25(root: Path) -> str:
    """The block (``results/compare25-1k``, written by ``study2_report.py --points 1000``)."""
    folder = results(root, "compare25-1k")
    if not (folder / "summary.json").exists():
        return "Not run yet: it waits for every method's 1,000 edits and their evaluation."
    names = list(json.loads((folder / "summary.json").read_text()))
    runs = {n: load_run(folder / n) for n in names}
    pairs = sorted(folder.glob("compare-*.md.json"))
    base = json.loads(pairs[0].read_text())["a"] if pairs else names[0]
    parts = [narrow_table(folder / "table.csv"), claims(folder, base=base),
             same_scores(folder / "table.csv"), speed_line(root, runs),
             "Which methods go on to the 10,000-edit study, by the rule above:\n\n"
             + "\n".join(goes_on(runs))]
    return "\n\n".join(p for p in parts if p)
