"""What one batch reports (:class:`BatchReport`), and the checks around its update: its values
before any weight changes, and what a batch that failed and was rolled back raises."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from encore_fast.errors import ConfigError, EditError
from encore_fast.requests import EditRequest
from encore_fast.values.objective import ValueResult


@dataclass
class BatchReport:
    """What one batch did: time, value-optimisation steps, MPES stops, norms per layer."""

    batch_index: int
    n_requests: int
    seconds: float
    steps: list[int]
    mpes_stopped: list[bool]
    weight_norms: dict[int, float]
    delta_norms: dict[int, float]
    seconds_values: float = 0.0
    seconds_update: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


def checked_batch_size(batch_size: Any) -> int:
    """``batch_size`` if it is an integer >= 1 (a :class:`ConfigError` else)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def checked_values(reqs: list[EditRequest], values: list[ValueResult], batch: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Stack the values of batch ``batch`` (on a model of ``dtype``); non-finite ones are an
    error, suspicious ones a warning."""
    bad = [i for i, v in enumerate(values) if not bool(torch.isfinite(v.z).all())]
    if bad:
        names = "; ".join(reqs[i].describe() for i in bad[:3])
        raise EditError(
            f"batch {batch}: the target value of {len(bad)} request(s) is not finite "
            f"({names}): NaN/inf in the value optimisation (a 16-bit model overflowing?); "
            "nothing was changed")
    stuck = [(i, v.zero_grad_updates) for i, v in enumerate(values)
             if getattr(v, "zero_grad_updates", 0)]
    if stuck:
        names = "; ".join(f"{reqs[i].describe()}: {k} of {values[i].updates}"
                          for i, k in stuck[:3])
        why = ("16-bit gradients underflowing: edit in float32, or in bf16, whose range "
               "is wider than fp16's" if dtype in (torch.float16, torch.bfloat16)
               else "the loss does not depend on δ there (e.g. constant logits)")
        warnings.warn(
            f"batch {batch}: the gradient of δ was exactly zero in some optimiser steps "
            f"({names}), so δ did not move there although the report counts the steps; "
            f"likely cause: {why}", stacklevel=4)
    known = [i for i, v in enumerate(values) if v.correct_history and v.correct_history[0]]
    if known:
        names = "; ".join(reqs[i].describe() for i in known[:3])
        warnings.warn(
            f"batch {batch}: {len(known)} request(s) already predict their target on every "
            f"context-prefixed prompt before the edit ({names}); edited anyway (their keys "
            "still enter the update and S)", stacklevel=4)
    return torch.stack([v.z for v in values])


def check_norms(layer: int, weight_norm: float, delta_norm: float, dtype_name: str) -> None:
    """An :class:`EditError` unless the edited weights and the update are finite."""
    if not (math.isfinite(weight_norm) and math.isfinite(delta_norm)):
        raise EditError(f"layer {layer}: the edited weights are not finite "
                        f"(‖W‖ = {weight_norm}): the update overflows the model's {dtype_name}")


def rolled_back_error(exc: BaseException, where: str) -> EditError | None:
    """What a failed, rolled back batch raises instead of ``exc`` (None: ``exc`` itself)."""
    if isinstance(exc, torch.linalg.LinAlgError):
        return EditError(
            f"{where}: the update's linear system could not be solved ({exc}); C0 or "
            "lambda_p / lambda_n / alpha may be wrong; the batch was rolled back, "
            "nothing was changed")
    if isinstance(exc, EditError):
        return EditError(f"{where}: {exc}; the batch was rolled back, nothing was changed")
    return None
