"""The registered evaluation metrics, in order: the one place a metric is added.

The order is that of the evaluations, of the summary's columns, of the CLI's options and of the
plots' panels. The built-in metrics are registered here; a new one is one :func:`register` call
(and :func:`unregister` takes it away again), in user code as well::

    from encore_fast.eval.registry import register
    register(MeanLogit())
"""

from __future__ import annotations

from encore_fast.eval.chat import AskedInChat
from encore_fast.eval.health import Downstream, EditTime, KnownFacts, Perplexity, WeightNorms
from encore_fast.eval.immediate import Immediate
from encore_fast.eval.scores import CounterFact, Forgetting, Generation, Realistic, Zsre
from encore_fast.eval.seam import Metric
from encore_fast.eval.settings import FIELDS, EvalSettings

METRICS: dict[str, Metric] = {}


def register(metric: Metric, *, replace: bool = False) -> Metric:
    """Add ``metric`` after those registered (``replace``: put it in the place of the one of
    its name). Its name, settings and options must be new."""
    problem = _conflict(metric, replace)
    if problem:
        raise ValueError(f"metric {metric.name!r}: {problem}")
    METRICS[metric.name] = metric
    return metric


def _conflict(metric: Metric, replace: bool) -> str | None:
    """Why ``metric`` cannot be registered (None: it can)."""
    name = metric.name
    if not name or not isinstance(name, str):
        return f"{type(metric).__name__} has no name"
    old = METRICS.get(name)
    if old is not None and old is not metric and not replace:
        return (f"already registered ({type(old).__name__}); pass replace=True to replace "
                "it")
    others = [m for m in METRICS.values() if m.name != name]
    taken = {s: m.name for m in others for s in m.settings}
    flags = {o.flag: m.name for m in others for o in m.options}
    clash = next((s for s in metric.settings if s in taken), None)
    if clash is not None:
        return f"setting {clash!r} belongs to {taken[clash]!r}"
    for option in metric.options:
        if option.flag in flags:
            return f"option {option.flag} belongs to {flags[option.flag]!r}"
        if option.setting not in metric.settings and option.setting not in FIELDS:
            return f"option {option.flag} fills an unknown setting {option.setting!r}"
    return None


def registered() -> tuple[Metric, ...]:
    """The registered metrics, in order."""
    return tuple(METRICS.values())


def get_metric(name: str) -> Metric:
    """The registered metric ``name`` (KeyError naming the others when there is none)."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"no metric {name!r}; registered: {list(METRICS)}") from None


def unregister(name: str) -> None:
    """Remove the metric ``name`` (nothing happens when it is not registered)."""
    METRICS.pop(name, None)


def enabled_metrics(settings: EvalSettings) -> list[Metric]:
    """The registered metrics these settings ask for, in order. Settings in
    ``metric_settings`` that no registered metric declares are an error (a typo would
    otherwise be ignored)."""
    known = {s for m in METRICS.values() for s in m.settings}
    unknown = sorted(set(settings.metric_settings) - known)
    if unknown:
        raise ValueError(f"metric_settings {unknown} belong to no registered metric")
    return [m for m in METRICS.values() if m.enabled(settings)]


for _metric in (CounterFact(), Immediate(), Realistic(), AskedInChat(), Generation(), Zsre(),
                Perplexity(), KnownFacts(), WeightNorms(), EditTime(), Downstream(), Forgetting()):
    register(_metric)
