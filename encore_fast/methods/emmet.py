"""EMMET: batched equality-constrained editing (Gupta et al., 2024, "A Unified Framework for
Model Editing").

``C = λ_p C0 + λ_u I + S`` and ``Δ = R (Kᵀ C⁻¹ K + λ_e I)⁻¹ Kᵀ C⁻¹``, i.e.
``V = C⁻¹ K (λ_e I + Kᵀ C⁻¹ K)⁻¹``: the edits are equality constraints ``(W+Δ)K = WK + R``,
relaxed by ``λ_e`` for a batch of several (their keys may be nearly dependent); a single edit
keeps the hard equality ``Δ = r kᵀC⁻¹ / (kᵀC⁻¹k)`` (``single_equality``). Sequential: ``S`` sums
the earlier batches' ``K Kᵀ``. No MPES. The fast engine keeps ``C⁻¹`` and folds each batch in.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from encore_fast.config import EditConfig
from encore_fast.methods.base import LayerState, eye_like
from encore_fast.methods.checks import choice, number
from encore_fast.methods.memit import MemitSequential


class Emmet(MemitSequential):
    name = "emmet"
    preset = "memit"
    own: ClassVar[dict[str, Any]] = {"lambda_u": 0.0, "lambda_e": 0.1, "single_equality": True}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "llama3-8b": {"layers": [5], "lambda_p": 1e5, "lambda_u": 0.0, "lambda_e": 0.1},
        "smollm2-135m-stream": {"lambda_e": 1.0}}  # (its tuning's choice, with λ_p 5000)

    @staticmethod
    def check_settings(settings: dict[str, Any]) -> None:
        number("emmet.lambda_u", settings["lambda_u"])
        number("emmet.lambda_e", settings["lambda_e"])
        choice("emmet.single_equality", settings["single_equality"], (True, False))

    def base_matrix(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """``C = λ_p C0 + λ_u I + S`` (SPD)."""
        return super().base_matrix(state, cfg) + self.opts(cfg)["lambda_u"] * eye_like(state.c0)

    def small_shift(self, n: int, cfg: EditConfig) -> float:
        """``λ_e`` (0 for a single edit with ``single_equality``: the hard constraint)."""
        o = self.opts(cfg)
        return 0.0 if n == 1 and o["single_equality"] else float(o["lambda_e"])

    def solve(self, keys: torch.Tensor, resid: torch.Tensor, state: LayerState,
              cfg: EditConfig) -> torch.Tensor:
        """``V = C⁻¹K (λ_e I + KᵀC⁻¹K)⁻¹`` by direct float64 solves."""
        g = torch.linalg.solve(self.base_matrix(state, cfg), keys)
        small = keys.T @ g
        small = small + self.small_shift(keys.shape[1], cfg) * eye_like(small)
        return torch.linalg.solve(small, g.T).T  # (small is symmetric)
