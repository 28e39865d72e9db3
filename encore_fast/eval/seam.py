"""The evaluation seam: a metric is one :class:`Metric` object, registered in one place
(:mod:`encore_fast.eval.registry`).

A metric says which settings it adds (with defaults), its command-line options, whether the
settings turn it on, how it prepares its data once per run, what it writes into an evaluation
line after N edits, how it takes its baseline back from an earlier session's lines, and what
it shows: its summary columns, its panels in ``metrics.png`` and any figures of its own. The
evaluator, the run folder, the CLI, the report and the plots ask the registered metrics and name
none of them.

Beside its aggregates a metric may return the items they were computed from, as a list of rows
under the reserved key :data:`OUTCOME_ROWS` of its part (each row a JSON object: what it is
about and its values, e.g. ``{"record": 12, "case_id": 345, "es": 1.0}``). The evaluator takes
them out of the line, names the metric in each row, and the run folder writes them into the
evaluation's outcome file (:mod:`encore_fast.eval.outcomes`). A series with an ``interval``
(computed from those rows) gets an interval in the summary table and a band in the plots.
Every hook has a do-nothing default::

    class MeanLogit(Metric):
        name = "mean_logit"
        settings = {"mean_logit_top": 0}
        options = (Option("--mean-logit-top", "mean_logit_top", "...", default=0, minimum=0),)
        series = (Series("mean_logit", bounded=False),)

        def enabled(self, settings):
            return self.setting(settings, "mean_logit_top") > 0

        def evaluate(self, point, data):
            return {"metrics": {"mean_logit": ...}}

    register(MeanLogit())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from encore_fast.data import DataError, locate
from encore_fast.eval.datasets import DatasetError, EvalRecord
from encore_fast.eval.intervals import Estimate
from encore_fast.eval.results import RunData
from encore_fast.eval.settings import EvalSettings

Values = tuple[list[float], list[float]]  # (edits done, values) of one run
Band = tuple[list[float], list[float], list[float]]  # (edits done, lows, highs) of one run
# A quantity's interval at one evaluation line of a run (None: none there).
Interval = Callable[[RunData, Mapping[str, Any]], Estimate | None]
OUTCOME_ROWS = "outcomes"  # the key of a metric's part that holds its per-item rows


@dataclass(frozen=True)
class Option:
    """A command-line option of a metric; its value (through ``convert``) is the setting."""

    flag: str  # e.g. "--ppl-tokens" (argparse's dest: ppl_tokens)
    setting: str  # the setting it fills, e.g. "ppl_tokens"
    help: str
    default: Any = None  # the option's default (before ``convert``)
    type: Callable[[str], Any] | None = None  # argparse type of a valued option
    minimum: int | None = None  # an integer option: the least value accepted
    choices: tuple[Any, ...] | None = None
    switch: bool = False  # a flag without a value (store_true)
    convert: Callable[[Any], Any] | None = None  # option value -> setting value

    @property
    def dest(self) -> str:
        """The argparse attribute the option's value lands in."""
        return self.flag.lstrip("-").replace("-", "_")

    def setting_value(self, value: Any) -> Any:
        """The setting the option's value stands for."""
        return self.convert(value) if self.convert else value


