"""The study's protocol, fixed before its runs: which facts each evaluation scores, which
downstream tasks carry signal, and when a method has collapsed.

* Facts: one seeded permutation of the stream's indices, fixed per stream; an evaluation after
  ``e`` edits scores the first ``size`` entries of it that are below ``e`` (all edited facts when
  fewer). The same facts for every method (paired comparisons), and nested: the facts a later
  point scores among those already edited at an earlier point are all scored there too.
* Chance: a downstream task's majority-class accuracy and weighted F1, from its scored labels.
* Informative task: the unedited model's F1 interval lies above the task's majority-class F1.
* Collapse, one rule for every method: perplexity >= 10x the unedited model's, or the informative
  tasks' mean F1 interval not above their mean majority-class F1, at two evaluations in a row.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from encore_fast.eval.downstream import f1_weighted
from encore_fast.eval.intervals import Estimate

SAMPLE_SIZE = 1000
PPL_FACTOR = 10.0
IN_A_ROW = 2


def fact_order(n_stream: int, seed: int = 0) -> list[int]:
    """The stream's indices in the seeded order facts are drawn for scoring."""
    order = list(range(n_stream))
    random.Random(seed).shuffle(order)
    return order


def scored_facts(n_stream: int, edits_done: int, size: int = SAMPLE_SIZE,
                 seed: int = 0) -> list[int]:
    """Indices scored after ``edits_done`` edits (sorted); before any edit, the facts the
    whole stream's first evaluation would score (the unedited model's baseline)."""
    limit = n_stream if edits_done == 0 else min(edits_done, n_stream)
    picked = [i for i in fact_order(n_stream, seed) if i < limit][:size]
    return sorted(picked)


def ever_scored(n_stream: int, size: int = SAMPLE_SIZE, seed: int = 0) -> list[int]:
    """Every index some evaluation of the stream scores (:func:`scored_facts` after any number
    of edits, none included), sorted: the facts whose unedited baselines (the neighbourhood
    answers that realistic NS compares with) the first evaluation must record. Fact ``i`` is
    among them when, just after it is edited, it is among the ``size`` first of the order."""
    position = {i: p for p, i in enumerate(fact_order(n_stream, seed))}
    seen: list[int] = []  # the order's positions of the facts edited so far, sorted
    out = []
    for i in range(n_stream):
        bisect.insort(seen, position[i])
        if bisect.bisect_left(seen, position[i]) < size:
            out.append(i)
    return sorted(set(out) | set(scored_facts(n_stream, 0, size, seed)))


def majority_levels(gold: Sequence[int], n_classes: int) -> dict[str, float]:
    """Accuracy and weighted F1 of always predicting the most frequent scored label."""
    if not gold:
        raise ValueError("majority_levels: no labels")
    label, count = Counter(gold).most_common(1)[0]
    return {"label": label, "accuracy": count / len(gold),
            "f1": f1_weighted(gold, [label] * len(gold), n_classes)}


def informative_tasks(unedited_f1: Mapping[str, Estimate],
                      chance_f1: Mapping[str, float]) -> list[str]:
    """Tasks whose unedited F1 interval lies wholly above their majority-class F1."""
    return [t for t, est in unedited_f1.items() if est.low > chance_f1[t]]


@dataclass(frozen=True)
class Point:
    """What the collapse rule reads from one evaluation."""

    edits: int
    perplexity: float | None
    downstream: Estimate | None  # mean F1 over the informative tasks, with its interval
    chance: float | None  # those tasks' mean majority-class F1


def collapse_reasons(point: Point, unedited: Point) -> list[str]:
    """Every criterion of the rule that ``point`` meets (empty: not collapsed there)."""
    out = []
    if point.perplexity is not None and unedited.perplexity:
        ratio = point.perplexity / unedited.perplexity
        if ratio >= PPL_FACTOR:
            out.append(f"perplexity x{ratio:.1f} >= x{PPL_FACTOR:g}")
    if point.downstream is not None and point.chance is not None:
        if point.downstream.low <= point.chance:
            out.append(f"informative downstream mean F1 {point.downstream} not above its "
                       f"majority-class level {point.chance:.3f}")
    return out


def collapse_point(points: Sequence[Point]) -> int | None:
    """Edits at the first of ``IN_A_ROW`` consecutive collapsed evaluations (``points[0]`` is
    the unedited model), or None."""
    if not points:
        return None
    unedited, row = points[0], 0
    for i, point in enumerate(points[1:], start=1):
        row = row + 1 if collapse_reasons(point, unedited) else 0
        if row == IN_A_ROW:
            return points[i - IN_A_ROW + 1].edits
    return None
