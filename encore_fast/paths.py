"""Where things live: the cache, the data folder beside the checkout, and the local copy of a
data file (one resolver for every default that reads a data file by its path in that folder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of encore_fast's caches: ``$ENCORE_FAST_CACHE`` or ``~/.cache/encore_fast``."""
    root = os.environ.get("ENCORE_FAST_CACHE") or Path.home() / ".cache" / "encore_fast"
    return Path(root)


def data_cache_dir() -> Path:
    """Where downloaded data files are kept: ``<cache_dir>/data``, laid out like a data folder
    (``counterfact/counterfact-edit.json``, ``wikitext-2/valid.txt``, ...)."""
    return cache_dir() / "data"


def default_data_dir() -> Path | None:
    """``$ENCORE_FAST_DATA``, else ``<project root>/../shared/data`` when it exists, else None."""
    env = os.environ.get("ENCORE_FAST_DATA")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def data_folders(data_dir: str | os.PathLike[str] | None = None, cache: bool = True
                 ) -> list[Path]:
    """The folders searched for a data file, in order: ``data_dir`` (a folder the caller
    gives), :func:`default_data_dir`, then (``cache``) the download cache."""
    folders = [Path(data_dir)] if data_dir is not None else []
    default = default_data_dir()
    if default is not None:
        folders.append(default)
    if cache:
        folders.append(data_cache_dir())
    return folders


def find_data_file(relpath: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The first existing ``<folder>/<relpath>`` (a file or a folder) of :func:`data_folders`,
    else None. Nothing is downloaded (``encore_fast.data.locate`` does that)."""
    for folder in data_folders(data_dir):
        path = folder / relpath
        if path.exists():
            return path
    return None


def default_corpus() -> Path | None:
    """WikiText-2 (validation split) from the data folder or the download cache, if there."""
    return find_data_file("wikitext-2/valid.txt")
