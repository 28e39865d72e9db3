"""The evaluations of one run: every metric the settings ask for, on the records edited so far.

The evaluator names no metric: it asks the registry (:mod:`encore_fast.eval.registry`) which are
on, lets each prepare its data once, and merges their parts into one evaluation line.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.registry import enabled_metrics
from encore_fast.eval.seam import EvalPoint
from encore_fast.eval.settings import EvalSettings


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
        self.metrics = [(m, m.prepare(tokenizer, self.stream, settings))
                        for m in enabled_metrics(settings)]

    def restore(self, lines: Sequence[Mapping[str, Any]]) -> None:
        """Take the metrics' baselines (e.g. known facts, unedited neighbourhood answers) from
        the evaluations of an earlier session."""
        for metric, data in self.metrics:
            metric.restore(data, lines)

    def records_at(self, edits_done: int) -> list[EvalRecord]:
        """Records evaluated after ``edits_done`` edits: the sampled ones already edited
        (before any edit: the whole sample, i.e. the unedited model's baseline)."""
        if edits_done == 0:
            return [self.stream[i] for i in self.sample]
        return [self.stream[i] for i in self.sample if i < edits_done]

    def __call__(self, model: Any, edits_done: int) -> dict[str, Any]:
        """The evaluation line's measurements after ``edits_done`` edits."""
        point = EvalPoint(model, self.tokenizer, edits_done, self.records_at(edits_done),
                          self.stream, self.settings)
        out: dict[str, Any] = {}
        for metric, data in self.metrics:
            merge_part(out, metric.evaluate(point, data), metric.name)
        return out


def merge_part(line: dict[str, Any], part: Mapping[str, Any], source: str) -> None:
    """Put a metric's part into an evaluation line: a mapping under a key the line already
    holds as a mapping (e.g. ``"metrics"``) is merged into it; any other key must be new."""
    for key, value in part.items():
        old = line.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            old.update(value)
        elif key in line:
            raise ValueError(f"metric {source!r} writes {key!r}, which another metric wrote")
        else:
            line[key] = dict(value) if isinstance(value, Mapping) else value
