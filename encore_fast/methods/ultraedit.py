"""UltraEdit: lifelong edits with no per-fact optimisation (Gu et al., arXiv 2505.14679).

Per batch, one forward+backward pass per group of ``group_size`` requests gives, at each edited
module and answer token, its input ``k`` and the gradient ``g`` of the answer tokens' loss at
its output (:mod:`encore_fast.values.gradients`). ``[k; g]`` is normalised by a running
mean/std kept over the whole stream (this batch's rows folded in first, never reset):
``[k̂; ĝ]``; the pseudo-values are ``v = −lr · ‖k̂‖² · ĝ`` and, with the raw keys as rows of
``K`` ``[N, d_in]`` and ``V`` ``[N, d_out]``, ``Δ = Vᵀ K (KᵀK + I)⁻¹ = Vᵀ (K Kᵀ + I)⁻¹ K``
(the ``N × N`` form). No ``C0``, no ``S``. Modules: gate projections of ``gate_layers`` and up
projections of ``up_layers`` (sites ``"mlp_gate.L"``, ``"mlp_up.L"``). The official code shares
one normaliser between modules of the same shape; here each module has its own.
"""

from __future__ import annotations

from typing import Any

import torch

from encore_fast.errors import ConfigError
from encore_fast.methods.base import LayerState, UpdateRule
from encore_fast.methods.checks import number
from encore_fast.methods.normaliser import fold, normalised, record
from encore_fast.methods.transforms import LowRankUpdate
from encore_fast.values.gradients import answer_rows


class UltraEdit(UpdateRule):
    name = "ultraedit"
    direct, uses_c0, sequential, woodbury = True, False, False, False
    own: dict[str, Any] = {"lr": 1e-6, "group_size": 10, "gate_layers": [11, 12, 13, 14, 15],
                           "up_layers": [18, 19, 20, 21, 22, 23, 24]}
    presets = {"smollm2-135m": {"gate_layers": [10, 11, 12, 13, 14],
                                "up_layers": [17, 18, 19, 20, 21, 22]},
               "smollm2-135m-stream": {"gate_layers": [10, 11, 12, 13, 14],  # (lr: tuned)
                                       "up_layers": [17, 18, 19, 20, 21, 22], "lr": 1e-4},
               "llama3-8b": {"gate_layers": [11, 12, 13, 14, 15],
                             "up_layers": [18, 19, 20, 21, 22, 23, 24], "lr": 1e-6,
                             "group_size": 10}}  # (published: Llama3-8B-Instruct, zsRE)

    @staticmethod
    def check_settings(opts: dict[str, Any]) -> None:
        number("ultraedit.lr", opts["lr"], open_low=True)
        number("ultraedit.group_size", opts["group_size"], 1, integer=True)
        layers = [*opts["gate_layers"], *opts["up_layers"]]
        if not layers or not all(isinstance(x, int) and x >= 0 for x in layers):
            raise ConfigError("ultraedit.gate_layers / up_layers must be lists of layer "
                              f"numbers (not both empty), got {opts['gate_layers']!r}, "
                              f"{opts['up_layers']!r}")

    def sites(self, cfg: Any) -> list[Any]:
        o = self.opts(cfg)
        return ([f"mlp_gate.{l}" for l in o["gate_layers"]]
                + [f"mlp_up.{l}" for l in o["up_layers"]])

    def updates(self, view: Any, tokenizer: Any, reqs: Any, states: dict[Any, LayerState],
                cfg: Any) -> dict[Any, tuple[torch.Tensor, LowRankUpdate]]:
        """Every site's batch record (what its normaliser folds) and update."""
        o = self.opts(cfg)
        rows = answer_rows(view, tokenizer, reqs, self.sites(cfg), o["group_size"])
        return {site: site_update(k, g, states[site].extra, o["lr"])
                for site, (k, g) in rows.items()}

    def record_shape(self, n: int, d_in: int, d_out: int) -> tuple[int, int]:
        """A batch's record per site: its ``[k; g]`` statistics, not its keys."""
        return (3, d_in + d_out)

    def after_batch(self, keys: torch.Tensor, state: LayerState, cfg: Any = None) -> None:
        """Fold the batch's record (``keys``: its statistics, ``[d_in + d_out, 3]``)."""
        state.extra.update(fold(state.extra, keys.T.to(torch.float32)))


def site_update(k: torch.Tensor, g: torch.Tensor, normaliser: dict[str, torch.Tensor],
                lr: float) -> tuple[torch.Tensor, LowRankUpdate]:
    """One site's record and ``Δ = Vᵀ (K Kᵀ + I)⁻¹ K`` from its rows ``K`` ``[N, d_in]``, ``G``
    ``[N, d_out]`` and its normaliser before the batch (not changed here)."""
    rows = torch.cat([k, g], 1)
    rec = record(rows)
    k_hat, g_hat = normalised(rows, fold(normaliser, rec)).split([k.shape[1], g.shape[1]], 1)
    v = (-lr * (k_hat * k_hat).sum(1, keepdim=True)) * g_hat
    k64 = k.double()
    small = k64 @ k64.T + torch.eye(k.shape[0], dtype=torch.float64)
    return rec, LowRankUpdate(v.T.float().contiguous(),
                              torch.linalg.solve(small, k64).T.float().contiguous())
