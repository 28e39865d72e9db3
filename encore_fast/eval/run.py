"""Sequential (lifelong) editing runs: edit batch after batch, evaluate as the edits pile up.

A run lives in one folder:

* ``config.json`` -- what the run is (method, hyper-parameters, edit stream, settings);
  a resumed run must match it exactly.
* ``results.jsonl`` -- one JSON line per finished batch (``"type": "batch"``: the editor's
  BatchReport: time, steps, norms) and per evaluation (``"type": "eval"``: metrics, perplexity,
  known facts, norms). Lines are appended with flush + fsync; a torn last line is dropped on
  resume.
* ``edits-NNNNN.safetensors`` -- the editor's state after NNNNN batches (written to a temporary
  file, then ``os.replace``-d, then the older one removed). The runner edits with
  ``history=0``, so this is one compact state (edited matrices, ``S``, solver state, contexts,
  the requests so far), the same size after 10 batches as after 100. Resuming builds a fresh
  editor, loads the newest file and goes on with the next batch, bit-for-bit as an
  uninterrupted run; finished batches are never redone.
* ``snapshots/weights-NNNNN.safetensors`` -- at every evaluation point, the edited layers'
  weights as the model holds them (a partial ``state_dict``), so that evaluations can be run
  later or again (:func:`evaluate_snapshots`, ``encore-fast eval-snapshots``) -- with
  ``EvalSettings(defer=True)`` the run itself only edits, and a second process evaluates the
  snapshots (into ``evals.jsonl``) while it goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.degradation import (
    known_fact_hits,
    load_known_facts,
    perplexity,
    perplexity_windows,
)
from encore_fast.eval.downstream import evaluate_downstream, load_tasks
from encore_fast.eval.generation import realistic_metrics
from encore_fast.eval.metrics import counterfact_metrics, evaluate_records
from encore_fast.eval.results import (
    CONFIG_FILE,
    EVALS_FILE,
    RESULTS_FILE,
    SNAPSHOTS,
    RunConfigError,
    append_jsonl,
    as_dict,
    json_safe,
    read_results,
)
from encore_fast.eval.snapshots import list_snapshots, load_snapshot, save_snapshot
from encore_fast.io import atomic_write_text

_EDITS = re.compile(r"^edits-(\d{5,})\.safetensors$")


@dataclass
class EvalSettings:
    """What each evaluation measures, and how much of it (cheap defaults)."""

    sample: int | None = None  # fixed random sample of the stream; None: every edited record
    seed: int = 0  # seed of that sample
    batch_size: int = 16  # prompts per forward pass
    generation_tokens: int = 0  # > 0: greedy generations of this length for GE
    generation_source: str = "dataset"  # "dataset" (generation_prompts) or "rewrite"
    wikitext: str | None = None  # text file for perplexity; None: skip
    ppl_tokens: int = 8192  # first tokens of it that are scored
    ppl_window: int = 256  # non-overlapping window length
    known_facts: str | None = None  # known_1000.json-style file; None: skip
    known_n: int | None = 200  # first facts of it that are checked; None: all
    downstream: str | None = None  # folder of the downstream task files; None: skip
    downstream_n: int = 100  # test examples per task
    downstream_shots: int = 3  # few-shot examples per task (the head of its file)
    realistic: bool = False  # greedy-generation accuracy (real_es / real_ps / real_ns)
    realistic_neighbours: int = 2  # neighbourhood prompts per record that are generated
    forgetting: int = 0  # > 0: also score the first this many edited facts (es, ps, real_es)
    defer: bool = False  # the run only saves snapshots; evaluate them with evaluate_snapshots


class Evaluator:
    """Runs the evaluations of one run; data sets are prepared once and reused."""

    def __init__(self, tokenizer: Any, stream: Sequence[EvalRecord], settings: EvalSettings):
        self.tokenizer = tokenizer
        self.stream = list(stream)
        self.settings = settings
        n = len(self.stream)
        if settings.sample is not None and settings.sample < n:
            self.sample = sorted(random.Random(settings.seed).sample(range(n), settings.sample))
        else:
            self.sample = list(range(n))
        self.windows = None
        if settings.wikitext:
            text = Path(settings.wikitext).read_text(encoding="utf-8")
            self.windows = perplexity_windows(
                tokenizer, text, settings.ppl_tokens, settings.ppl_window
            )
        self.facts = (
            load_known_facts(settings.known_facts, settings.known_n)
            if settings.known_facts
            else None
        )
        self.baseline_known: list[int] | None = None
        self.baseline_answers: dict[str, str] | None = None
        self.tasks = None
        if settings.downstream:
            self.tasks = load_tasks(settings.downstream, shots=settings.downstream_shots,
                                    n=settings.downstream_n)

    def restore(self, lines: Sequence[Mapping[str, Any]]) -> None:
        """Take the baselines (known facts, unedited neighbourhood answers) from the first
        evaluation of an earlier session."""
        for line in lines:
            if line.get("type") != "eval":
                continue
            if self.baseline_known is None and line.get("known_correct") is not None:
                self.baseline_known = list(line["known_correct"])
            if self.baseline_answers is None and line.get("neighbour_answers") is not None:
                self.baseline_answers = dict(line["neighbour_answers"])

    def records_at(self, edits_done: int) -> list[EvalRecord]:
        """Records evaluated after ``edits_done`` edits: the sampled ones already edited
        (before any edit: the whole sample, i.e. the unedited model's baseline)."""
        if edits_done == 0:
            return [self.stream[i] for i in self.sample]
        return [self.stream[i] for i in self.sample if i < edits_done]

    def __call__(self, model: Any, edits_done: int) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {}
        records = self.records_at(edits_done)
        out["metrics"] = evaluate_records(
            model,
            self.tokenizer,
            records,
            s.batch_size,
            s.generation_tokens,
            s.generation_source,  # type: ignore[arg-type]
        )
        if s.realistic:
            self._realistic(model, records, out)
        if s.forgetting and edits_done:
            first = self.stream[: min(s.forgetting, edits_done)]
            out["forgetting"] = self._first_facts(model, first)
        if self.tasks is not None:
            out["downstream"] = evaluate_downstream(model, self.tokenizer, self.tasks,
                                                    s.batch_size)
        if self.windows is not None:
            out["perplexity"] = perplexity(model, self.windows)
        if self.facts is not None:
            hits = known_fact_hits(model, self.tokenizer, self.facts, s.batch_size)
            correct = [i for i, hit in enumerate(hits) if hit]
            out["known_acc"] = len(correct) / len(hits) if hits else None
            out["known_correct"] = correct
            if self.baseline_known is None:
                self.baseline_known = correct
            kept = set(correct)
            base = self.baseline_known
            out["known_retained"] = sum(i in kept for i in base) / len(base) if base else None
        return out

    def _realistic(self, model: Any, records: Sequence[EvalRecord], out: dict[str, Any]) -> None:
        s = self.settings
        real, answers = realistic_metrics(model, self.tokenizer, records,
                                          self.baseline_answers, s.realistic_neighbours,
                                          s.batch_size)
        if self.baseline_answers is None:  # the unedited model's answers: the baseline
            self.baseline_answers = answers
            out["neighbour_answers"] = answers
            real["real_ns"] = 1.0
        out["metrics"].update(real)

    def _first_facts(self, model: Any, first: Sequence[EvalRecord]) -> dict[str, Any]:
        """ES, PS (and real_es) on the first edited facts: do early edits survive?"""
        s = self.settings
        if first[0].kind != "counterfact":
            return evaluate_records(model, self.tokenizer, first, s.batch_size)
        out = dict(counterfact_metrics(model, self.tokenizer, first, s.batch_size,
                                       groups=("es", "ps")))
        if s.realistic:
            real, _ = realistic_metrics(model, self.tokenizer, first, None, 0, s.batch_size,
                                        groups=("es",))
            out.update(real)
        return out


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
) -> Path:
    """Edit the first ``num_edits`` records in batches of ``batch_size``, one after another.

    ``editor`` is an Editor, or a zero-argument factory returning a fresh one (needed to resume
    in a new process). Evaluates before editing, after every ``eval_every`` batches
    (0: only at the end) and after the last batch. ``run_info`` (e.g. model name) is stored in
    the config and must match on resume. Returns the path of ``results.jsonl``.
    """
    settings = settings or EvalSettings()
    out = Path(out_dir)
    n = len(records) if num_edits is None else num_edits
    if not 0 < n <= len(records):
        raise ValueError(f"num_edits must be in 1..{len(records)}, got {n}")
    if batch_size < 1 or eval_every < 0:
        raise ValueError("batch_size must be >= 1 and eval_every >= 0")
    stream, batches = _stream_batches(records[:n], batch_size)
    if (out / CONFIG_FILE).exists() and not resume:  # before a model is loaded
        raise RunConfigError(
            f"{out} already holds a run; resume it (resume=True / --resume) or pick another folder"
        )
    is_factory = isinstance(editor, type) or not hasattr(editor, "edit")
    ed = editor() if is_factory else editor  # (a bad setting fails here: nothing written yet)
    if getattr(ed, "history", 0) != 0:
        ed.history = 0  # checkpoints hold the current state only (no undo inside a run)
    out.mkdir(parents=True, exist_ok=True)
    config = json_safe({
        "method": getattr(ed, "method", None), "hparams": getattr(ed, "hparams", None),
        "num_edits": n, "batch_size": batch_size, "eval_every": eval_every,
        "stream_sha256": _stream_hash(stream),
        "settings": {"defer": True} if settings.defer else dataclasses.asdict(settings),
        "run_info": dict(run_info or {}),
    })
    lines = _open_run(out, config, resume)
    n_saved = _resume_position(ed, out, lines, batches)
    evaluate = _Evaluations(ed, out, stream, batches, settings, eval_every, lines)
    bar = tqdm(total=len(batches), initial=n_saved, unit="batch", disable=not progress,
               desc=f"{config.get('method') or 'edit'} x{n}")
    try:
        _show(bar, evaluate(n_saved))
        for b in range(n_saved, len(batches)):
            _edit_batch(ed, out, batches, b)
            bar.update(1)
            _show(bar, evaluate(b + 1))
    finally:
        bar.close()
    if make_plots:
        _plot(out)
    return out / RESULTS_FILE


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


