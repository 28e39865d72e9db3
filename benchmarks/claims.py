"""The READMEs' generated result blocks (encore_fast.eval.claims), from the committed files.

    python benchmarks/claims.py           # rewrite the blocks of the READMEs below
    python benchmarks/claims.py --check   # exit 1 (naming them) when a block differs

The generators, one per block, are in ``claims_blocks/`` (beside this file), grouped by the
results they read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from claims_blocks import GENERATORS, generator

from encore_fast.eval.claims import check, fill
from encore_fast.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "benchmarks/results/README.md", "benchmarks/results/refactor-23/README.md",
           "benchmarks/results/study-smollm2-10k/README.md",
           "benchmarks/results/study2-smollm2/README.md")

__all__ = ["GENERATORS", "READMES", "ROOT", "generator", "main"]


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
