"""EvoEdit: AlphaEdit with a projector that evolves with the edits (Lyu, Gu et al., 2025,
"Evolving Null-space Alignment", arXiv 2510.13851).

``Δ = R (Kᵀ P_t K + α I)⁻¹ (P_t K)ᵀ``, i.e. ``V = P_t K (Kᵀ P_t K + α I)⁻¹`` (an ``n × n``
solve, no ``S``). ``P_0`` is AlphaEdit's projector onto C0's null space; each batch's key
directions then leave it: ``P_{t+1} = P_t − Q Qᵀ``, ``Q`` the left singular vectors of ``P_t K``
with ``σ > max(σ₁ max(d_in, n) ε_fp32, 10⁻¹⁰)``. ``P_t`` is kept in ``state.extra["P"]``.
A layer with ``‖P_t K‖_F < 10⁻³`` is skipped (``V = 0``, ``P_t`` kept). The official code
(``EvoEdit/EvoEdit_main.py`` in github.com/Euphoria040201/RLSEdit) ends the whole batch there
(its later layers are skipped too), and also at any layer whose mean ``‖z − h‖ < 10⁻²``; not
here: ``after_batch`` sees only the keys, so each layer's skip depends on its ``P_t K`` alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from encore_fast.config import EditConfig
from encore_fast.methods.alphaedit import null_space_projector
from encore_fast.methods.base import LayerState, UpdateRule, eye_like

SKIP_BELOW = 1e-3  # ‖P K‖_F under which a layer is not edited (the official code's value)


class EvoEdit(UpdateRule):
    name = "evoedit"
    preset = "alphaedit"
    sequential = False
    woodbury = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "llama3-8b": {"alpha": 4.0, "null_space_threshold": 2e-2},
        "smollm2-135m-stream": {"alpha": 10.0}}  # (its tuning's choice)

    def projector(self, state: LayerState, cfg: EditConfig | None) -> torch.Tensor:
        """``P_t``: the evolved one, else AlphaEdit's ``P_0`` of ``C0`` (cached)."""
        if "P" in state.extra:
            return state.extra["P"]
        if cfg is None:
            raise ValueError("EvoEdit's first projector needs the settings (null_space_*)")
        key = f"P:{cfg.null_space_threshold}:{cfg.null_space_relative}"
        if key not in state.cache:
            state.cache[key] = null_space_projector(state.c0, cfg.null_space_threshold,
                                                    cfg.null_space_relative)
        return state.cache[key]

    def solve(self, keys: torch.Tensor, resid: torch.Tensor, state: LayerState,
              cfg: EditConfig) -> torch.Tensor:
        """``V = P K (Kᵀ P K + α I)⁻¹`` (zero for a skipped layer)."""
        pk = self.projector(state, cfg) @ keys
        if torch.linalg.matrix_norm(pk) < SKIP_BELOW:
            return torch.zeros_like(keys)
        small = keys.T @ pk
        return torch.linalg.solve(small + cfg.alpha * eye_like(small), pk.T).T

    def after_batch(self, keys: torch.Tensor, state: LayerState,
                    cfg: EditConfig | None = None) -> None:
        """``P ← P − Q Qᵀ`` over the batch's directions in ``P K`` (not for a skipped layer)."""
        p = self.projector(state, cfg)
        pk = p @ keys
        if torch.linalg.matrix_norm(pk) < SKIP_BELOW:
            return
        u, sv, _ = torch.linalg.svd(pk, full_matrices=False)
        floor = max(float(sv[0]) * max(pk.shape) * torch.finfo(torch.float32).eps, 1e-10)
        q = u[:, sv > floor]
        state.extra["P"] = p - q @ q.T
