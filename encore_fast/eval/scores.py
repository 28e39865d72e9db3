"""The built-in metrics of the edited facts themselves: CounterFact's ES/PS/NS/S, realistic
(generated) accuracy, generation entropy GE, zsRE's token accuracies, and the forgetting curve
(the first edited facts, scored again at every evaluation).

The edit scores go into the evaluation line's ``"metrics"`` (with ``n_records``, the records
scored, and ``n_<score>``, those each score is averaged over); the forgetting curve into
``"forgetting"``. Each scored record's own values go into the outcome file (one row per record
and metric: ``record``, its position in the edit stream, ``case_id`` and the record's share of
successful prompts per score), from which the report takes their intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from encore_fast.eval import estimates
from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.generation import realistic_scores
from encore_fast.eval.intervals import Estimate
from encore_fast.eval.metrics import (
    Shares,
    counterfact_scores,
    group_counts,
    harmonic_mean,
    records_generation_entropy,
    records_kind,
    zsre_scores,
)
from encore_fast.eval.outcomes import Row, record_rows
from encore_fast.eval.results import RunConfigError, RunData
from encore_fast.eval.seam import (
    OUTCOME_ROWS,
    EvalPoint,
    Metric,
    Option,
    Series,
    first_value,
    measured,
)
from encore_fast.eval.settings import EvalSettings, field_defaults

CF = ("es", "ps", "ns")
REAL = ("real_es", "real_ps", "real_ns")


def _share(run: RunData, line: Mapping[str, Any], metric: str, key: str) -> Estimate | None:
    rows = run.outcomes(line)
    return None if rows is None else estimates.share(estimates.values(rows, metric, key))


def _harmonic(run: RunData, line: Mapping[str, Any], metric: str,
              keys: Sequence[str]) -> Estimate | None:
    rows = run.outcomes(line)
    return None if rows is None else estimates.harmonic(rows, metric, keys)


def share_series(metric: str, key: str, shown: str | None = None) -> Series:
    """A per-record score's panel (``shown``: its key in the line), with its interval from
    ``metric``'s outcome rows."""
    return Series(shown or key, interval=partial(_share, metric=metric, key=key))


def harmonic_series(metric: str, key: str, keys: Sequence[str]) -> Series:
    """A harmonic mean's panel (S), with its interval from ``metric``'s outcome rows."""
    return Series(key, interval=partial(_harmonic, metric=metric, keys=tuple(keys)))


def scored_rows(records: Sequence[EvalRecord], indices: Sequence[int],
                shares: Shares) -> list[Row]:
    """The outcome rows of scored records (``indices``: their stream positions; the records'
    own indices when the point gives none)."""
    where = list(indices) if len(indices) == len(records) else [r.index for r in records]
    return record_rows(where, [r.request.case_id for r in records], shares)


class CounterFact(Metric):
    """ES, PS, NS and S of CounterFact-style records (teacher-forced)."""

    name = "counterfact"
    series = (*(share_series("counterfact", k) for k in CF),
              harmonic_series("counterfact", "s", CF))

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        records = point.records
        kind = records_kind(records)
        if not records:
            return {"metrics": {"n_records": 0}}
        if kind == "zsre":
            return {}
        result, shares = counterfact_scores(point.model, point.tokenizer, records,
                                            point.settings.batch_size)
        return {"metrics": {**result, **group_counts(shares)},
                OUTCOME_ROWS: scored_rows(records, point.indices, shares)}


@dataclass
class _Answers:
    """The unedited model's neighbourhood answers (the realistic NS baseline)."""

    answers: dict[str, str] | None = None


class Realistic(Metric):
    """real_es / real_ps / real_ns: does the model *say* the new target (greedy generation)?
    real_s: their harmonic mean."""

    name = "realistic"
    settings = field_defaults("realistic", "realistic_neighbours")
    options = (
        Option("--realistic", "realistic", switch=True, default=False,
               help="also score greedy generations (real_es, real_ps, real_ns)"),
        Option("--realistic-neighbours", "realistic_neighbours", type=int, minimum=0,
               default=2, help="neighbourhood prompts per record that are generated "
                               "(default: 2)"),
    )
    series = (*(share_series("realistic", k) for k in REAL),
              harmonic_series("realistic", "real_s", REAL))

    def enabled(self, settings: EvalSettings) -> bool:
        return bool(settings.realistic)

    def prepare(self, tokenizer: Any, stream: Sequence[EvalRecord],
                settings: EvalSettings) -> _Answers:
        return _Answers()

    def restore(self, data: _Answers, lines: Sequence[Mapping[str, Any]]) -> None:
        found = first_value(lines, "neighbour_answers")
        if data.answers is None and found is not None:
            data.answers = dict(found)

    def evaluate(self, point: EvalPoint, data: _Answers) -> Mapping[str, Any]:
        s, records = point.settings, point.records
        _check_answers(point, data.answers)
        real, answers, shares = realistic_scores(point.model, point.tokenizer, records,
                                                 data.answers, s.realistic_neighbours,
                                                 s.batch_size)
        out: dict[str, Any] = {"metrics": real}
        if data.answers is None:  # the unedited model's answers: the baseline
            scored = {id(rec) for rec in records}  # (the stream's own record objects)
            later = [rec for rec in point.baseline if id(rec) not in scored]
            if later:  # (records only later evaluations score: their answers now)
                answers.update(realistic_scores(point.model, point.tokenizer, later, None,
                                                s.realistic_neighbours, s.batch_size,
                                                groups=("ns",))[1])
            data.answers = answers
            out["neighbour_answers"] = answers
            real["real_ns"] = 1.0
            shares["real_ns"] = {r: 1.0 for r, rec in enumerate(records)
                                 if rec.neighborhood_prompts[: s.realistic_neighbours]}
        present = [v for v in (real.get(k) for k in REAL) if v is not None]
        real["real_s"] = harmonic_mean(present) if present else None
        real.update(group_counts(shares))
        out[OUTCOME_ROWS] = scored_rows(records, point.indices, shares)
        return out


