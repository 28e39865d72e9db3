"""What the evaluations of a run measure: :class:`EvalSettings`.

The fields are the settings of the evaluator (sampling, sample, seed, batch size, deferral) and
of the built-in metrics (:mod:`encore_fast.eval.scores`, :mod:`encore_fast.eval.health`,
:mod:`encore_fast.eval.immediate`). A metric registered later keeps its settings in
``metric_settings`` (by setting name; unset ones take the metric's defaults), so adding one edits
no field here.

Which edited facts an evaluation scores (``sampling``):

* ``"stream"`` (the default, and what every run folder written before the choice existed used:
  their ``config.json`` has no ``sampling`` key, which reads as ``"stream"``): a fixed random
  sample of ``sample`` records of the whole stream (seeded by ``seed``); an evaluation after
  ``e`` edits scores those of them already edited.
* ``"edited"`` (the study's protocol, :func:`encore_fast.eval.protocol.scored_facts`): one
  seeded order of the stream; an evaluation after ``e`` edits scores the first ``sample``
  (None: :data:`~encore_fast.eval.protocol.SAMPLE_SIZE`, 1000) edited facts in that order --
  the same facts for every method (paired comparisons), nested across evaluation points, and
  as many as ``sample`` at every point that has that many edits.

:meth:`EvalSettings.study` sets the whole study protocol at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalSettings:
    """What each evaluation measures, and how much of it (cheap defaults)."""

    sample: int | None = None  # records scored (see ``sampling``); None: all (stream), 1000
    seed: int = 0  # seed of that sample
    batch_size: int = 16  # prompts per forward pass
    generation_tokens: int = 0  # > 0: greedy generations of this length for GE
    generation_source: str = "dataset"  # "dataset" (generation_prompts) or "rewrite"
    wikitext: str | None = None  # text file for perplexity; None: skip
    ppl_tokens: int = 8192  # first tokens of it that are scored
    ppl_window: int = 256  # non-overlapping window length
    known_facts: str | None = None  # known_1000.json-style file; None: skip
    known_n: int | None = 200  # first facts of it that are checked; None: all
    downstream: str | None = None  # folder of the downstream task files; None: skip
    downstream_n: int = 100  # test examples per task
    downstream_shots: int = 3  # few-shot examples per task (the head of its file)
    realistic: bool = False  # greedy-generation accuracy (real_es / real_ps / real_ns)
    realistic_neighbours: int = 2  # neighbourhood prompts per record that are generated
    forgetting: int = 0  # > 0: also score the first this many edited facts (es, ps, real_es)
    defer: bool = False  # the run only saves snapshots; evaluate them with evaluate_snapshots
    sampling: str = "stream"  # "stream" or "edited": which facts are scored (module docstring)
    immediate: bool = False  # score each batch's own facts right after it is edited
    # settings of metrics registered besides the built-in ones, by setting name
    metric_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, not {self.sampling!r}")

    @classmethod
    def study(cls, **changes: Any) -> EvalSettings:
        """The study's protocol (:data:`STUDY`: the edited facts' nested sample of 1000, 400
        examples per downstream task, every known fact, realistic accuracy, the first 1000
        facts' forgetting curve, immediate efficacy), with ``changes`` on top (e.g. the data
        files: ``wikitext``, ``known_facts``, ``downstream``)."""
        return cls(**{**STUDY, **changes})

    def value(self, name: str, default: Any = None) -> Any:
        """A setting by name: a field, else the ``metric_settings`` entry (``default`` when
        it is not set)."""
        if name in FIELDS:
            return getattr(self, name)
        return self.metric_settings.get(name, default)

    def as_config(self) -> dict[str, Any]:
        """The settings as a run's ``config.json`` records them (and a resume compares them):
        the fields, with ``metric_settings`` only when some are set (so runs written before it
        existed resume, and so do the fields added since, :data:`LATER`, at their defaults); a
        deferred run's evaluation settings are not part of it (only immediate efficacy, which
        the run itself scores)."""
        if self.defer:
            out = {"defer": True}
            return {**out, "immediate": True, "realistic": self.realistic} if self.immediate \
                else out
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in LATER or v != LATER[k]}
        if not out.pop("metric_settings"):
            return out
        return {**out, "metric_settings": dict(self.metric_settings)}


SAMPLINGS = ("stream", "edited")
# Fields added after run folders were first written, with the value their configs imply.
LATER: dict[str, Any] = {"sampling": "stream", "immediate": False}
# The study's protocol (EvalSettings.study).
STUDY: dict[str, Any] = {"sampling": "edited", "sample": 1000, "downstream_n": 400,
                         "known_n": None, "realistic": True, "forgetting": 1000,
                         "immediate": True}

FIELDS = frozenset(f.name for f in dataclasses.fields(EvalSettings)) - {"metric_settings"}


def field_defaults(*names: str) -> dict[str, Any]:
    """``{name: default}`` of these :class:`EvalSettings` fields (a built-in metric's settings)."""
    found = {f.name: f.default for f in dataclasses.fields(EvalSettings) if f.name in names}
    missing = set(names) - set(found)
    if missing:
        raise KeyError(f"no EvalSettings fields {sorted(missing)}")
    return {name: found[name] for name in names}
