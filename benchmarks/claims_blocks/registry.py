"""The registry of block generators, and the small readers and number formats they share.

A generator is a function from the repository's root folder to the markdown of one block; it
reads only committed files under ``benchmarks/results/`` (``tests/test_claims.py`` checks that
on a copy holding nothing else).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import re
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from encore_fast.eval.claims import Generator

GENERATORS: dict[str, Generator] = {}


def generator(name: str, reflowed: bool = True) -> Callable[[Generator], Generator]:
    """Register a block's generator under ``name`` (the name between the README's markers);
    ``reflowed``: its prose is wrapped at 100 columns (:func:`reflow`) as it is registered."""
    def add(fn: Generator) -> Generator:
        if name in GENERATORS:
            raise ValueError(f"two generators for claims block {name!r}")
        GENERATORS[name] = functools.wraps(fn)(lambda root: reflow(fn(root))) if reflowed else fn
        return fn
    return add


def results(root: Path, *parts: str) -> Path:
    """A path under ``benchmarks/results/``."""
    return root.joinpath("benchmarks", "results", *parts)


def csv_rows(path: Path) -> list[dict[str, str]]:
    """A CSV file's rows, as text."""
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def jsonl(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file's records."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def num(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals and thousands separators (12,602 or 0.474)."""
    return f"{x:,.{digits}f}"


def span(values: Iterable[float], digits: int, sep: str = "–") -> str:
    """``low–high`` of ``values`` at ``digits`` decimals (one number when they print alike)."""
    vals = list(values)
    lo, hi = num(min(vals), digits), num(max(vals), digits)
    return lo if lo == hi else f"{lo}{sep}{hi}"


def pct(x: float, digits: int = 0) -> str:
    """A fraction as a percentage: 0.568 -> ``57%``."""
    return f"{100 * x:.{digits}f}%"


def less_time(fast: float, slow: float) -> str:
    """How much less time ``fast`` took than ``slow``, as a percentage: ``33%``."""
    return pct(1 - fast / slow)


def binomial_se(p: float, n: int) -> float:
    """The standard error of a proportion ``p`` over ``n`` independent 0/1 outcomes."""
    return math.sqrt(p * (1 - p) / n)



def wilson(share: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson interval of a share of ``n`` 0/1 outcomes (the same interval as
    :func:`encore_fast.eval.intervals.wilson`, without needing SciPy)."""
    k = share * n
    if abs(k - round(k)) > 1e-6 * max(n, 1):
        raise ValueError(f"{share} of {n} is not a count of 0/1 outcomes")
    p, z2 = round(k) / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def with_interval(share: float, n: int, digits: int = 2) -> str:
    """``0.87 [0.71, 0.95]``: a share of ``n`` 0/1 outcomes with its Wilson interval."""
    lo, hi = wilson(share, n)
    return f"{share:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


_STARTS_BLOCK = re.compile(r"([*+>|#-]|\d+[.)])(\s|$)")
_INTERVAL = re.compile(r"\[[-+\d.]+, [-+\d.]+\]")


def wrap(text: str, indent: str = "") -> str:
    """One paragraph (or list item, ``indent`` on its later lines) wrapped at 100 columns, as the
    READMEs' prose is; a line that would start a markdown block is kept on the line before."""
    kept = _INTERVAL.sub(lambda m: m[0].replace(" ", "\0"), text)  # an interval stays whole
    lines = textwrap.wrap(kept, 100, subsequent_indent=indent, break_long_words=False,
                          break_on_hyphens=False)
    out: list[str] = []
    for line in (x.replace("\0", " ") for x in lines):
        if out and _STARTS_BLOCK.match(line.strip()):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return "\n".join(out)


def bullets(items: Iterable[str]) -> str:
    """A markdown list, each item wrapped."""
    return "\n".join(wrap(f"* {item}", indent="  ") for item in items)


def reflow(markdown: str) -> str:
    """Markdown with its paragraphs and list items wrapped (:func:`wrap`); tables kept as they
    are. Paragraphs are separated by blank lines."""
    out = []
    for chunk in markdown.split("\n\n"):
        lines = chunk.splitlines()
        if all(line.startswith("|") for line in lines):
            out.append(chunk)
        elif lines and lines[0].startswith("* "):
            items: list[str] = []
            for line in lines:
                if line.startswith("* ") or not items:
                    items.append(line[2:])
                else:
                    items[-1] += " " + line.strip()
            out.append(bullets(items))
        else:
            out.append(wrap(" ".join(line.strip() for line in lines)))
    return "\n\n".join(out)
