"""Immediate efficacy: each batch's own facts, scored right after the batch is edited.

ES at an evaluation point measures the sampled facts after every later edit too; immediate
efficacy separates "the edit did not take" from "a later edit undid it". With
``EvalSettings(immediate=True)`` (``--immediate``) the runner scores, after each batch, its
records' rewrite prompts -- ``es`` (P(new) > P(true), as ES), ``top1`` (every token of the new
target is the top-1 prediction, teacher-forced) and, with ``realistic``, ``real_es`` -- into the
batch's results line under ``"immediate"`` (with ``n`` and its own ``seconds``: the time is not
part of the batch's ``seconds`` / ``wall_seconds``, so seconds per edit are unchanged) and its
per-fact outcomes into ``outcomes/batch-NNNNN.jsonl.gz``. The summary tables the mean over
batches, with a Wilson interval over all the facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from encore_fast.eval import estimates
from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.generation import realistic_scores
from encore_fast.eval.metrics import Shares, efficacy_shares, group_means
from encore_fast.eval.outcomes import Row, record_rows
from encore_fast.eval.results import RunData
from encore_fast.eval.seam import Metric, Option, cell
from encore_fast.eval.settings import EvalSettings, field_defaults

KEYS = ("es", "top1", "real_es")


def batch_shares(model: Any, tokenizer: Any, records: Sequence[EvalRecord],
                 settings: EvalSettings) -> Shares:
    """Per record (0/1): ``es`` (records with a true answer), ``top1`` and, with
    ``settings.realistic``, ``real_es``."""
    shares = efficacy_shares(model, tokenizer, records, settings.batch_size)
    if settings.realistic and records[0].kind == "counterfact":
        _, _, real = realistic_scores(model, tokenizer, records, None, 0, settings.batch_size,
                                      groups=("es",))
        shares.update(real)
    return shares


def score_batch(model: Any, tokenizer: Any, records: Sequence[EvalRecord],
                indices: Sequence[int], settings: EvalSettings) -> tuple[dict[str, Any],
                                                                         list[Row]]:
    """The batch line's ``"immediate"`` part (each score's mean and ``n``; the runner adds the
    ``seconds`` it took) and the per-fact rows (``indices``: the records' positions in the
    stream)."""
    shares = batch_shares(model, tokenizer, records, settings)
    means = group_means(shares, len(records))
    part: dict[str, Any] = {k: means[k] for k in KEYS if k in means}
    part["n"] = means["n_records"]
    rows = [{**row, "metric": "immediate"}
            for row in record_rows(indices, [r.request.case_id for r in records], shares)]
    return part, rows


class Immediate(Metric):
    """Immediate efficacy (scored by the runner after each batch, not at the evaluations: it
    adds nothing to an evaluation line, and its summary reads the batch lines)."""

    name = "immediate"
    settings = field_defaults("immediate")
    options = (
        Option("--immediate", "immediate", switch=True, default=False,
               help="score each batch's own facts right after it is edited (ES, top-1, "
                    "real_es with --realistic; not counted in the batch's seconds)"),
    )

    def enabled(self, settings: EvalSettings) -> bool:
        return False  # (nothing to do at an evaluation point)

    def summary(self, run: RunData) -> dict[str, Any]:
        parts = [b["immediate"] for b in run.batches if b.get("immediate")]
        files = run.batch_outcomes()
        out: dict[str, Any] = {}
        for key in KEYS:
            vals = [p[key] for p in parts if p.get(key) is not None]
            if vals:
                pooled = estimates.pooled(files, "immediate", key) \
                    if len(files) == len(parts) else None
                out[f"immediate_{key}"] = cell(pooled, sum(vals) / len(vals))
        return out