def _resume_position(ed: Any, out: Path, lines: list[dict[str, Any]],
                     batches: Sequence[Sequence[EvalRecord]]) -> int:
    """Load the newest saved state into ``ed``; the number of batches it holds (a batch saved
    but not logged gets its line back, from the state file)."""
    n_batch_lines = _check_batch_lines(lines)
    n_saved = _load_newest_edits(ed, out)
    if n_saved < n_batch_lines or n_saved > n_batch_lines + 1:
        raise RunConfigError(
            f"{out}: results.jsonl has {n_batch_lines} batches but the newest saved edits hold "
            f"{n_saved}; the folder is inconsistent, start a new run"
        )
    if n_saved == n_batch_lines + 1:  # saved, then interrupted before the line was written
        line = _saved_line(ed, out, n_saved)
        if line is None:  # edits saved by an older version, without their line
            line = {"type": "batch", "batch": n_saved - 1, "recovered": True}
            line["edits_done"] = sum(len(b) for b in batches[:n_saved])
            line["weight_norms"] = ed.weight_norms()
        append_jsonl(out / RESULTS_FILE, line)
        lines.append(json_safe(line))
    return n_saved


def _edit_batch(ed: Any, out: Path, batches: Sequence[Sequence[EvalRecord]], b: int) -> None:
    """Apply batch ``b``, save the state with its results line, then append the line."""
    start = time.perf_counter()
    requests = [rec.request for rec in batches[b]]
    reports = ed.edit(requests, batch_size=len(requests), progress=False)
    line: dict[str, Any] = {"type": "batch", "batch": b}
    line["edits_done"] = sum(len(x) for x in batches[: b + 1])
    line["wall_seconds"] = time.perf_counter() - start
    for report in reports:
        line.update({k: v for k, v in as_dict(report).items() if k not in line})
    _save_edits(ed, out, b + 1, line)  # the line travels with the edits it describes
    append_jsonl(out / RESULTS_FILE, line)


