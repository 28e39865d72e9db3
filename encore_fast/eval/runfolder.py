"""A sequential run's folder on disk: config, results lines, saved edits, snapshots.

* ``config.json`` -- what the run is (method, hyper-parameters, edit stream, settings);
  a resumed run must match it exactly, but for ``provenance``: one stamp per session that ran it
  (:func:`encore_fast.provenance.stamp`: command, commit, versions, machine, date), appended
  when a session resumes it.
* ``results.jsonl`` -- one JSON line per finished batch (``"type": "batch"``: the editor's
  BatchReport: time, steps, norms) and per evaluation (``"type": "eval"``: the metrics' parts,
  the norms). Lines are appended with flush + fsync; a torn last line is dropped on resume.
* ``edits-NNNNN.safetensors`` -- the editor's state after NNNNN batches, saved with the batch's
  results line (written to a temporary file, then ``os.replace``-d, then the older one
  removed): one compact state, the same size after 10 batches as after 100.
* ``snapshots/weights-NNNNN.safetensors`` -- the edited layers' weights at every evaluation
  point, evaluated later or again into ``evals.jsonl``.
* ``outcomes/*.jsonl.gz`` -- the per-item outcomes of each evaluation and batch
  (:mod:`encore_fast.eval.outcomes`), written before the line they belong to.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.outcomes import write_outcomes
from encore_fast.eval.results import (
    CONFIG_FILE,
    RESULTS_FILE,
    SNAPSHOTS,
    RunConfigError,
    append_jsonl,
    json_safe,
    read_results,
)
from encore_fast.eval.snapshots import save_snapshot
from encore_fast.io import atomic_write_text

_EDITS = re.compile(r"^edits-(\d{5,})\.safetensors$")
UNCOMPARED = ("provenance",)  # config keys a resume does not compare (it appends to them)


def stream_hash(stream: Sequence[EvalRecord]) -> str:
    """The SHA-256 of the edit stream (records in edit order), recorded in the config. A plain
    request (``chat`` false) is hashed without that field, as before it existed, so older run
    folders still resume."""
    records = [json_safe(rec) for rec in stream]
    for rec in records:
        request = rec.get("request") if isinstance(rec, dict) else None
        if isinstance(request, dict) and request.get("chat") is False:
            del request["chat"]
    text = json.dumps(records, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class RunFolder:
    """The files of one run folder, read and written as the runner goes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / RESULTS_FILE

    def refuse_reuse(self, resume: bool) -> None:
        """A folder holding a run is only resumed (checked before a model is loaded)."""
        if (self.path / CONFIG_FILE).exists() and not resume:
            raise RunConfigError(f"{self.path} already holds a run; resume it (resume=True / "
                                 "--resume) or pick another folder")

    def open(self, config: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
        """Start a fresh run folder, or check the old config and read its results for
        resuming (a torn last line is cut)."""
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.exists():
            if self.results.exists() or self._edits_files():
                raise RunConfigError(f"{self.path} holds results but no {CONFIG_FILE}; "
                                     "use a new folder")
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cfg_path, json.dumps(config, indent=2, sort_keys=True))
            return []
        self.refuse_reuse(resume)
        old = self.config()
        diff = sorted(k for k in set(old) | set(config)
                      if k not in UNCOMPARED and old.get(k) != config.get(k))
        if diff:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {config.get(k)!r}" for k in diff)
            raise RunConfigError(f"cannot resume {self.path}: the run config differs ({details})")
        if config.get("provenance"):  # this session's stamp, after those of earlier ones
            old["provenance"] = [*(old.get("provenance") or []), *config["provenance"]]
            atomic_write_text(cfg_path, json.dumps(old, indent=2, sort_keys=True))
        return read_results(self.results, repair=True)

    def config(self) -> dict[str, Any]:
        """The run's ``config.json``."""
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.exists():
            raise RunConfigError(f"{self.path} holds no run ({CONFIG_FILE} missing)")
        return json.loads(cfg_path.read_text(encoding="utf-8"))

    def resume_position(self, editor: Any, lines: list[dict[str, Any]],
                        batches: Sequence[Sequence[EvalRecord]]) -> int:
        """Load the newest saved state into ``editor``; the number of batches it holds (a
        batch saved but not logged gets its line back, from the state file)."""
        n_batch_lines = _check_batch_lines(lines)
        n_saved = self._load_newest_edits(editor)
        if n_saved < n_batch_lines or n_saved > n_batch_lines + 1:
            raise RunConfigError(
                f"{self.path}: results.jsonl has {n_batch_lines} batches but the newest saved "
                f"edits hold {n_saved}; the folder is inconsistent, start a new run"
            )
        if n_saved == n_batch_lines + 1:  # saved, then interrupted before the line was written
            line = self._saved_line(editor, n_saved)
            if line is None:  # edits saved by an older version, without their line
                line = {"type": "batch", "batch": n_saved - 1, "recovered": True}
                line["edits_done"] = sum(len(b) for b in batches[:n_saved])
                line["weight_norms"] = editor.weight_norms()
            append_jsonl(self.results, line)
            lines.append(json_safe(line))
        return n_saved

    def record_batch(self, editor: Any, batches_done: int, line: Mapping[str, Any]) -> None:
        """Save the editor's state with the batch's results line (the line travels with the
        edits it describes), drop the older state, then append the line."""
        final = self.path / f"edits-{batches_done:05d}.safetensors"
        editor.save_edits(final, metadata={"run_line": json_safe(line)})
        for count, path in self._edits_files().items():
            if count != batches_done:
                path.unlink(missing_ok=True)
        append_jsonl(self.results, line)

    def snapshot(self, editor: Any, batches_done: int, edits_done: int) -> None:
        """The edited weights at an evaluation point, unless saved before."""
        snap = self.path / SNAPSHOTS / f"weights-{batches_done:05d}.safetensors"
        if not snap.exists():
            save_snapshot(editor, snap, {"batches": batches_done, "edits_done": edits_done,
                                         "weight_norms": editor.weight_norms()})

    def append(self, line: Mapping[str, Any]) -> None:
        """Append an evaluation line to the results."""
        append_jsonl(self.results, line)

    def write_outcomes(self, name: str, rows: Sequence[Mapping[str, Any]],
                       header: Mapping[str, Any]) -> Path:
        """Write an outcome file (``name`` relative to the folder), atomically."""
        return write_outcomes(self.path / name, rows, header)

    def _edits_files(self) -> dict[int, Path]:
        found = {}
        for path in self.path.iterdir() if self.path.is_dir() else ():
            match = _EDITS.match(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def _saved_line(self, editor: Any, batches_done: int) -> dict[str, Any] | None:
        """The results line saved with the newest edits (None for files without one)."""
        read = getattr(editor, "read_metadata", None)
        if read is None:
            return None
        line = read(self.path / f"edits-{batches_done:05d}.safetensors").get("run_line")
        return dict(line) if isinstance(line, Mapping) else None

    def _load_newest_edits(self, editor: Any) -> int:
        """Load the newest saved state into a still-unedited editor; return its batch count."""
        for pattern in ("edits-*.tmp.safetensors", ".edits-*.safetensors.tmp*"):
            for stale in self.path.glob(pattern):  # a save that was interrupted
                stale.unlink(missing_ok=True)
        files = self._edits_files()
        if not files:
            return 0
        if getattr(editor, "num_batches", 0):
            raise RunConfigError("resuming needs an unedited editor (pass a factory, not an "
                                 "editor)")
        newest = max(files)
        editor.load_edits(files[newest])
        return newest


def evaluated_points(lines: Sequence[Mapping[str, Any]]) -> set[int]:
    """The batch counts that the evaluation lines among ``lines`` cover."""
    return {line["batches"] for line in lines if line.get("type") == "eval"}


def _check_batch_lines(lines: Sequence[Mapping[str, Any]]) -> int:
    got = [line["batch"] for line in lines if line.get("type") == "batch"]
    if got != list(range(len(got))):
        raise RunConfigError(f"batch lines out of order or repeated: {got[:20]}")
    return len(got)