@dataclass(frozen=True)
class Series:
    """A quantity of the evaluation lines drawn against edits (one panel; the runs overlaid)."""

    key: str  # in the line's "metrics", else the line itself; dots go deeper ("forgetting.es")
    title: str | None = None  # the panel's title (default: the key)
    bounded: bool = True  # a rate: drawn on [0, 1]
    read: Callable[[RunData], Values | None] | None = None  # other data (None: not drawn)
    interval: Interval | None = None  # its interval at a line, from the outcome rows

    def values(self, run: RunData) -> Values | None:
        """(edits, values) of the run; the evaluations that lack the quantity are skipped."""
        if self.read is not None:
            return self.read(run)
        x, y = [], []
        for line in run.evals:
            value = line_value(line, self.key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                x.append(line["edits_done"])
                y.append(float(value))
        return x, y

    def estimate(self, run: RunData, line: Mapping[str, Any]) -> Estimate | None:
        """Its interval at ``line`` (None without an ``interval``, or outcome rows)."""
        return self.interval(run, line) if self.interval is not None else None

    def band(self, run: RunData) -> Band | None:
        """(edits, lows, highs) at the evaluations where it has an interval (None: nowhere)."""
        x: list[float] = []
        low: list[float] = []
        high: list[float] = []
        for line in run.evals if self.interval is not None else ():
            est = self.estimate(run, line)
            if est is not None:
                x.append(line["edits_done"])
                low.append(est.low)
                high.append(est.high)
        return (x, low, high) if x else None


@dataclass(frozen=True)
class Figure:
    """A figure of a metric's own: one panel per series, in a grid."""

    file: str  # PNG file name in the plots folder
    panels: Callable[[Sequence[RunData]], Sequence[Series]]  # the panels, given the runs
    cols: int = 3
    size: tuple[float, float] = (4.0, 3.0)  # inches per panel
    ylabel: str = ""
    log: bool = False  # a log y axis (when anything is drawn)
    markers: bool = True
    optional: bool = False  # not drawn when none of the runs has any of its values
    leads: bool = False  # drawn before the panels of metrics.png (else after)


@dataclass
class EvalPoint:
    """What an evaluation after ``edits_done`` edits looks at."""

    model: Any
    tokenizer: Any
    edits_done: int
    records: list[EvalRecord]  # the sampled records edited so far (before any edit: all)
    stream: Sequence[EvalRecord]  # the whole edit stream, in edit order
    settings: EvalSettings
    indices: list[int] = field(default_factory=list)  # records' positions in the stream
    # before any edit: every record a later evaluation may score (their unedited baselines)
    baseline: list[EvalRecord] = field(default_factory=list)


class Metric:
    """One evaluation metric (subclass it; every hook may be left as it is)."""

    name: ClassVar[str] = ""
    settings: ClassVar[Mapping[str, Any]] = {}  # the settings it adds, with their defaults
    options: ClassVar[tuple[Option, ...]] = ()  # its command-line options
    series: ClassVar[tuple[Series, ...]] = ()  # its panels in metrics.png
    figures: ClassVar[tuple[Figure, ...]] = ()  # figures of its own

    def setting(self, settings: EvalSettings, name: str) -> Any:
        """The value of one of its settings."""
        return settings.value(name, self.settings[name])

    def enabled(self, settings: EvalSettings) -> bool:
        """Whether the settings ask for it."""
        return True

    def check(self, settings: EvalSettings) -> None:
        """Refuse unusable data (:class:`DatasetError`) before a model is loaded."""

    def check_tokenizer(self, settings: EvalSettings, tokenizer: Any) -> None:
        """Refuse data the model's tokenizer cannot use, before a run folder is made."""

    def prepare(self, tokenizer: Any, stream: Sequence[EvalRecord],
                settings: EvalSettings) -> Any:
        """Its data, prepared once per run (kept with its baseline; passed to the others)."""
        return None

    def restore(self, data: Any, lines: Sequence[Mapping[str, Any]]) -> None:
        """Take its baseline back from the evaluation lines of an earlier session."""

    def evaluate(self, point: EvalPoint, data: Any) -> Mapping[str, Any]:
        """Its part of the evaluation line (a mapping under an existing key, e.g.
        ``"metrics"``, is merged into it; its per-item rows under :data:`OUTCOME_ROWS`)."""
        return {}

    def summary(self, run: RunData) -> dict[str, Any]:
        """Its columns in a run's summary: by default the last evaluation's value of each of
        its series that the run has (with its interval, where the outcome rows give one)."""
        last = run.evals[-1] if run.evals else {}
        return {s.key: measured(run, last, s, v) for s in self.series
                if (v := line_value(last, s.key)) is not None}

    def progress(self, line: Mapping[str, Any]) -> dict[str, float]:
        """What the progress bar shows of an evaluation line: by default its series' values
        among the line's edit metrics."""
        metrics = line.get("metrics") or {}
        return {s.key: metrics[s.key] for s in self.series
                if isinstance(metrics.get(s.key), float)}


def measured(run: RunData, line: Mapping[str, Any], series: Series, value: Any) -> Any:
    """``value`` (the series' at ``line``) as a summary cell: with its interval when the
    outcome rows give one (an :class:`~encore_fast.eval.intervals.Measure`, a float equal to
    the value), else as it is."""
    est = series.estimate(run, line) if isinstance(value, int | float) else None
    return cell(est, value)


def cell(est: Estimate | None, value: Any) -> Any:
    """``value`` as a summary cell: with ``est``'s interval when there is one (a
    :class:`~encore_fast.eval.intervals.Measure`, a float equal to ``value``)."""
    if est is None or not isinstance(value, int | float):
        return value
    return dataclasses.replace(est, value=float(value)).number()


def line_value(line: Mapping[str, Any], key: str) -> Any:
    """A quantity of an evaluation line: ``key`` in its ``"metrics"``, else in the line; a
    dotted key goes into nested mappings (``"downstream.mean_f1"``)."""
    if "." not in key:
        return (line.get("metrics") or {}).get(key, line.get(key))
    value: Any = line
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def first_value(lines: Sequence[Mapping[str, Any]], key: str) -> Any:
    """``key`` of the first evaluation line that holds it (not None), else None: a baseline
    taken from an earlier session."""
    for line in lines:
        if line.get("type") == "eval" and line.get(key) is not None:
            return line[key]
    return None


def data_file(value: str, default: str, what: str) -> str | None:
    """A path from an option: ``none`` -> None, ``auto`` -> the standard file ``default`` (a
    data folder's copy, else the download cache, else downloaded once: ``encore_fast.data``)."""
    if value.lower() == "none":
        return None
    if value != "auto":
        return value
    try:
        return str(locate(default))
    except DataError as exc:
        raise DatasetError(f"no {what} given: {exc}") from None
