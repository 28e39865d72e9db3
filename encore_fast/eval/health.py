"""The built-in metrics of the model around the edits: WikiText perplexity, known facts,
downstream tasks (ENCORE's "model degradation"), and what the run's batch reports record: the
edited matrices' norm growth and the editing time.

Their items go into the outcome file: per perplexity window ``window``, ``nll`` (its summed
next-token NLL) and ``tokens``; per known fact ``fact``, ``correct`` and ``known_before`` (the
unedited model knew it); per downstream example ``task``, ``example``, ``gold`` and ``pred``.
Each downstream task's line holds its majority-class levels (``majority_acc``, ``majority_f1``,
from the scored labels: :func:`~encore_fast.eval.protocol.majority_levels`); the report marks a
task informative when the unedited model's F1 interval lies above its ``majority_f1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from encore_fast.eval import estimates
from encore_fast.eval.datasets import DatasetError, EvalRecord
from encore_fast.eval.degradation import (
    KnownFact,
    known_fact_hits,
    load_known_facts,
    perplexity_of,
    perplexity_windows,
    window_nll,
)
from encore_fast.eval.downstream import Task, load_tasks, task_predictions, task_scores
from encore_fast.eval.intervals import Estimate
from encore_fast.eval.protocol import majority_levels
from encore_fast.eval.results import RunData
from encore_fast.eval.seam import (
    OUTCOME_ROWS,
    EvalPoint,
    Figure,
    Metric,
    Option,
    Series,
    Values,
    cell,
    data_file,
    first_value,
)
from encore_fast.eval.settings import EvalSettings, field_defaults
from encore_fast.models.arch import Site, site_order

# The files the data options' "auto" stands for, in the shared data folder.
DEFAULT_WIKITEXT = "wikitext-2/test.txt"
DEFAULT_KNOWN = "known_1000.json"
DEFAULT_DOWNSTREAM = "downstream"


def _edges(run: RunData) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's first and last evaluation lines (empty when it has none)."""
    return (run.evals[0], run.evals[-1]) if run.evals else ({}, {})


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _estimated(run: RunData, line: Mapping[str, Any], how: Any) -> Estimate | None:
    """``how(rows)`` of the line's outcome rows (None without rows)."""
    rows = run.outcomes(line) if line else None
    return None if rows is None else how(rows)


def _perplexity_interval(run: RunData, line: Mapping[str, Any]) -> Estimate | None:
    return _estimated(run, line, estimates.perplexity)


class Perplexity(Metric):
    """Perplexity on the first tokens of a WikiText file (fixed, non-overlapping windows)."""

    name = "perplexity"
    settings = field_defaults("wikitext", "ppl_tokens", "ppl_window")
    options = (
        Option("--wikitext", "wikitext", default="auto",
               help=f"perplexity text (auto: {DEFAULT_WIKITEXT}; none: skip)",
               convert=partial(data_file, default=DEFAULT_WIKITEXT, what="--wikitext")),
        Option("--ppl-tokens", "ppl_tokens", type=int, minimum=1, default=8192,
               help="first tokens scored"),
        Option("--ppl-window", "ppl_window", type=int, minimum=1, default=256,
               help="window length in tokens"),
    )
    figures = (Figure("perplexity.png",
                      lambda runs: [Series("perplexity", "", bounded=False,
                                           interval=_perplexity_interval)],
                      cols=1, size=(5, 3.5), ylabel="perplexity", log=True),)

    def enabled(self, settings: EvalSettings) -> bool:
        return bool(settings.wikitext)

    def check(self, settings: EvalSettings) -> None:
        if settings.ppl_tokens < settings.ppl_window:
            raise DatasetError(f"--ppl-tokens {settings.ppl_tokens} is less than one "
                               f"--ppl-window of {settings.ppl_window}")
        path = Path(settings.wikitext or "")
        if not path.is_file():
            raise DatasetError(f"--wikitext {path}: no such file")
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"--wikitext {path}: not a UTF-8 text file ({exc})") from None

    def check_tokenizer(self, settings: EvalSettings, tokenizer: Any) -> None:
        try:
            self.prepare(tokenizer, [], settings)
        except ValueError as exc:  # (too short a text: the one ValueError it raises)
            raise DatasetError(f"--wikitext {settings.wikitext}: {exc}") from None

    def prepare(self, tokenizer: Any, stream: Sequence[EvalRecord], settings: EvalSettings) -> Any:
        text = Path(settings.wikitext or "").read_text(encoding="utf-8")
        return perplexity_windows(tokenizer, text, settings.ppl_tokens, settings.ppl_window)

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        windows = window_nll(point.model, data)
        rows = [{"window": i, "nll": nll, "tokens": t} for i, (nll, t) in enumerate(windows)]
        return {"perplexity": perplexity_of(windows), "n_ppl_windows": len(windows),
                "n_ppl_tokens": sum(t for _, t in windows), OUTCOME_ROWS: rows}

    def summary(self, run: RunData) -> dict[str, Any]:
        first, last = _edges(run)
        before, after = first.get("perplexity"), last.get("perplexity")
        ratio = _estimated(run, last, lambda rows: _estimated(
            run, first, partial(estimates.perplexity_ratio, rows)))
        return {"ppl_before": cell(_perplexity_interval(run, first), before),
                "ppl_after": cell(_perplexity_interval(run, last), after),
                "ppl_ratio": cell(ratio, _ratio(after, before))}

    def progress(self, line: Mapping[str, Any]) -> dict[str, float]:
        return {"ppl": line["perplexity"]} if "perplexity" in line else {}


