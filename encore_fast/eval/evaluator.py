"""The evaluations of one run: every metric the settings ask for, on the records edited so far.

The evaluator names no metric: it asks the registry (:mod:`encore_fast.eval.registry`) which are
on, lets each prepare its data once, and merges their parts into one evaluation line; the rows
each part holds under :data:`~encore_fast.eval.seam.OUTCOME_ROWS` are kept apart (``outcomes``),
for the run folder's outcome file.

Which records an evaluation scores follows ``settings.sampling`` (see
:mod:`encore_fast.eval.settings`): a fixed random sample of the stream (``"stream"``), or the
study's nested sample of the edited facts (``"edited"``,
:func:`encore_fast.eval.protocol.scored_facts`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.outcomes import Row
from encore_fast.eval.protocol import SAMPLE_SIZE, ever_scored, scored_facts
from encore_fast.eval.registry import enabled_metrics
from encore_fast.eval.seam import OUTCOME_ROWS, EvalPoint
from encore_fast.eval.settings import EvalSettings


class Evaluator:
    """Runs the evaluations of one run; data sets are prepared once and reused."""

    def __init__(self, tokenizer: Any, stream: Sequence[EvalRecord], settings: EvalSettings):
        self.tokenizer = tokenizer
        self.stream = list(stream)
        self.settings = settings
        n = len(self.stream)
        if settings.sampling == "edited":
            self.sample = self.indices_at(0)
        elif settings.sample is not None and settings.sample < n:
            self.sample = sorted(random.Random(settings.seed).sample(range(n), settings.sample))
        else:
            self.sample = list(range(n))
        self.metrics = [(m, m.prepare(tokenizer, self.stream, settings))
                        for m in enabled_metrics(settings)]
        self.outcomes: list[Row] = []  # the per-item rows of the latest evaluation

    def restore(self, lines: Sequence[Mapping[str, Any]]) -> None:
        """Take the metrics' baselines (e.g. known facts, unedited neighbourhood answers) from
        the evaluations of an earlier session."""
        for metric, data in self.metrics:
            metric.restore(data, lines)

    def indices_at(self, edits_done: int) -> list[int]:
        """Stream positions of the records evaluated after ``edits_done`` edits: the sampled
        ones already edited (before any edit: the whole sample, the unedited baseline)."""
        s = self.settings
        if s.sampling == "edited":
            size = SAMPLE_SIZE if s.sample is None else s.sample
            return scored_facts(len(self.stream), edits_done, size, s.seed)
        if edits_done == 0:
            return list(self.sample)
        return [i for i in self.sample if i < edits_done]

    def baseline_indices(self) -> list[int]:
        """Stream positions whose unedited baselines the first evaluation records: every record
        a later evaluation may score (with the nested sample, more than the first one scores)."""
        s = self.settings
        if s.sampling == "edited":
            size = SAMPLE_SIZE if s.sample is None else s.sample
            return ever_scored(len(self.stream), size, s.seed)
        return self.indices_at(0)

    def records_at(self, edits_done: int) -> list[EvalRecord]:
        """Records evaluated after ``edits_done`` edits (:meth:`indices_at`)."""
        return [self.stream[i] for i in self.indices_at(edits_done)]

    def __call__(self, model: Any, edits_done: int) -> dict[str, Any]:
        """The evaluation line's measurements after ``edits_done`` edits (the per-item rows go
        to ``self.outcomes``)."""
        indices = self.indices_at(edits_done)
        baseline = [self.stream[i] for i in self.baseline_indices()] if edits_done == 0 else []
        point = EvalPoint(model, self.tokenizer, edits_done, [self.stream[i] for i in indices],
                          self.stream, self.settings, indices, baseline)
        out: dict[str, Any] = {}
        self.outcomes = []
        for metric, data in self.metrics:
            part = dict(metric.evaluate(point, data))
            rows = part.pop(OUTCOME_ROWS, None) or []
            self.outcomes += [{**row, "metric": metric.name} for row in rows]
            merge_part(out, part, metric.name)
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
