"""encore_fast.eval: data sets, edit metrics, degradation checks and sequential editing runs.

A metric is one :class:`Metric` object, registered with :func:`register_metric` (see
``encore_fast.eval.seam``). The editor never imports this package. Plots
(``encore_fast.eval.plots``) need matplotlib and are imported on demand.
"""

from encore_fast.eval.datasets import (
    DatasetError,
    EvalRecord,
    default_data_dir,
    load_dataset,
    parse_records,
)
from encore_fast.eval.degradation import (
    KnownFact,
    known_fact_hits,
    load_known_facts,
    wikitext_perplexity,
)
from encore_fast.eval.metrics import (
    counterfact_metrics,
    evaluate_records,
    generation_entropy,
    next_token_is,
    score_targets,
    zsre_metrics,
)
from encore_fast.eval.registry import register as register_metric
from encore_fast.eval.registry import registered as registered_metrics
from encore_fast.eval.registry import unregister as unregister_metric
from encore_fast.eval.run import EvalSettings, RunConfigError, read_results, run_sequential
from encore_fast.eval.seam import EvalPoint, Figure, Metric, Option, Series

__all__ = [
    "DatasetError",
    "EvalPoint",
    "EvalRecord",
    "EvalSettings",
    "Figure",
    "KnownFact",
    "Metric",
    "Option",
    "RunConfigError",
    "Series",
    "counterfact_metrics",
    "default_data_dir",
    "evaluate_records",
    "generation_entropy",
    "known_fact_hits",
    "load_dataset",
    "load_known_facts",
    "next_token_is",
    "parse_records",
    "read_results",
    "register_metric",
    "registered_metrics",
    "run_sequential",
    "score_targets",
    "unregister_metric",
    "wikitext_perplexity",
    "zsre_metrics",
]