def _check_answers(point: EvalPoint, answers: dict[str, str] | None) -> None:
    """Refuse an evaluation whose records' neighbourhood prompts the unedited evaluation did
    not answer: their realistic NS would silently rest on fewer records than are scored."""
    if answers is None:
        return
    k = point.settings.realistic_neighbours
    missing = [i for i, rec in zip(point.indices, point.records, strict=True)
               if any(p not in answers for p in rec.neighborhood_prompts[:k])]
    if missing:
        raise RunConfigError(
            f"realistic NS after {point.edits_done} edits: the unedited evaluation holds no "
            f"neighbourhood answers for {len(missing)} of the {len(point.records)} scored "
            f"records (stream positions {missing[:5]}...); it was written before every record "
            "a later evaluation scores was answered: evaluate the unedited model again (a new "
            "run folder, or a new shared baseline)")


class Generation(Metric):
    """GE: n-gram entropy of greedy generations (a fluency check), CounterFact records."""

    name = "generation"
    settings = field_defaults("generation_tokens", "generation_source")
    options = (
        Option("--gen-tokens", "generation_tokens", type=int, minimum=0, default=0,
               help="greedy tokens per generation prompt for GE (0: no GE)"),
        Option("--gen-source", "generation_source", default="dataset",
               choices=("dataset", "rewrite"),
               help="GE prompts: the data's generation_prompts, or the rewrite prompts"),
    )
    series = (Series("ge", bounded=False),)

    def enabled(self, settings: EvalSettings) -> bool:
        return settings.generation_tokens > 0

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        records, s = point.records, point.settings
        if not records or records_kind(records) == "zsre":
            return {}
        ge = records_generation_entropy(point.model, point.tokenizer, records,
                                        s.generation_tokens,
                                        s.generation_source)  # type: ignore[arg-type]
        return {"metrics": {"ge": ge}}


class Zsre(Metric):
    """zsRE's teacher-forced top-1 token accuracies."""

    name = "zsre"
    series = tuple(share_series("zsre", k)
                   for k in ("rewrite_acc", "paraphrase_acc", "neighborhood_acc"))

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        records = point.records
        if not records or records_kind(records) != "zsre":
            return {}
        result, shares = zsre_scores(point.model, point.tokenizer, records,
                                     point.settings.batch_size)
        return {"metrics": {**result, **group_counts(shares)},
                OUTCOME_ROWS: scored_rows(records, point.indices, shares)}


class Forgetting(Metric):
    """ES, PS (and real_es) of the first edited facts at every evaluation: do early edits
    survive the later ones?"""

    name = "forgetting"
    settings = field_defaults("forgetting")
    options = (
        Option("--forgetting", "forgetting", type=int, minimum=0, default=0,
               help="also score the first N edited facts at each evaluation (0: off)"),
    )
    series = tuple(share_series("forgetting", k, f"forgetting.{k}")
                   for k in ("es", "ps", "real_es"))

    def enabled(self, settings: EvalSettings) -> bool:
        return settings.forgetting > 0

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        if not point.edits_done:
            return {}
        first = point.stream[: min(point.settings.forgetting, point.edits_done)]
        part = dict(self.first_facts(point, first))
        rows = part.pop(OUTCOME_ROWS, None) or []
        return {"forgetting": part, OUTCOME_ROWS: rows}

    def first_facts(self, point: EvalPoint, first: Sequence[EvalRecord]) -> dict[str, Any]:
        """The scores of ``first``, the earliest edited facts (their rows under
        :data:`~encore_fast.eval.seam.OUTCOME_ROWS`)."""
        model, tokenizer, s = point.model, point.tokenizer, point.settings
        if first[0].kind != "counterfact":
            out, shares = zsre_scores(model, tokenizer, first, s.batch_size)
        else:
            out, shares = counterfact_scores(model, tokenizer, first, s.batch_size,
                                             groups=("es", "ps"))
        if first[0].kind == "counterfact" and s.realistic:
            real, _, real_shares = realistic_scores(model, tokenizer, first, None, 0,
                                                    s.batch_size, groups=("es",))
            out.update(real)
            shares.update(real_shares)
        rows = scored_rows(first, range(len(first)), shares)
        return {**out, **group_counts(shares), OUTCOME_ROWS: rows}

    def summary(self, run: RunData) -> dict[str, Any]:
        last = run.evals[-1] if run.evals else {}
        value = (last.get("forgetting") or {}).get("es")
        return {"forget_es": measured(run, last, self.series[0], value)}