@dataclass
class _Facts:
    """The known facts checked, and which of them the unedited model knew (the baseline)."""

    facts: list[KnownFact]
    baseline: list[int] | None = field(default=None)


class KnownFacts(Metric):
    """Top-1 accuracy on known facts, and the share of the unedited model's ones retained."""

    name = "known_facts"
    settings = field_defaults("known_facts", "known_n")
    options = (
        Option("--known-facts", "known_facts", default="auto",
               help=f"auto: {DEFAULT_KNOWN}; none: skip",
               convert=partial(data_file, default=DEFAULT_KNOWN, what="--known-facts")),
        Option("--known-n", "known_n", type=int, minimum=0, default=200,
               help="first known facts checked (0: all)", convert=lambda n: n or None),
    )
    series = (Series("known_acc", interval=lambda run, line: _known(run, line)[0]),
              Series("known_retained", interval=lambda run, line: _known(run, line)[1]))

    def enabled(self, settings: EvalSettings) -> bool:
        return bool(settings.known_facts)

    def check(self, settings: EvalSettings) -> None:
        if not Path(settings.known_facts or "").is_file():
            raise DatasetError(f"--known-facts {settings.known_facts}: no such file")
        load_known_facts(settings.known_facts or "", settings.known_n)

    def prepare(self, tokenizer: Any, stream: Sequence[EvalRecord],
                settings: EvalSettings) -> _Facts:
        return _Facts(load_known_facts(settings.known_facts or "", settings.known_n))

    def restore(self, data: _Facts, lines: Sequence[Mapping[str, Any]]) -> None:
        found = first_value(lines, "known_correct")
        if data.baseline is None and found is not None:
            data.baseline = list(found)

    def evaluate(self, point: EvalPoint, data: _Facts) -> Mapping[str, Any]:
        hits = known_fact_hits(point.model, point.tokenizer, data.facts,
                               point.settings.batch_size)
        correct = [i for i, hit in enumerate(hits) if hit]
        if data.baseline is None:
            data.baseline = correct
        kept, base = set(correct), data.baseline
        known = set(base)
        rows = [{"fact": i, "correct": bool(hit), "known_before": i in known}
                for i, hit in enumerate(hits)]
        return {"known_acc": len(correct) / len(hits) if hits else None,
                "known_correct": correct,
                "known_retained": sum(i in kept for i in base) / len(base) if base else None,
                "n_known": len(hits), "n_known_before": len(base), OUTCOME_ROWS: rows}

    def summary(self, run: RunData) -> dict[str, Any]:
        first, last = _edges(run)
        return {"known_before": cell(_known(run, first)[0], first.get("known_acc")),
                "known_after": cell(_known(run, last)[0], last.get("known_acc")),
                "known_retained": cell(_known(run, last)[1], last.get("known_retained"))}


def _known(run: RunData, line: Mapping[str, Any]) -> tuple[Estimate | None, Estimate | None]:
    """Known-fact accuracy and retained share at ``line``, with their Wilson intervals."""
    rows = run.outcomes(line) if line else None
    return (None, None) if rows is None else estimates.known(rows)


def _layer_panels(runs: Sequence[RunData]) -> list[Series]:
    """One panel per edited matrix: its ``||W|| / ||W_0||`` after every batch."""
    sites = sorted({site for run in runs for site in run.original_norms()}, key=site_order)
    return [Series(f"layer {site}" if isinstance(site, int) else site, bounded=False,
                   read=partial(_layer_ratios, layer=site)) for site in sites]


def _layer_ratios(run: RunData, layer: Site) -> Values | None:
    edits, ratios = run.norm_series()
    return (edits, ratios[layer]) if layer in ratios else None


class WeightNorms(Metric):
    """Growth of the edited matrices' Frobenius norms, from the batch reports (and the first
    evaluation line's norms, those of the unedited model)."""

    name = "weight_norms"
    figures = (Figure("norm_growth.png", _layer_panels, ylabel="||W|| / ||W0||",
                      markers=False, leads=True),)

    def summary(self, run: RunData) -> dict[str, Any]:
        edits, ratios = run.norm_series()
        finals = [series[-1] for series in ratios.values() if series]
        growth = sum(finals) / len(finals) if finals and edits[-1] > 0 else None
        return {"norm_growth": growth}


