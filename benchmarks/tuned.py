"""Each method's settings for long streams on SmolLM2-135M, from the committed evidence: the new
methods' from their tuning (``results/tuning-25/summary.json``, the candidate the rule chose),
ENCORE's, MEMIT-seq's and AlphaEdit's from the earlier stream tuning (``results/README.md``,
"Tuning"; the 10,000-edit studies use them). One place that the comparison runs, the speed
benchmark and the README's table read.

    python benchmarks/tuned.py emmet     # prints: --set lambda_p=5000 --set emmet.lambda_e=1.0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from encore_fast.errors import ConfigError
from encore_fast.methods import canonical

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "benchmarks" / "results" / "tuning-25" / "summary.json"
# chosen before the new methods' tuning, on counterfact-train.json (1,000 edits, batch 100)
STUDY = {"encore": "lambda_p=5000 lambda_n=20", "memit-seq": "lambda_p=5000", "alphaedit": ""}


class NotTuned(LookupError):
    """A method whose tuning has not chosen a setting yet (or that was never tuned)."""


def tuned(method: str, summary: Path = SUMMARY) -> tuple[str, str]:
    """``(settings, source)`` of ``method`` (any name or alias): settings as ``KEY=VALUE``
    words, the source the candidate's name or ``"study"``; :class:`NotTuned` when none yet."""
    key = canonical(method)
    if key in STUDY:
        return STUDY[key], "study"
    data = json.loads(summary.read_text()) if summary.exists() else {"chosen": {}, "rows": []}
    name = data["chosen"].get(key)
    if name is None:
        state = "not tuned yet" if key in data["chosen"] else "not among the tuned methods"
        raise NotTuned(f"{method}: {state} ({summary.name})")
    return next(r["settings"] for r in data["rows"] if r["name"] == name), name


def set_args(method: str, summary: Path = SUMMARY) -> list[str]:
    """``method``'s tuned settings as command-line words: ``--set KEY=VALUE ...``."""
    return [w for s in tuned(method, summary)[0].split() for w in ("--set", s)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python benchmarks/tuned.py METHOD", file=sys.stderr)
        return 2
    try:
        print(" ".join(set_args(args[0])))
    except (NotTuned, ConfigError) as exc:
        print(f"tuned.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
