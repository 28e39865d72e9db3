"""Where a result came from: the command, the code's commit, the library versions, the machine
and the date -- one helper that every result file (CSV row, run ``config.json``) is stamped by,
so that any number can be reproduced from its row."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from encore_fast.machine import describe_machine

PACKAGES = ("torch", "transformers", "triton", "scipy", "numpy", "encore_fast")
STAMP_KEYS = ("command", "commit", "versions", "machine", "date")


def git_commit(where: str | Path | None = None) -> str:
    """The checkout's commit (``+dirty`` when tracked files differ from it), or ``unknown``
    outside a git checkout."""
    root = Path(where) if where is not None else Path(__file__).resolve().parents[1]
    try:
        run = dict(cwd=root, capture_output=True, text=True, timeout=10, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def stamp(command: str | Sequence[str] | None = None, device: Any = "cpu") -> dict[str, Any]:
    """``{command, commit, versions, machine, date}`` for a result (``command``: default the
    running program's command line)."""
    if command is None:
        command = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    text = command if isinstance(command, str) else " ".join(str(c) for c in command)
    return {"command": text, "commit": git_commit(), "versions": versions(),
            "machine": describe_machine(device),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def stamp_columns(stamp_: dict[str, Any]) -> dict[str, str]:
    """The stamp flattened for a CSV row: ``command, commit, machine, date, v_<package>``."""
    flat = {k: str(stamp_[k]) for k in ("command", "commit", "machine", "date")}
    flat.update({f"v_{k}": v for k, v in stamp_["versions"].items()})
    return flat
