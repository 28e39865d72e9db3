"""The built-in metrics of the edited facts themselves: CounterFact's ES/PS/NS/S, realistic
(generated) accuracy, generation entropy GE, zsRE's token accuracies, and the forgetting curve
(the first edited facts, scored again at every evaluation).

The edit scores go into the evaluation line's ``"metrics"`` (with ``n_records``, the records
scored); the forgetting curve into ``"forgetting"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.generation import realistic_metrics
from encore_fast.eval.metrics import (
    counterfact_metrics,
    evaluate_records,
    records_generation_entropy,
    records_kind,
    zsre_metrics,
)
from encore_fast.eval.results import RunData
from encore_fast.eval.seam import EvalPoint, Metric, Option, Series, first_value
from encore_fast.eval.settings import EvalSettings, field_defaults


class CounterFact(Metric):
    """ES, PS, NS and S of CounterFact-style records (teacher-forced)."""

    name = "counterfact"
    series = (Series("es"), Series("ps"), Series("ns"), Series("s"))

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        records = point.records
        kind = records_kind(records)
        if not records:
            return {"metrics": {"n_records": 0}}
        if kind == "zsre":
            return {}
        return {"metrics": counterfact_metrics(point.model, point.tokenizer, records,
                                               point.settings.batch_size)}


@dataclass
class _Answers:
    """The unedited model's neighbourhood answers (the realistic NS baseline)."""

    answers: dict[str, str] | None = None


class Realistic(Metric):
    """real_es / real_ps / real_ns: does the model *say* the new target (greedy generation)?"""

    name = "realistic"
    settings = field_defaults("realistic", "realistic_neighbours")
    options = (
        Option("--realistic", "realistic", switch=True, default=False,
               help="also score greedy generations (real_es, real_ps, real_ns)"),
        Option("--realistic-neighbours", "realistic_neighbours", type=int, minimum=0,
               default=2, help="neighbourhood prompts per record that are generated "
                               "(default: 2)"),
    )
    series = (Series("real_es"), Series("real_ps"), Series("real_ns"))

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
        s = point.settings
        real, answers = realistic_metrics(point.model, point.tokenizer, point.records,
                                          data.answers, s.realistic_neighbours, s.batch_size)
        out: dict[str, Any] = {"metrics": real}
        if data.answers is None:  # the unedited model's answers: the baseline
            data.answers = answers
            out["neighbour_answers"] = answers
            real["real_ns"] = 1.0
        return out


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
    series = (Series("rewrite_acc"), Series("paraphrase_acc"), Series("neighborhood_acc"))

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        records = point.records
        if not records or records_kind(records) != "zsre":
            return {}
        return {"metrics": zsre_metrics(point.model, point.tokenizer, records,
                                        point.settings.batch_size)}


class Forgetting(Metric):
    """ES, PS (and real_es) of the first edited facts at every evaluation: do early edits
    survive the later ones?"""

    name = "forgetting"
    settings = field_defaults("forgetting")
    options = (
        Option("--forgetting", "forgetting", type=int, minimum=0, default=0,
               help="also score the first N edited facts at each evaluation (0: off)"),
    )
    series = (Series("forgetting.es"), Series("forgetting.ps"), Series("forgetting.real_es"))

    def enabled(self, settings: EvalSettings) -> bool:
        return settings.forgetting > 0

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        if not point.edits_done:
            return {}
        first = point.stream[: min(point.settings.forgetting, point.edits_done)]
        return {"forgetting": self.first_facts(point, first)}

    def first_facts(self, point: EvalPoint, first: Sequence[EvalRecord]) -> dict[str, Any]:
        """The scores of ``first``, the earliest edited facts."""
        model, tokenizer, s = point.model, point.tokenizer, point.settings
        if first[0].kind != "counterfact":
            return evaluate_records(model, tokenizer, first, s.batch_size)
        out = dict(counterfact_metrics(model, tokenizer, first, s.batch_size,
                                       groups=("es", "ps")))
        if s.realistic:
            real, _ = realistic_metrics(model, tokenizer, first, None, 0, s.batch_size,
                                        groups=("es",))
            out.update(real)
        return out

    def summary(self, run: RunData) -> dict[str, Any]:
        last = run.evals[-1] if run.evals else {}
        return {"forget_es": (last.get("forgetting") or {}).get("es")}
