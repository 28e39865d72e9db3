"""Sequential (lifelong) editing runs: edit batch after batch, evaluate as the edits pile up.

A run lives in one folder (:mod:`encore_fast.eval.runfolder`: ``config.json``,
``results.jsonl``, the newest ``edits-NNNNN.safetensors``, ``snapshots/``). The runner edits
with ``history=0``, so the saved state is one compact file; resuming builds a fresh editor,
loads the newest file and goes on with the next batch, bit-for-bit as an uninterrupted run;
finished batches are never redone. At every evaluation point the edited layers' weights are
saved as a snapshot, so that evaluations can be run later or again (:func:`evaluate_snapshots`,
``encore-fast eval-snapshots``) -- with ``EvalSettings(defer=True)`` the run itself only edits,
and a second process evaluates the snapshots (into ``evals.jsonl``) while it goes on.

What an evaluation measures is up to the registered metrics (:mod:`encore_fast.eval.registry`,
run by :class:`~encore_fast.eval.evaluator.Evaluator`); each evaluation's per-item outcomes go
into ``outcomes/`` (:mod:`encore_fast.eval.outcomes`) before its line is appended. With
``EvalSettings(immediate=True)`` each batch's own facts are scored right after it is edited
(:mod:`encore_fast.eval.immediate`), and ``stop_on_collapse`` ends a run at the study's collapse
rule (:mod:`encore_fast.eval.collapse`).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from encore_fast.eval.collapse import judged, run_collapse
from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.evaluator import Evaluator
from encore_fast.eval.immediate import score_batch
from encore_fast.eval.outcomes import batch_file, eval_file
from encore_fast.eval.registry import registered
from encore_fast.eval.results import (  # (CONFIG_FILE ... read_results: importable from here)
    CONFIG_FILE,
    EVALS_FILE,
    RESULTS_FILE,
    SNAPSHOTS,
    RunConfigError,
    append_jsonl,
    as_dict,
    json_safe,
    load_run,
    read_results,
)
from encore_fast.eval.runfolder import RunFolder, evaluated_points, stream_hash
from encore_fast.eval.settings import EvalSettings
from encore_fast.eval.snapshots import list_snapshots, load_snapshot
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.provenance import stamp

__all__ = ["CONFIG_FILE", "EVALS_FILE", "RESULTS_FILE", "SNAPSHOTS", "EvalSettings", "Evaluator",
           "RunConfigError", "append_jsonl", "arrange_batches", "evaluate_snapshots",
           "read_results", "run_sequential"]


def run_sequential(
    editor: Any,
    records: Sequence[EvalRecord],
    out_dir: str | os.PathLike[str],
    *,
    num_edits: int | None = None,
    batch_size: int = 100,
    eval_every: int = 1,
    settings: EvalSettings | None = None,
    resume: bool = False,
    run_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    make_plots: bool = True,
    stop_on_collapse: bool = False,
) -> Path:
    """Edit the first ``num_edits`` records in batches of ``batch_size``, one after another.

    ``editor`` is an Editor, or a zero-argument factory returning a fresh one (needed to resume
    in a new process). Evaluates before editing, after every ``eval_every`` batches
    (0: only at the end) and after the last batch. ``run_info`` (e.g. model name) is stored in
    the config and must match on resume. ``stop_on_collapse``: after each evaluation, apply the
    study's collapse rule to the evaluations so far, and when it holds end the run with a
    ``"stopped"`` line; a deferred run applies it at each snapshot to the evaluations that
    ``eval-snapshots`` (run beside it with ``--follow``) has written so far. Returns the path of
    ``results.jsonl``.
    """
    settings = settings or EvalSettings()
    n = _check_sizes(len(records), num_edits, batch_size, eval_every)
    stream, batches = _stream_batches(records[:n], batch_size)
    folder = RunFolder(out_dir)
    folder.refuse_reuse(resume)  # before a model is loaded
    ed = _fresh_editor(editor)  # (a bad setting fails here: nothing written yet)
    config = json_safe({
        "method": getattr(ed, "method", None), "hparams": _settings(ed),
        "num_edits": n, "batch_size": batch_size, "eval_every": eval_every,
        "stream_sha256": stream_hash(stream), "settings": settings.as_config(),
        "run_info": dict(run_info or {}), "provenance": [stamp(device=_device(ed))],
    })
    lines = folder.open(config, resume)
    n_saved = folder.resume_position(ed, lines, batches)
    evaluate = _Evaluations(ed, folder, stream, batches, settings, eval_every, lines,
                            stop_on_collapse)
    bar = tqdm(total=len(batches), initial=n_saved, unit="batch", disable=not progress,
               desc=f"{config.get('method') or 'edit'} x{n}")
    try:
        _show(bar, evaluate(n_saved))
        for b in range(n_saved, len(batches)):
            if evaluate.stopped:
                break
            _edit_batch(ed, folder, batches, b, settings)
            bar.update(1)
            _show(bar, evaluate(b + 1))
    finally:
        bar.close()
    if make_plots:
        _plot(folder.path)
    return folder.results


def _settings(ed: Any) -> Any:
    """The editor's settings as its edits file stores them (own settings only when any)."""
    hparams = getattr(ed, "hparams", None)
    return hparams.to_dict() if hasattr(hparams, "to_dict") else hparams