class _Evaluations:
    """At each evaluation point of a run: the weight snapshot, then (unless deferred) the
    evaluation, appended to the results once."""

    def __init__(self, ed: Any, out: Path, stream: Sequence[EvalRecord],
                 batches: Sequence[Sequence[EvalRecord]], settings: EvalSettings,
                 eval_every: int, lines: Sequence[Mapping[str, Any]]) -> None:
        self.ed, self.out, self.batches, self.every = ed, out, batches, eval_every
        self.evaluator = None if settings.defer else Evaluator(ed.tokenizer, stream, settings)
        if self.evaluator is not None:
            self.evaluator.restore(lines)
        self.done = {line["batches"] for line in lines if line.get("type") == "eval"}

    def __call__(self, done: int) -> dict[str, Any] | None:
        n = len(self.batches)
        if not (done == 0 or done == n or (self.every and done % self.every == 0)):
            return None
        ed = self.ed
        edits_done = sum(len(b) for b in self.batches[:done])
        snap = self.out / SNAPSHOTS / f"weights-{done:05d}.safetensors"
        if not snap.exists():
            save_snapshot(ed, snap, {"batches": done, "edits_done": edits_done,
                                     "weight_norms": ed.weight_norms()})
        if self.evaluator is None or done in self.done:
            return None
        start = time.perf_counter()
        line = {"type": "eval", "batches": done, "edits_done": edits_done}
        line.update(self.evaluator(ed.model, edits_done))
        line["weight_norms"] = ed.weight_norms()
        line["seconds"] = time.perf_counter() - start
        append_jsonl(self.out / RESULTS_FILE, line)
        self.done.add(done)
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
) -> Path:
    """Evaluate every snapshot of a run (oldest first) that ``evals.jsonl`` does not hold yet.

    ``model`` is a fresh copy of the run's original model (same dtype): each snapshot's weights
    are put into it in turn. ``records`` is the run's stream (checked against its hash).
    Resumable: finished evaluations are kept, a torn last line dropped. ``follow``: keep
    waiting for new snapshots while the run goes on, until the last batch's one is done.
    """
    out = Path(run_dir)
    cfg_path = out / CONFIG_FILE
    if not cfg_path.exists():
        raise RunConfigError(f"{out} holds no run ({CONFIG_FILE} missing)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    stream, _ = arrange_batches(records[: config["num_edits"]], config["batch_size"])
    if len(stream) != config["num_edits"] or _stream_hash(stream) != config["stream_sha256"]:
        raise RunConfigError(f"{out}: the records given are not the run's edit stream")
    n_batches = -(-config["num_edits"] // config["batch_size"])
    evals = out / EVALS_FILE
    lines = read_results(evals, repair=True)
    evaluator = Evaluator(tokenizer, stream, settings)
    evaluator.restore(lines)
    done = {line["batches"] for line in lines if line.get("type") == "eval"}
    from encore_fast.models.fingerprint import model_fingerprint

    fingerprint = model_fingerprint(model)  # (of the original weights, before any snapshot)
    bar = tqdm(desc=f"evaluating {out.name}", unit="snapshot", disable=not progress)
    try:
        while True:
            todo = {b: p for b, p in list_snapshots(out / SNAPSHOTS).items() if b not in done}
            if 0 not in done and 0 not in todo:
                raise RunConfigError(f"{out}: no snapshot of the unedited model (0 batches)")
            for b, path in todo.items():
                start = time.perf_counter()
                info = load_snapshot(model, path, fingerprint)
                line = {"type": "eval", "batches": b, "edits_done": info["edits_done"]}
                line.update(evaluator(model, info["edits_done"]))
                line["weight_norms"] = info.get("weight_norms")
                line["seconds"] = time.perf_counter() - start
                append_jsonl(evals, line)
                done.add(b)
                bar.update(1)
                _show(bar, line)
            if not follow or n_batches in done:
                break
            time.sleep(poll_seconds)
    finally:
        bar.close()
    return evals


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


# --- results file --------------------------------------------------------------------------


def _open_run(out: Path, config: dict[str, Any], resume: bool) -> list[dict[str, Any]]:
    """Start a fresh run folder, or check the old config and read its results for resuming."""
    cfg_path, results = out / CONFIG_FILE, out / RESULTS_FILE
    if not cfg_path.exists():
        if results.exists() or _edits_files(out):
            raise RunConfigError(f"{out} holds results but no {CONFIG_FILE}; use a new folder")
        _write_json_atomic(cfg_path, config)
        return []
    if not resume:
        raise RunConfigError(
            f"{out} already holds a run; resume it (resume=True / --resume) or pick another folder"
        )
    old = json.loads(cfg_path.read_text(encoding="utf-8"))
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        details = "; ".join(f"{k}: was {old.get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise RunConfigError(f"cannot resume {out}: the run config differs ({details})")
    return read_results(results, repair=True)


def _check_batch_lines(lines: Sequence[Mapping[str, Any]]) -> int:
    got = [line["batch"] for line in lines if line.get("type") == "batch"]
    if got != list(range(len(got))):
        raise RunConfigError(f"batch lines out of order or repeated: {got[:20]}")
    return len(got)


# --- saved edits ---------------------------------------------------------------------------


def _edits_files(out: Path) -> dict[int, Path]:
    found = {}
    for path in out.iterdir():
        match = _EDITS.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _save_edits(editor: Any, out: Path, batches_done: int, line: Mapping[str, Any]) -> None:
    """Write the editor's state (atomically, with the batch's results line), then drop older
    states."""
    final = out / f"edits-{batches_done:05d}.safetensors"
    editor.save_edits(final, metadata={"run_line": json_safe(line)})
    for count, path in _edits_files(out).items():
        if count != batches_done:
            path.unlink(missing_ok=True)


def _saved_line(editor: Any, out: Path, batches_done: int) -> dict[str, Any] | None:
    """The results line saved with the newest edits (None for files without one)."""
    read = getattr(editor, "read_metadata", None)
    if read is None:
        return None
    line = read(out / f"edits-{batches_done:05d}.safetensors").get("run_line")
    return dict(line) if isinstance(line, Mapping) else None


def _load_newest_edits(editor: Any, out: Path) -> int:
    """Load the newest saved state into a still-unedited editor; return its batch count."""
    for pattern in ("edits-*.tmp.safetensors", ".edits-*.safetensors.tmp*"):
        for stale in out.glob(pattern):  # a save that was interrupted
            stale.unlink(missing_ok=True)
    files = _edits_files(out)
    if not files:
        return 0
    if getattr(editor, "num_batches", 0):
        raise RunConfigError("resuming needs an unedited editor (pass a factory, not an editor)")
    newest = max(files)
    editor.load_edits(files[newest])
    return newest


# --- helpers -------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def _stream_hash(stream: Sequence[EvalRecord]) -> str:
    text = json.dumps([json_safe(rec) for rec in stream], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _show(bar: Any, line: Mapping[str, Any] | None) -> None:
    if not line:
        return
    shown = {k: v for k, v in line.get("metrics", {}).items() if isinstance(v, float)}
    if "perplexity" in line:
        shown["ppl"] = line["perplexity"]
    bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)


def _plot(out: Path) -> None:
    try:
        from encore_fast.eval.plots import plot_runs
    except ImportError as exc:  # matplotlib is an optional dependency
        warnings.warn(f"no plots ({exc}); install encore_fast[eval]", stacklevel=2)
        return
    plot_runs([out], out / "plots")
