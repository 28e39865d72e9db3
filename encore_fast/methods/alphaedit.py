"""AlphaEdit: updates projected onto the null space of the preserved keys (Fang et al., 2025).

``Δᵀ = (P (S + K Kᵀ) + α I)⁻¹ P K Rᵀ`` with ``P = U0 U0ᵀ``, U0 the eigenvectors of C0 whose
eigenvalues are below τ (absolute, or relative to the largest eigenvalue).
"""

from __future__ import annotations

import torch

from encore_fast.config import EditConfig
from encore_fast.methods.base import LayerState, UpdateRule, eye_like


def null_space_projector(c0: torch.Tensor, threshold: float, relative: bool = False
                         ) -> torch.Tensor:
    """``P = U0 U0ᵀ`` over the eigenvectors of ``c0`` with eigenvalue < threshold."""
    evals, evecs = torch.linalg.eigh(c0.double())
    tau = threshold * float(evals[-1]) if relative else threshold
    u0 = evecs[:, evals < tau]
    return (u0 @ u0.T).to(c0.dtype)


class AlphaEdit(UpdateRule):
    name = "alphaedit"
    preset = "alphaedit"
    sequential = True
    symmetric = False

    def projector(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        key = f"P:{cfg.null_space_threshold}:{cfg.null_space_relative}"
        if key not in state.cache:
            state.cache[key] = null_space_projector(state.c0, cfg.null_space_threshold,
                                                    cfg.null_space_relative)
        return state.cache[key]

    def base_matrix(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """``Q = P S + α I`` (not symmetric)."""
        p = self.projector(state, cfg)
        return p @ state.seq() + cfg.alpha * eye_like(p)

    def rhs(self, keys: torch.Tensor, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """``P K``: the keys projected onto the null space of the preserved ones."""
        return self.projector(state, cfg) @ keys
