"""What an update rule is: a map from keys ``K`` and residuals ``R`` to ``Δ = R Vᵀ``.

Every method in the MEMIT family produces an update of rank ``n`` (the batch size) whose left
factor is the residual matrix ``R``; a rule only has to return the right factor ``V``. The
per-layer state (``C0``, the sequential sum ``S`` of earlier keys, AlphaEdit's projector) lives in
:class:`LayerState`. The reference solves in float64, as docs/design.md §2 says.
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
    """Base class: a rule states its linear system once; both engines solve it.

    The system of a batch with keys ``K`` is ``(base_matrix + rhs(K) Kᵀ) V = rhs(K)``, with
    ``Δ = R Vᵀ``. ``base_matrix`` is the part that changes only between batches (the fast
    engine keeps its inverse and folds each batch in with a Woodbury update); ``symmetric``
    rules have an SPD base matrix and ``rhs(K) = K`` (Cholesky inverse, SYRK down-date);
    others get a general inverse. ``after_batch`` folds the keys into ``S``.

    Class attributes describe the method for the registry: ``name``, ``preset`` (the preset
    family whose settings it starts from: ``"memit"``, ``"encore"`` or ``"alphaedit"``),
    ``mpes`` (whether MPES is on by default), ``sequential`` (whether ``S`` accumulates).
    """

    name = "base"
    preset = "memit"
    mpes = False
    sequential = True
    symmetric = True

    def base_matrix(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """The matrix of the system without this batch's keys (float64, ``[d_in, d_in]``)."""
        raise NotImplementedError

    def rhs(self, keys: torch.Tensor, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """How the batch's keys ``[d_in, n]`` enter the system (``K`` unless overridden)."""
        return keys

    def solve(
        self, keys: torch.Tensor, resid: torch.Tensor, state: LayerState, cfg: EditConfig
    ) -> torch.Tensor:
        """``V`` by a direct float64 solve of the full system (the reference engine); the
        residuals ``resid`` only scale ``Δ = R Vᵀ`` and are not needed here."""
        rhs = self.rhs(keys, state, cfg)
        return torch.linalg.solve(self.base_matrix(state, cfg) + rhs @ keys.T, rhs)

    def after_batch(self, keys: torch.Tensor, state: LayerState) -> None:
        """Fold this batch's keys into ``S`` (sequential methods)."""
        if self.sequential:
            state.seq().addmm_(keys, keys.T)


def eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