def _device(ed: Any) -> Any:
    """The device of the editor's model (where the machine's stamp looks), else the CPU."""
    param = next(iter(getattr(ed.model, "parameters", lambda: iter(()))()), None)
    return param.device if param is not None else "cpu"


def _check_sizes(n_records: int, num_edits: int | None, batch_size: int, eval_every: int) -> int:
    """The number of edits (all records when None), checked with the batch sizes."""
    n = n_records if num_edits is None else num_edits
    if not 0 < n <= n_records:
        raise ValueError(f"num_edits must be in 1..{n_records}, got {n}")
    if batch_size < 1 or eval_every < 0:
        raise ValueError("batch_size must be >= 1 and eval_every >= 0")
    return n


def _fresh_editor(editor: Any) -> Any:
    """The editor (built, when a factory is given) with ``history=0``: checkpoints hold the
    current state only (no undo inside a run)."""
    is_factory = isinstance(editor, type) or not hasattr(editor, "edit")
    ed = editor() if is_factory else editor
    if getattr(ed, "history", 0) != 0:
        ed.history = 0
    return ed


def _stream_batches(records: Sequence[EvalRecord], batch_size: int) -> tuple[
        list[EvalRecord], list[list[EvalRecord]]]:
    """The stream in edit order (:func:`arrange_batches`, with a warning when it moved
    records) and its batches."""
    stream, moved = arrange_batches(records, batch_size)
    if moved:
        warnings.warn(f"{len(moved)} record(s) of the stream repeat or contradict another one "
                      f"of their batch (same prompt and subject): moved to the next batch "
                      f"(records {moved[:10]})", stacklevel=3)
    return stream, [stream[i : i + batch_size] for i in range(0, len(stream), batch_size)]


def _edit_batch(ed: Any, folder: RunFolder, batches: Sequence[Sequence[EvalRecord]],
                b: int, settings: EvalSettings) -> None:
    """Apply batch ``b`` (and score its own facts, when ``settings.immediate``, outside its
    time), then save the state with its results line and append the line."""
    start = time.perf_counter()
    requests = [rec.request for rec in batches[b]]
    reports = ed.edit(requests, batch_size=len(requests), progress=False)
    line: dict[str, Any] = {"type": "batch", "batch": b}
    line["edits_done"] = sum(len(x) for x in batches[: b + 1])
    line["wall_seconds"] = time.perf_counter() - start
    for report in reports:
        line.update({k: v for k, v in as_dict(report).items() if k not in line})
    if settings.immediate:
        line["immediate"] = _immediate(ed, folder, batches, b, settings)
    folder.record_batch(ed, b + 1, line)


def _immediate(ed: Any, folder: RunFolder, batches: Sequence[Sequence[EvalRecord]], b: int,
               settings: EvalSettings) -> dict[str, Any]:
    """Batch ``b``'s own facts scored now: the line's part (with the ``seconds`` it took); the
    rows into its outcome file."""
    start = time.perf_counter()
    first = sum(len(x) for x in batches[:b])
    records = batches[b]
    part, rows = score_batch(ed.model, ed.tokenizer, records,
                             range(first, first + len(records)), settings)
    folder.write_outcomes(batch_file(b), rows, {"batch": b, "edits_done": first + len(records)})
    return {**part, "seconds": time.perf_counter() - start}


