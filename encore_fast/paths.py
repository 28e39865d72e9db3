"""Where things live: the data folder shared with tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path | None:
    """``$ENCORE_FAST_DATA``, else ``<project root>/../shared/data`` when it exists, else None."""
    env = os.environ.get("ENCORE_FAST_DATA")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def default_corpus() -> Path | None:
    """WikiText-2 (validation split) from the data folder, if there is one."""
    root = default_data_dir()
    if root is None:
        return None
    path = root / "wikitext-2" / "valid.txt"
    return path if path.exists() else None
