"""MEMIT: ``Δ = R Kᵀ (λ_p C0 + [S] + K Kᵀ)⁻¹`` (Meng et al., 2023).

``memit`` is the published algorithm (no memory of earlier batches); ``memit-seq`` adds the
sequential term ``S`` as the ENCORE paper's sequential MEMIT does.
"""

from __future__ import annotations

import torch

from encore_fast.config import EditConfig
from encore_fast.methods.base import LayerState, UpdateRule


class Memit(UpdateRule):
    name = "memit"
    preset = "memit"
    sequential = False

    def base_matrix(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """``λ_p C0`` (+ ``S`` for the sequential variant): SPD."""
        b = cfg.lambda_p * state.c0
        return b + state.seq() if self.sequential else b


class MemitSequential(Memit):
    name = "memit-seq"
    sequential = True
