"""UltraEdit's running normaliser of ``[k; g]`` rows, as the official code updates it.

A batch is folded in from its *record*, ``[3, width]``: its number of rows, their mean and
their (unbiased) variance per column; so a batch's record is all undo and load need to redo the
fold. With ``n`` rows so far, a batch of ``m`` rows, ``d = mean_b − mean``:
``mean += m·d/(n+m)``, ``M += m·var_b + n·m·d²/(n+m)``, ``std = sqrt(M / (n+m−1+ε))`` (ε the
fp32 epsilon; the code adds ``m·var_b`` where the exact pooled sum would add ``(m−1)·var_b``).
A batch of one row has variance 0 here (the code's would be NaN).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

EPS = float(torch.finfo(torch.float32).eps)


def record(rows: torch.Tensor) -> torch.Tensor:
    """A batch's record ``[3, width]`` (fp32): row count, mean, unbiased variance."""
    rows = rows.float()
    var = rows.var(0) if rows.shape[0] > 1 else torch.zeros_like(rows[0])
    return torch.stack([torch.full_like(rows[0], rows.shape[0]), rows.mean(0), var])


def fold(state: Mapping[str, torch.Tensor], rec: torch.Tensor) -> dict[str, torch.Tensor]:
    """The normaliser after folding ``rec`` into ``state`` (``n``, ``mean``, ``M``, ``std``;
    empty: nothing folded yet); ``state`` is not changed."""
    m, mean_b, var_b = rec[0, :1], rec[1], rec[2]
    n = state.get("n", torch.zeros(1))
    mean = state.get("mean", torch.zeros_like(mean_b))
    big_m = state.get("M", torch.zeros_like(mean_b))
    total = n + m
    d = mean_b - mean
    big_m = big_m + m * var_b + n * m * d.pow(2) / total
    return {"n": total, "mean": mean + m * d / total, "M": big_m,
            "std": (big_m / (total - 1 + EPS)).sqrt()}


def normalised(rows: torch.Tensor, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``(x − mean) / (std + ε)`` row-wise."""
    return (rows.float() - state["mean"]) / (state["std"] + EPS)
