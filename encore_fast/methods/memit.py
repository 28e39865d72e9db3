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
    sequential = False

    def system(self, keys: torch.Tensor, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """The SPD matrix ``A`` of the normal equations."""
        a = cfg.lambda_p * state.c0 + keys @ keys.T
        if self.sequential:
            a = a + state.seq()
        return a

    def solve(self, keys: torch.Tensor, resid: torch.Tensor, state: LayerState,
              cfg: EditConfig) -> torch.Tensor:
        return torch.linalg.solve(self.system(keys, state, cfg), keys)


class MemitSequential(Memit):
    name = "memit-seq"
    sequential = True