class EditTime(Metric):
    """Editing time per edit, from the batch reports (recovered batches are not timed)."""

    name = "edit_time"

    def summary(self, run: RunData) -> dict[str, Any]:
        seconds, timed_edits, prev = 0.0, 0, 0
        for b in run.batches:
            size, prev = b["edits_done"] - prev, b["edits_done"]
            secs = b.get("seconds", b.get("wall_seconds"))
            if not b.get("recovered") and secs is not None:
                seconds, timed_edits = seconds + secs, timed_edits + size
        return {"sec_per_edit": seconds / timed_edits if timed_edits else None}


def _task_f1(run: RunData, line: Mapping[str, Any], task: str) -> Estimate | None:
    """A task's F1 at ``line`` with its interval (bootstrap over its examples)."""
    rows = run.outcomes(line)
    found = estimates.examples(rows) if rows is not None else {}
    return estimates.task_f1(*found[task]) if task in found else None


def _mean_f1(run: RunData, line: Mapping[str, Any]) -> Estimate | None:
    """The mean F1 over every task at ``line`` (stratified bootstrap)."""
    return _estimated(run, line, lambda rows: estimates.mean_f1(estimates.examples(rows)))


def _informative_values(run: RunData) -> Values | None:
    x, y = [], []
    for line in run.evals:
        est, _ = estimates.run_informative_mean(run, line)
        if est is not None:
            x.append(line["edits_done"])
            y.append(est.value)
    return (x, y) if x else None


INFORMATIVE = Series("downstream.informative_f1", "informative tasks' mean F1",
                     read=_informative_values,
                     interval=lambda run, line: estimates.run_informative_mean(run, line)[0])


def _task_panels(runs: Sequence[RunData]) -> list[Series]:
    """One panel per downstream task the runs hold (F1), their mean, and (where the outcome
    rows tell which tasks are informative) the informative tasks' mean."""
    tasks = sorted({k for run in runs for line in run.evals
                    for k, v in (line.get("downstream") or {}).items() if isinstance(v, dict)})
    panels = [Series(f"downstream.{t}.f1", f"{t} F1", interval=partial(_task_f1, task=t))
              for t in tasks]
    panels.append(Series("downstream.mean_f1", "mean_f1", interval=_mean_f1))
    if any(estimates.run_informative(run) for run in runs):
        panels.append(INFORMATIVE)
    return panels


class Downstream(Metric):
    """Few-shot downstream tasks (SST-2, MRPC, CoLA, RTE, NLI, MMLU): F1, MCC, accuracy, and
    each task's majority-class levels."""

    name = "downstream"
    settings = field_defaults("downstream", "downstream_n", "downstream_shots")
    options = (
        Option("--downstream", "downstream", default="none",
               help=f"folder of the downstream task files (auto: {DEFAULT_DOWNSTREAM} in "
                    "the data folder; none: skip, the default)",
               convert=partial(data_file, default=DEFAULT_DOWNSTREAM, what="--downstream")),
        Option("--downstream-n", "downstream_n", type=int, minimum=1, default=100,
               help="test examples per downstream task, all of a file's up to this many "
                    "(default: 100; the study protocol: 400)"),
        Option("--downstream-shots", "downstream_shots", type=int, minimum=0, default=3,
               help="few-shot examples per downstream task (default: 3)"),
    )
    series = (Series("downstream.mean_f1", interval=_mean_f1),)
    figures = (Figure("downstream.png", _task_panels, cols=4, size=(3.6, 2.8), optional=True),)

    def enabled(self, settings: EvalSettings) -> bool:
        return bool(settings.downstream)

    def prepare(self, tokenizer: Any, stream: Sequence[EvalRecord], settings: EvalSettings) -> Any:
        return load_tasks(settings.downstream or "", shots=settings.downstream_shots,
                          n=settings.downstream_n)

    def evaluate(self, point: EvalPoint, data: list[Task]) -> Mapping[str, Any]:
        out: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        for task in data:
            pred = task_predictions(point.model, point.tokenizer, task,
                                    point.settings.batch_size)
            chance = majority_levels(task.gold, len(task.spec.labels))
            out[task.spec.name] = {**task_scores(task, pred), "majority_acc": chance["accuracy"],
                                   "majority_f1": chance["f1"]}
            rows += [{"task": task.spec.name, "example": i, "gold": g, "pred": p}
                     for i, (g, p) in enumerate(zip(task.gold, pred, strict=True))]
        out["mean_f1"] = sum(v["f1"] for v in out.values()) / len(data) if data else None
        return {"downstream": out, OUTCOME_ROWS: rows}

    def summary(self, run: RunData) -> dict[str, Any]:
        _, last = _edges(run)
        value = (last.get("downstream") or {}).get("mean_f1")
        out = {"downstream_f1": cell(_mean_f1(run, last) if last else None, value)}
        tasks = estimates.run_informative(run)
        if tasks is not None:  # (the outcome rows say which tasks carry signal)
            est, _ = estimates.run_informative_mean(run, last)
            out["informative_f1"] = est.number() if est is not None else None
            out["informative"] = " ".join(tasks) or "none"
        return out
