"""The built-in metrics of the model around the edits: WikiText perplexity, known facts,
downstream tasks (ENCORE's "model degradation"), and what the run's batch reports record: the
edited matrices' norm growth and the editing time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from encore_fast.eval.datasets import DatasetError, EvalRecord
from encore_fast.eval.degradation import (
    KnownFact,
    known_fact_hits,
    load_known_facts,
    perplexity,
    perplexity_windows,
)
from encore_fast.eval.downstream import evaluate_downstream, load_tasks
from encore_fast.eval.results import RunData
from encore_fast.eval.seam import (
    EvalPoint,
    Figure,
    Metric,
    Option,
    Series,
    Values,
    data_file,
    first_value,
)
from encore_fast.eval.settings import EvalSettings, field_defaults

# The files the data options' "auto" stands for, in the shared data folder.
DEFAULT_WIKITEXT = "wikitext-2/test.txt"
DEFAULT_KNOWN = "known_1000.json"
DEFAULT_DOWNSTREAM = "downstream"


def _edges(run: RunData) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's first and last evaluation lines (empty when it has none)."""
    return (run.evals[0], run.evals[-1]) if run.evals else ({}, {})


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


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
    figures = (Figure("perplexity.png", lambda runs: [Series("perplexity", "", bounded=False)],
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
        return {"perplexity": perplexity(point.model, data)}

    def summary(self, run: RunData) -> dict[str, Any]:
        first, last = _edges(run)
        before, after = first.get("perplexity"), last.get("perplexity")
        return {"ppl_before": before, "ppl_after": after, "ppl_ratio": _ratio(after, before)}

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
    series = (Series("known_acc"), Series("known_retained"))

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
        return {"known_acc": len(correct) / len(hits) if hits else None,
                "known_correct": correct,
                "known_retained": sum(i in kept for i in base) / len(base) if base else None}

    def summary(self, run: RunData) -> dict[str, Any]:
        first, last = _edges(run)
        return {"known_before": first.get("known_acc"), "known_after": last.get("known_acc"),
                "known_retained": last.get("known_retained")}


def _layer_panels(runs: Sequence[RunData]) -> list[Series]:
    """One panel per edited layer: its ``||W|| / ||W_0||`` after every batch."""
    layers = sorted({layer for run in runs for layer in run.original_norms()})
    return [Series(f"layer {layer}", bounded=False, read=partial(_layer_ratios, layer=layer))
            for layer in layers]


def _layer_ratios(run: RunData, layer: int) -> Values | None:
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


def _task_panels(runs: Sequence[RunData]) -> list[Series]:
    """One panel per downstream task the runs hold (F1), and their mean."""
    tasks = sorted({k for run in runs for line in run.evals
                    for k, v in (line.get("downstream") or {}).items() if isinstance(v, dict)})
    keys = [f"downstream.{t}.f1" for t in tasks] + ["downstream.mean_f1"]
    return [Series(k, k.removeprefix("downstream.").replace(".f1", " F1")) for k in keys]


class Downstream(Metric):
    """Few-shot downstream tasks (SST-2, MRPC, CoLA, RTE, NLI, MMLU): F1, MCC, accuracy."""

    name = "downstream"
    settings = field_defaults("downstream", "downstream_n", "downstream_shots")
    options = (
        Option("--downstream", "downstream", default="none",
               help=f"folder of the downstream task files (auto: {DEFAULT_DOWNSTREAM} in "
                    "the data folder; none: skip, the default)",
               convert=partial(data_file, default=DEFAULT_DOWNSTREAM, what="--downstream")),
        Option("--downstream-n", "downstream_n", type=int, minimum=1, default=100,
               help="test examples per downstream task (default: 100)"),
        Option("--downstream-shots", "downstream_shots", type=int, minimum=0, default=3,
               help="few-shot examples per downstream task (default: 3)"),
    )
    series = (Series("downstream.mean_f1"),)
    figures = (Figure("downstream.png", _task_panels, cols=4, size=(3.6, 2.8), optional=True),)

    def enabled(self, settings: EvalSettings) -> bool:
        return bool(settings.downstream)

    def prepare(self, tokenizer: Any, stream: Sequence[EvalRecord], settings: EvalSettings) -> Any:
        return load_tasks(settings.downstream or "", shots=settings.downstream_shots,
                          n=settings.downstream_n)

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        return {"downstream": evaluate_downstream(point.model, point.tokenizer, data,
                                                  point.settings.batch_size)}

    def summary(self, run: RunData) -> dict[str, Any]:
        _, last = _edges(run)
        return {"downstream_f1": (last.get("downstream") or {}).get("mean_f1")}
