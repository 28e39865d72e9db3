"""The files of a run folder and how they are read and written (JSON lines, made durable),
and a finished (or running) run read back (:class:`RunData`).

Shared by the runner (:mod:`encore_fast.eval.run`), the metrics' summaries and plots
(:mod:`encore_fast.eval.seam`) and the reports (:mod:`encore_fast.eval.report`), which read a run
without importing the runner.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from encore_fast.errors import EncoreFastError
from encore_fast.eval.outcomes import Row, batch_file, eval_file, read_outcomes
from encore_fast.models.arch import Site, site_from_text, site_order

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
EVALS_FILE = "evals.jsonl"  # evaluations of the snapshots, made after (or beside) the run
SNAPSHOTS = "snapshots"


class RunConfigError(EncoreFastError, RuntimeError):
    """A run folder that cannot be (re)used: different config, or inconsistent files."""


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line and make it durable (flush + fsync) before returning."""
    data = json.dumps(json_safe(record), sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_results(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """The lines of a results file. A torn last line (interrupted write) is ignored, and cut
    from the file when ``repair``; a bad line anywhere else is an error."""
    path = Path(path)
    if not path.exists():
        return []
    chunks = path.read_bytes().split(b"\n")  # the last chunk is what follows the last newline
    last = max((i for i, c in enumerate(chunks) if c.strip()), default=-1)
    lines, offset = [], 0
    for i, chunk in enumerate(chunks):
        try:
            if chunk.strip():
                if i == len(chunks) - 1:
                    raise ValueError("no newline: the write never finished")
                lines.append(json.loads(chunk))
        except ValueError:
            if i != last:
                raise RunConfigError(f"{path}: line {i + 1} is not valid JSON") from None
            if repair:
                with open(path, "r+b") as fh:
                    fh.truncate(offset)
                    fh.flush()
                    os.fsync(fh.fileno())
            break
        offset += len(chunk) + 1
    return lines


def as_dict(obj: Any) -> dict[str, Any]:
    """The fields of a dataclass, mapping or plain object, as a dict."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return dict(obj)
    return dict(vars(obj))


def json_safe(obj: Any) -> Any:
    """Plain JSON types: dataclasses/objects -> dicts, tensors -> lists, keys -> str."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        return json_safe(as_dict(obj))
    return str(obj)


@dataclass
class RunData:
    """One run folder: its config, batch lines and evaluation lines (and, where they were
    written, the evaluations' outcome files: ``outcome_files``, by batches done)."""

    label: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    outcome_files: dict[int, Path] = field(default_factory=dict)
    _read: dict[Path, list[Row]] = field(default_factory=dict, repr=False, compare=False)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)  # (derived)

    def outcomes(self, line: Mapping[str, Any]) -> list[Row] | None:
        """The outcome rows of one of the run's evaluation lines (None: none written)."""
        path = self.outcome_files.get(line.get("batches", -1))
        return None if path is None else self._rows(path)

    def batch_outcomes(self) -> list[list[Row]]:
        """The immediate-efficacy rows of every batch that has them."""
        paths = [self.path / batch_file(b["batch"]) for b in self.batches if "immediate" in b]
        return [self._rows(p) for p in paths if p.exists() and intervals_available()]

    def _rows(self, path: Path) -> list[Row]:
        if path not in self._read:
            self._read[path] = read_outcomes(path)[1]
        return self._read[path]

    def original_norms(self) -> dict[Site, float]:
        """Edited matrices' norms before any edit (the evaluation at 0 edits)."""
        for line in self.evals:
            if line.get("edits_done") == 0 and line.get("weight_norms"):
                return _site_keys(line["weight_norms"])
        return {}

    def norm_series(self) -> tuple[list[int], dict[Site, list[float]]]:
        """Edits done, and per edited matrix ``||W||/||W_0||`` after each batch (0 edits
        included)."""
        original = self.original_norms()
        points = [(0, original)] if original else []
        points += [
            (b["edits_done"], _site_keys(b["weight_norms"]))
            for b in self.batches
            if b.get("weight_norms")
        ]
        edits = [e for e, _ in points]
        ratios = {
            layer: [norms.get(layer, float("nan")) / w0 for _, norms in points]
            for layer, w0 in sorted(original.items(), key=lambda kv: site_order(kv[0]))
        }
        return edits, ratios


def load_run(path: str | os.PathLike[str], label: str | None = None) -> RunData:
    """Read a run folder written by :func:`encore_fast.eval.run.run_sequential` (evaluations
    of its snapshots in ``evals.jsonl`` replace those of the same point in the results). Its
    outcome files are used where SciPy, which computes their intervals, is installed (without
    it the run reads as one written before them: plain numbers)."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    lines = read_results(path / RESULTS_FILE)
    deferred = [x for x in read_results(path / EVALS_FILE) if x.get("type") == "eval"]
    later = {x["batches"] for x in deferred}  # (a snapshot's later evaluation wins)
    evals = [x for x in lines if x.get("type") == "eval" and x["batches"] not in later]
    files = {x["batches"]: path / eval_file(x["batches"]) for x in evals}
    files.update({x["batches"]: path / eval_file(x["batches"], deferred=True) for x in deferred})
    evals = sorted(evals + deferred, key=lambda x: x["batches"])
    info = config.get("run_info") or {}
    label = label or info.get("label") or config.get("method") or path.name
    return RunData(
        label=str(label),
        path=path,
        config=config,
        batches=[x for x in lines if x.get("type") == "batch"],
        evals=evals,
        outcome_files={b: p for b, p in files.items() if p.exists() and intervals_available()},
    )


def intervals_available() -> bool:
    """Whether SciPy (extra ``eval``), which computes the intervals, is installed."""
    return importlib.util.find_spec("scipy") is not None


def _site_keys(d: dict[str, float]) -> dict[Site, float]:
    return {site_from_text(k): float(v) for k, v in d.items()}