class _Evaluations:
    """At each evaluation point of a run: the weight snapshot, then (unless deferred) the
    evaluation, appended to the results once; with ``stop``, the collapse rule after it."""

    def __init__(self, ed: Any, folder: RunFolder, stream: Sequence[EvalRecord],
                 batches: Sequence[Sequence[EvalRecord]], settings: EvalSettings,
                 eval_every: int, lines: Sequence[Mapping[str, Any]], stop: bool) -> None:
        self.ed, self.folder, self.batches, self.every = ed, folder, batches, eval_every
        self.evaluator = None if settings.defer else Evaluator(ed.tokenizer, stream, settings)
        if self.evaluator is not None:
            self.evaluator.restore(lines)
        self.done = evaluated_points(lines)
        self.watch = load_run(folder.path) if stop else None  # (the evaluations so far)
        self.stopped = any(line.get("type") == "stopped" for line in lines)

    def __call__(self, done: int) -> dict[str, Any] | None:
        n = len(self.batches)
        if not (done == 0 or done == n or (self.every and done % self.every == 0)):
            return None
        edits_done = sum(len(b) for b in self.batches[:done])
        self.folder.snapshot(self.ed, done, edits_done)
        if self.evaluator is None or done in self.done:
            if self.evaluator is None and self.watch is not None:
                self.watch = load_run(self.folder.path)  # (what eval-snapshots wrote so far)
            self._check(edits_done)
            return None
        line = _eval_line(self.evaluator, self.ed.model, done, edits_done,
                          self.ed.weight_norms, time.perf_counter(),
                          _writer(self.folder, done, deferred=False))
        self.folder.append(line)
        self.done.add(done)
        if self.watch is not None:
            self.watch.evals.append(json_safe(line))
            self.watch.outcome_files[done] = self.folder.path / eval_file(done)
        self._check(edits_done)
        return line

    def _check(self, edits_done: int) -> None:
        """With ``stop``: end the run when the evaluations so far meet the collapse rule (a
        ``"stopped"`` line says where and why, once)."""
        if self.watch is None or self.stopped or not judged(self.watch):
            return
        found = run_collapse(self.watch)
        if found is not None:
            self.folder.append({"type": "stopped", "reason": "collapse",
                                "edits_done": edits_done, "collapsed_at": found.edits,
                                "criteria": found.reasons})
            self.stopped = True


