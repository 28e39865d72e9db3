"""ENCORE: MEMIT with a Frobenius-norm penalty on every update (Gupta et al., 2025).

``min λ_p‖ΔK0‖² + ‖ΔK_P‖² + ‖(W+Δ)K − V‖² + λ_n‖Δ‖_F²`` gives
``Δ = R Kᵀ (λ_p C0 + λ_n I + S + K Kᵀ)⁻¹``; the λ_n term is what keeps the edited matrices'
norms from growing over thousands of edits. (MPES, ENCORE's other half, lives in the value
optimisation.)
"""

from __future__ import annotations

import torch

from encore_fast.config import EditConfig
from encore_fast.methods.base import LayerState, eye_like
from encore_fast.methods.memit import MemitSequential


class Encore(MemitSequential):
    name = "encore"
    preset = "encore"
    mpes = True

    def base_matrix(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        return super().base_matrix(state, cfg) + cfg.lambda_n * eye_like(state.c0)
