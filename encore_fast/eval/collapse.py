"""The collapse rule of the study (:mod:`encore_fast.eval.protocol`), read from a run's
evaluations: one place for the report's collapse point and the runner's ``stop_on_collapse``.

At each evaluation the rule reads the perplexity (against the unedited model's) and, where the
outcome rows say which downstream tasks are informative (the unedited model's F1 interval above
the task's majority-class F1), the informative tasks' mean F1 interval against their mean
majority-class F1; a run has collapsed at the first of two evaluations in a row that meet a
criterion. Runs without outcome rows are judged on perplexity alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from encore_fast.eval import estimates
from encore_fast.eval.protocol import Point, collapse_point, collapse_reasons
from encore_fast.eval.results import RunData


@dataclass(frozen=True)
class Collapse:
    """Where a run collapsed: the edits at the first of the collapsed evaluations in a row,
    and the criteria it met."""

    edits: int
    reasons: list[str]

    def __str__(self) -> str:
        return f"{self.edits}: " + "; ".join(self.reasons)


def point_at(run: RunData, line: Mapping[str, Any]) -> Point:
    """What the rule reads from one evaluation line of ``run`` (kept in ``run.memo``)."""
    key = ("point", line.get("batches"))
    if key not in run.memo:
        mean, chance = estimates.run_informative_mean(run, line)
        run.memo[key] = Point(line["edits_done"], line.get("perplexity"), mean, chance)
    return run.memo[key]


def run_collapse(run: RunData) -> Collapse | None:
    """Where ``run`` collapsed (None: not, or no unedited evaluation to compare with)."""
    if estimates.unedited(run) is None:
        return None
    points = [point_at(run, line) for line in run.evals]
    at = collapse_point(points)
    if at is None:
        return None
    first = next(p for p in points[1:] if p.edits == at)
    return Collapse(at, collapse_reasons(first, points[0]))


def judged(run: RunData) -> bool:
    """Whether the rule can say anything about ``run``: an unedited evaluation with a
    perplexity, or with the downstream outcome rows that tell the informative tasks."""
    base = estimates.unedited(run)
    return base is not None and (base.get("perplexity") is not None
                                 or bool(estimates.run_informative(run)))


def criteria_at(run: RunData, edits: int) -> list[str] | None:
    """The rule's criteria ``run``'s evaluation at ``edits`` meets (empty: none; None: no such
    evaluation, or nothing to judge it against)."""
    base = estimates.unedited(run)
    line = next((x for x in run.evals if x["edits_done"] == edits), None)
    if base is None or line is None or edits == 0:
        return None
    return collapse_reasons(point_at(run, line), point_at(run, base))
