"""Claims generated from the data: a README's result sentences and tables sit between markers,

    <!-- claims:NAME -->
    ...generated text...
    <!-- /claims:NAME -->

and are written by a generator (a function from the repository's root folder to markdown) that
reads the committed result files. :func:`check` tells which blocks differ from what their
generators write now, so a test fails when a number in a README is edited by hand or its data
changed without the text; :func:`fill` writes them anew.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

Generator = Callable[[Path], str]
BLOCK = re.compile(r"<!-- claims:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /claims:(?P=name) -->",
                   re.S)


def blocks(text: str) -> dict[str, str]:
    """The generated blocks of a text: name -> body (between the markers)."""
    found: dict[str, str] = {}
    for m in BLOCK.finditer(text):
        if m["name"] in found:
            raise ValueError(f"claims block {m['name']!r} appears twice")
        found[m["name"]] = m["body"]
    return found


def generate(names: list[str], generators: Mapping[str, Generator], root: Path) -> dict[str, str]:
    """Each named block's text as its generator writes it now (ending in a newline)."""
    missing = sorted(set(names) - set(generators))
    if missing:
        raise KeyError(f"no generator for claims block(s) {missing}")
    return {n: generators[n](root).rstrip("\n") + "\n" for n in names}


def check(text: str, generators: Mapping[str, Generator], root: Path) -> list[str]:
    """Names of the blocks of ``text`` whose body differs from what is generated now."""
    have = blocks(text)
    now = generate(list(have), generators, root)
    return [n for n in have if have[n] != now[n]]


def fill(text: str, generators: Mapping[str, Generator], root: Path) -> str:
    """``text`` with every block's body written anew by its generator."""
    now = generate(list(blocks(text)), generators, root)
    return BLOCK.sub(lambda m: f"<!-- claims:{m['name']} -->\n{now[m['name']]}"
                               f"<!-- /claims:{m['name']} -->", text)
