"""PNG plots of one or several runs overlaid: norm growth, edit metrics, perplexity vs edits.

Each run is one colour; runs are compared on the same axes. Uses matplotlib's Agg backend
(no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from encore_fast.eval.report import METRIC_KEYS, RunData, load_run  # noqa: E402

_EXTRA = ("known_acc", "known_retained", "forgetting.es", "forgetting.ps",
          "forgetting.real_es", "downstream.mean_f1")


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_norms(runs: Sequence[RunData], path: str | os.PathLike[str]) -> Path:
    """One panel per edited layer: ``||W||_F / ||W_0||_F`` after every batch vs edits."""
    layers = sorted({layer for run in runs for layer in run.original_norms()})
    cols = min(3, max(1, len(layers)))
    rows = max(1, -(-len(layers) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for k, layer in enumerate(layers):
        ax = axes[k // cols][k % cols]
        for c, run in enumerate(runs):
            edits, ratios = run.norm_series()
            if layer in ratios:
                ax.plot(edits, ratios[layer], color=f"C{c}", label=run.label)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("edits")
        ax.set_ylabel("||W|| / ||W0||")
        ax.grid(alpha=0.3)
    for k in range(len(layers), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if layers:
        axes[0][0].legend(fontsize=8)
    return _save(fig, Path(path))


def plot_metrics(runs: Sequence[RunData], path: str | os.PathLike[str]) -> Path:
    """One panel per edit metric (and known-fact accuracy) present in the runs, vs edits."""
    keys = [k for k in METRIC_KEYS if any(_series(run, k)[0] for run in runs)]
    keys += [k for k in _EXTRA if any(_series(run, k)[0] for run in runs)]
    return _panels(runs, keys, path, cols=3, size=(4, 3), unbounded=("ge",))


def _panels(runs: Sequence[RunData], keys: Sequence[str], path: str | os.PathLike[str], *,
            cols: int, size: tuple[float, float], unbounded: Sequence[str] = (),
            title: Callable[[str], str] | None = None) -> Path:
    """One panel per quantity in ``keys`` vs edits, the runs overlaid (rates on [0, 1])."""
    cols = min(cols, max(1, len(keys)))
    rows = max(1, -(-len(keys) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                             squeeze=False)
    for k, key in enumerate(keys):
        ax = axes[k // cols][k % cols]
        for c, run in enumerate(runs):
            x, y = _series(run, key)
            ax.plot(x, y, marker="o", markersize=3, color=f"C{c}", label=run.label)
        ax.set_title(title(key) if title else key)
        if key not in unbounded:  # rates
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    for k in range(len(keys), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if keys:
        axes[0][0].legend(fontsize=8)
    return _save(fig, Path(path))


def plot_perplexity(runs: Sequence[RunData], path: str | os.PathLike[str]) -> Path:
    """WikiText-2 perplexity vs edits (a log axis: a collapsing run's grows by orders of
    magnitude, which would flatten the others' on a linear one)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for c, run in enumerate(runs):
        x, y = _series(run, "perplexity")
        ax.plot(x, y, marker="o", markersize=3, color=f"C{c}", label=run.label)
    ax.set_xlabel("edits")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_downstream(runs: Sequence[RunData], path: str | os.PathLike[str]) -> Path:
    """One panel per downstream task (F1) and their mean, vs edits."""
    tasks = sorted({k for run in runs for line in run.evals
                    for k, v in (line.get("downstream") or {}).items() if isinstance(v, dict)})
    keys = [f"downstream.{t}.f1" for t in tasks] + ["downstream.mean_f1"]
    return _panels(runs, keys, path, cols=4, size=(3.6, 2.8),
                   title=lambda k: k.removeprefix("downstream.").replace(".f1", " F1"))


def plot_runs(
    dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
) -> list[Path]:
    """All three plots for the runs in ``dirs``, written as PNGs into ``out_dir``."""
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(dirs)]
    out = Path(out_dir)
    paths = [
        plot_norms(runs, out / "norm_growth.png"),
        plot_metrics(runs, out / "metrics.png"),
        plot_perplexity(runs, out / "perplexity.png"),
    ]
    if any(line.get("downstream") for run in runs for line in run.evals):
        paths.append(plot_downstream(runs, out / "downstream.png"))
    return paths


def _series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    """(edits, values) of an evaluation quantity, skipping evaluations that lack it."""
    x, y = [], []
    for line in run.evals:
        value = line.get("metrics", {}).get(key, line.get(key))
        if "." in key:  # a nested quantity, e.g. "downstream.mean_f1" or "forgetting.es"
            value = line
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            x.append(line["edits_done"])
            y.append(float(value))
    return x, y
