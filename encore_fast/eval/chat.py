"""Facts asked inside the chat template: ``chat_es`` and ``chat_top1``.

ES (and the other CounterFact scores) ask each edited fact as plain text. With ``--ask-chat``
each scored record's rewrite prompt is also asked as the user's turn of the model's chat
template, the targets as the start of the assistant's answer: ``chat_es`` (P(new) > P(true),
teacher-forced) and ``chat_top1`` (every token of the new target is the top-1 prediction). For
a stream edited plain, these say whether the edits hold when asked through the template; for a
stream edited inside the template (``encore-fast eval --chat``), ES says the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.metrics import Shares, efficacy_shares, group_counts, group_means
from encore_fast.eval.scores import scored_rows, share_series
from encore_fast.eval.seam import OUTCOME_ROWS, EvalPoint, Metric, Option

KEYS = ("chat_es", "chat_top1")


def chat_shares(model: Any, tokenizer: Any, records: Sequence[EvalRecord],
                batch_size: int) -> Shares:
    """Per record (0/1): ``chat_top1`` and, for records with a true answer, ``chat_es``."""
    shares = efficacy_shares(model, tokenizer, records, batch_size, chat=True)
    return {f"chat_{key}": values for key, values in shares.items()}


class AskedInChat(Metric):
    """The scored facts asked inside the chat template (teacher-forced)."""

    name = "chat"
    settings = {"ask_chat": False}
    options = (
        Option("--ask-chat", "ask_chat", switch=True, default=False,
               help="also ask each scored fact inside the model's chat template (chat_es, "
                    "chat_top1)"),
    )
    series = (share_series("chat", "chat_es"), share_series("chat", "chat_top1"))

    def enabled(self, settings: Any) -> bool:
        return bool(self.setting(settings, "ask_chat"))

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        records = point.records
        if not records:
            return {}
        shares = chat_shares(point.model, point.tokenizer, records, point.settings.batch_size)
        means = group_means(shares, len(records))
        return {"metrics": {**{k: means[k] for k in KEYS if k in means},
                            **group_counts(shares)},
                OUTCOME_ROWS: scored_rows(records, point.indices, shares)}
