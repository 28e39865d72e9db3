"""What an update rule is: a map from keys ``K`` and residuals ``R`` to ``Δ = R Vᵀ``.

Every method in the MEMIT family produces an update of rank ``n`` (the batch size) whose left
factor is the residual matrix ``R``; a rule only has to return the right factor ``V``. The
per-layer state (``C0``, the sequential sum ``S`` of earlier keys, AlphaEdit's projector) lives in
:class:`LayerState`. The reference solves in float64, as DESIGN.md §2 specifies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from encore_fast.config import EditConfig


@dataclass
class LayerState:
    """Everything an update rule knows about one edited layer (float64, on the solve device)."""

    c0: torch.Tensor  # [d_in, d_in] E[k kᵀ] of the original model
    s: torch.Tensor | None = None  # [d_in, d_in] Σ K Kᵀ of earlier batches
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # derived, e.g. the projector

    @property
    def d_in(self) -> int:
        return self.c0.shape[0]

    def seq(self) -> torch.Tensor:
        """``S`` (zeros before the first batch)."""
        if self.s is None:
            self.s = torch.zeros_like(self.c0)
        return self.s


class UpdateRule:
    """Base class: ``solve(K, R, state, cfg) -> V`` with ``Δ = R Vᵀ``."""

    name = "base"
    sequential = True  # whether S accumulates the keys of each batch

    def solve(
        self, keys: torch.Tensor, resid: torch.Tensor, state: LayerState, cfg: EditConfig
    ) -> torch.Tensor:
        raise NotImplementedError

    def after_batch(self, keys: torch.Tensor, state: LayerState) -> None:
        """Fold this batch's keys into ``S`` (sequential methods)."""
        if self.sequential:
            state.seq().addmm_(keys, keys.T)


def eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
