"""RLSEdit: recursive least squares over the stream of edits (Wang, Lyu, Gu et al., 2026,
"Soft Recursive Least-Squares for Lifelong LLM Editing", arXiv 2601.15686).

``W_t = W_{t-1} + (V_t − W_{t-1} K_t) K_tᵀ P_t`` with ``P_t⁻¹ = P_{t-1}⁻¹ + K_t K_tᵀ`` and the
prior ``P_0⁻¹ = μ² w C0 + λ² I``: ENCORE's system ``Δ = R Kᵀ (λ_p C0 + λ_n I + S + K Kᵀ)⁻¹``
with ``λ_p = μ² w``, ``λ_n = λ²`` and ``R = V_t − W_{t-1} K_t``, without MPES; so a preset of
ENCORE, not new algebra. (The published settings, λ = 0 and μ = 1, make it sequential MEMIT.)

The published harness differs (github.com/Euphoria040201/RLSEdit): ``experiments/evaluate.py``
hands RLSEdit no ``cache_c``, so ``RLSEdit_main.py`` re-initialises ``P`` from ``P_0`` every
batch (no memory of earlier batches: MEMIT with ``λ_n``), and it subtracts ``W K`` from a
residual ``z − h`` that already is one. Neither is reproduced here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from encore_fast.methods.encore import Encore


class RLSEdit(Encore):
    name = "rlsedit"
    preset = "encore"
    mpes = False
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "llama3-8b": {"lambda_p": 15000.0, "lambda_n": 0.0, "v_lr": 0.1},
        "llama2-7b": {"lambda_p": 15000.0, "lambda_n": 0.0, "v_lr": 0.1},
        "gpt2-xl": {"lambda_p": 20000.0, "lambda_n": 0.0, "v_lr": 0.5},
    }
