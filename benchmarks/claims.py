"""The READMEs' generated result blocks (encore_fast.eval.claims), from the committed files.

    python benchmarks/claims.py           # rewrite the blocks of README.md and results/README.md
    python benchmarks/claims.py --check   # exit 1 (naming them) when a block differs
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

from encore_fast.eval.claims import Generator, check, fill
from encore_fast.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "benchmarks/results/README.md", "benchmarks/results/refactor-23/README.md")
GENERATORS: dict[str, Generator] = {}


def generator(name: str):
    """Register a block's generator under ``name``."""
    def add(fn: Generator) -> Generator:
        GENERATORS[name] = fn
        return fn
    return add


def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open(newline="")))


@generator("refactor-23-speed")
def refactor_speed(root: Path) -> str:
    """The refactor's engine speed, before and after, over the runs that had the machine alone
    (``refactor-23/alone.json`` names them, 1-based, with why the others are left out)."""
    folder = root / "benchmarks" / "results" / "refactor-23"
    alone = json.loads((folder / "alone.json").read_text())
    cells = {}
    for side in ("before", "after"):
        rows = _rows(folder / f"engines_{side}.csv")
        picked = [rows[i - 1] for i in alone[side]]
        fast = [float(r["fast_s_per_edit"]) for r in picked]
        ref = [float(r["ref_s_per_edit"]) for r in picked]
        cells[side] = (f"rows {', '.join(map(str, alone[side]))}", fast, ref)
    lines = ["| | runs (machine alone) | fast s/edit | mean | reference s/edit |",
             "|---|---|---|---|---|"]
    for side, (runs, fast, ref) in cells.items():
        lines.append(f"| {side} | {runs} | {', '.join(f'{x:.3f}' for x in fast)} | "
                     f"{statistics.mean(fast):.3f} | {', '.join(f'{x:.2f}' for x in ref)} |")
    (_, fb, rb), (_, fa, ra) = cells["before"], cells["after"]
    lines += ["", f"Fast engine {min(fb):.3f}–{max(fb):.3f} s/edit before and "
                  f"{min(fa):.3f}–{max(fa):.3f} after; reference {min(rb):.2f}–{max(rb):.2f} "
                  f"and {min(ra):.2f}–{max(ra):.2f}."]
    return "\n".join(lines)


@generator("chat-26")
def chat_template_edits(root: Path) -> str:
    """Plain vs chat-template edits, each asked both ways (``results/chat-26``)."""
    folder = root / "benchmarks" / "results" / "chat-26"
    data = json.loads((folder / "summary.json").read_text())
    machine = data["stamp"].get("machine", "")
    return ((folder / "table.md").read_text().strip() + "\n\n"
            f"200 CounterFact edits (`counterfact-edit.json` records 0–199, 2 batches of 100, "
            f"ENCORE, preset `smollm2-135m`, bf16 + masters) of the bundled "
            f"SmolLM2-135M-Instruct; ES = P(new) > P(true), teacher-forced, with Wilson 95% "
            f"intervals and paired bootstrap differences over the same facts "
            f"(`bash scripts/chat26.sh; python benchmarks/chat26_report.py`; {machine}).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = p.parse_args(argv)
    stale = []
    for name in READMES:
        path = ROOT / name
        text = path.read_text(encoding="utf-8")
        if args.check:
            stale += [f"{name}: {b}" for b in check(text, GENERATORS, ROOT)]
        else:
            atomic_write_text(path, fill(text, GENERATORS, ROOT))
    if stale:
        print("claims blocks that differ from their data:\n  " + "\n  ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