def _writer(folder: RunFolder, batches: int, deferred: bool) -> Callable[..., Any]:
    """Writes an evaluation's outcome rows into its file of ``folder``."""

    def write(line: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
        folder.write_outcomes(eval_file(batches, deferred), rows,
                              {"batches": batches, "edits_done": line["edits_done"],
                               "deferred": deferred})

    return write


def _eval_line(evaluator: Evaluator, model: Any, batches: int, edits_done: int,
               weight_norms: Callable[[], Any], start: float,
               write: Callable[..., Any]) -> dict[str, Any]:
    """An evaluation line: the position, the metrics' parts, the edited matrices' norms (as
    the run recorded them) and the seconds it took since ``start`` (its outcome rows written
    by ``write`` included)."""
    line = {"type": "eval", "batches": batches, "edits_done": edits_done}
    line.update(evaluator(model, edits_done))
    line["weight_norms"] = weight_norms()
    write(line, evaluator.outcomes)
    line["seconds"] = time.perf_counter() - start
    return line


def evaluate_snapshots(
    run_dir: str | os.PathLike[str],
    model: Any,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    settings: EvalSettings,
    *,
    follow: bool = False,
    poll_seconds: float = 60.0,
    progress: bool = True,
    at: Collection[int] | None = None,
    stop_on_collapse: bool = False,
) -> Path:
    """Evaluate every snapshot of a run (oldest first) that ``evals.jsonl`` does not hold yet
    (``at``: only those after these numbers of edits, and the unedited one; with
    ``stop_on_collapse``, none after the evaluations so far meet the study's collapse rule:
    the run's last points are those up to its collapse).

    ``model`` is a fresh copy of the run's original model (same dtype): each snapshot's weights
    are put into it in turn. ``records`` is the run's stream (checked against its hash).
    Resumable: finished evaluations are kept, a torn last line dropped. ``follow``: keep
    waiting for new snapshots while the run goes on, until the last batch's one is done or the
    run has stopped (a deferred run with ``stop_on_collapse`` stops on what this writes). Each
    evaluation's outcome rows go into ``outcomes/snapshot-NNNNN.jsonl.gz``.
    """
    folder = RunFolder(run_dir)
    config = folder.config()
    stream = _run_stream(folder, config, records)
    n_batches = -(-config["num_edits"] // config["batch_size"])
    wanted = _wanted_batches(config, at)
    evals = folder.path / EVALS_FILE
    lines = read_results(evals, repair=True)
    evaluator = Evaluator(tokenizer, stream, settings)
    evaluator.restore(lines)
    done = evaluated_points(lines)
    fingerprint = model_fingerprint(model)  # (of the original weights, before any snapshot)
    bar = tqdm(desc=f"evaluating {folder.path.name}", unit="snapshot", disable=not progress)
    try:
        while True:
            ended = follow and _stopped(folder.path)  # (read first: its snapshots are all there)
            for b, path in _pending_snapshots(folder, done, wanted).items():
                if stop_on_collapse and _collapsed(folder.path):
                    follow = False
                    break
                start = time.perf_counter()
                info = load_snapshot(model, path, fingerprint)
                line = _eval_line(evaluator, model, b, info["edits_done"],
                                  lambda info=info: info.get("weight_norms"), start,
                                  _writer(folder, b, deferred=True))
                append_jsonl(evals, line)
                done.add(b)
                bar.update(1)
                _show(bar, line)
            if not follow or (wanted <= done if wanted is not None else n_batches in done) \
                    or ended:
                break
            time.sleep(poll_seconds)
    finally:
        bar.close()
    return evals


def _stopped(run_dir: Path) -> bool:
    """Whether the run has ended before its last batch (a ``"stopped"`` line): no more
    snapshots will come. (Its snapshots up to there are evaluated first.)"""
    return any(x.get("type") == "stopped" for x in read_results(run_dir / RESULTS_FILE))


def _collapsed(run_dir: Path) -> bool:
    """Whether a run's evaluations so far meet the study's collapse rule."""
    run = load_run(run_dir)
    return judged(run) and run_collapse(run) is not None


def _run_stream(folder: RunFolder, config: Mapping[str, Any],
                records: Sequence[EvalRecord]) -> list[EvalRecord]:
    """The run's edit stream from ``records`` (refused when it is not the one it edited)."""
    stream, _ = arrange_batches(records[: config["num_edits"]], config["batch_size"])
    if len(stream) != config["num_edits"] or stream_hash(stream) != config["stream_sha256"]:
        raise RunConfigError(f"{folder.path}: the records given are not the run's edit stream")
    return stream


def _wanted_batches(config: Mapping[str, Any], at: Collection[int] | None) -> set[int] | None:
    """The batch counts after which the run has made the numbers of edits ``at`` (and 0);
    None: every snapshot. An edit count that no batch ends at is an error."""
    if at is None:
        return None
    n, size = config["num_edits"], config["batch_size"]
    ends = {min(b * size, n): b for b in range(-(-n // size) + 1)}
    bad = sorted(e for e in at if e not in ends)
    if bad:
        raise RunConfigError(f"no batch of this run ends at {bad} edits (batches of {size}, "
                             f"{n} edits)")
    return {0} | {ends[e] for e in at}


def _pending_snapshots(folder: RunFolder, done: set[int],
                       wanted: set[int] | None = None) -> dict[int, Path]:
    """The run's snapshots not evaluated yet (of those ``wanted``), oldest first (the unedited
    one must exist)."""
    todo = {b: p for b, p in list_snapshots(folder.path / SNAPSHOTS).items()
            if b not in done and (wanted is None or b in wanted)}
    if 0 not in done and 0 not in todo:
        raise RunConfigError(f"{folder.path}: no snapshot of the unedited model (0 batches)")
    return todo


def arrange_batches(records: Sequence[EvalRecord], batch_size: int) -> tuple[
        list[EvalRecord], list[int]]:
    """The stream in the order it is edited: a record whose prompt and subject already occur
    in its batch (a repeat, or another target for the same fact, which one batch cannot
    hold) moves to the front of the next batch that has room for it; the order is otherwise
    kept. Returns the records and the indices of those moved."""
    remaining, out, moved = list(records), [], []
    while remaining:
        batch, keys, rest = [], set(), []
        for rec in remaining:
            key = (rec.request.text, rec.request.subject)
            if len(batch) == batch_size or key in keys:
                if key in keys and rec.index not in moved:
                    moved.append(rec.index)
                rest.append(rec)
                continue
            keys.add(key)
            batch.append(rec)
        out += batch
        remaining = rest
    return out, moved


def _show(bar: Any, line: Mapping[str, Any] | None) -> None:
    """The registered metrics' progress values of an evaluation line, on the progress bar."""
    if not line:
        return
    shown: dict[str, float] = {}
    for metric in registered():
        shown.update(metric.progress(line))
    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)


def _plot(out: Path) -> None:
    try:
        from encore_fast.eval.plots import plot_runs
    except ImportError as exc:  # matplotlib is an optional dependency
        warnings.warn(f"no plots ({exc}); install encore_fast[eval]", stacklevel=2)
        return
    plot_runs([out], out / "plots")
