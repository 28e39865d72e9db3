"""PNG plots of one or several runs overlaid, vs edits: what the registered metrics show.

``metrics.png`` holds one panel per series of the registered metrics (edit metrics, known
facts, forgetting, ...) that the runs have; the metrics' own figures (norm growth per layer,
perplexity, downstream tasks, ...) come before it (``Figure.leads``) or after it. Each run is
one colour; runs are compared on the same axes, each quantity with a band where its
evaluations' outcome rows give it an interval. Uses matplotlib's Agg backend (no display
needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from encore_fast.eval.registry import registered  # noqa: E402
from encore_fast.eval.report import load_run  # noqa: E402
from encore_fast.eval.results import RunData  # noqa: E402
from encore_fast.eval.seam import Figure, Series  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has_values(series: Series, runs: Sequence[RunData]) -> bool:
    return any((values := series.values(run)) is not None and values[0] for run in runs)


def metrics_figure() -> Figure:
    """``metrics.png``: a panel per series of the registered metrics that the runs have."""

    def panels(runs: Sequence[RunData]) -> list[Series]:
        return [s for m in registered() for s in m.series if _has_values(s, runs)]

    return Figure("metrics.png", panels)


def draw_figure(spec: Figure, runs: Sequence[RunData]) -> plt.Figure:
    """The figure ``spec`` describes, for ``runs`` (one colour each; not saved)."""
    panels = list(spec.panels(runs))
    cols = min(spec.cols, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(spec.size[0] * cols, spec.size[1] * rows),
                             squeeze=False)
    style = {"marker": "o", "markersize": 3} if spec.markers else {}
    for k, series in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for c, run in enumerate(runs):
            values = series.values(run)
            if values is not None:
                ax.plot(*values, color=f"C{c}", label=run.label, **style)
            band = series.band(run) if values is not None else None
            if band is not None:  # (its interval, where the outcome rows give one)
                ax.fill_between(*band, color=f"C{c}", alpha=0.2, linewidth=0)
        ax.set_title(series.key if series.title is None else series.title)
        if series.bounded:  # rates
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("edits")
        if spec.ylabel:
            ax.set_ylabel(spec.ylabel)
        ax.grid(alpha=0.3)
        if spec.log and ax.lines:
            ax.set_yscale("log")  # (a collapsing run's grows by orders of magnitude)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if panels and axes[0][0].lines:
        axes[0][0].legend(fontsize=8)
    return fig


def plot_figure(spec: Figure, runs: Sequence[RunData], path: str | os.PathLike[str]) -> Path:
    """Draw ``spec`` for ``runs`` into the PNG ``path``."""
    return _save(draw_figure(spec, runs), Path(path))


def plot_metrics(runs: Sequence[RunData], path: str | os.PathLike[str]) -> Path:
    """One panel per series of the registered metrics present in the runs, vs edits."""
    return plot_figure(metrics_figure(), runs, path)


def run_figures() -> list[Figure]:
    """The figures :func:`plot_runs` draws, in order."""
    own = [f for m in registered() for f in m.figures]
    return [f for f in own if f.leads] + [metrics_figure()] + [f for f in own if not f.leads]


def plot_runs(
    dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """All figures for the runs in ``dirs``, written as PNGs into ``out_dir`` (an optional
    figure only when the runs have its values)."""
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    out = Path(out_dir)
    paths = []
    for spec in run_figures():
        if spec.optional and not any(_has_values(s, runs) for s in spec.panels(runs)):
            continue
        paths.append(plot_figure(spec, runs, out / spec.file))
    return paths
