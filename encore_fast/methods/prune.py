"""PRUNE: the accumulated edit's large singular values restrained (Ma et al., 2024).

After a batch, the accumulated edit ``E = W + Δ − W0 = U Σ Vᵀ``; singular values above
``σ_max(W0)`` become ``F(σ) = ln σ + σ_max(W0) − ln σ_max(W0)``, so ``W0 + U F(Σ) Vᵀ`` is what
the model holds, and what the next batch sees (the restraint then applies to the restrained
edit plus the next one). As an update transform of rank ``n + k`` (``k`` restrained values):
``Δ' = Δ + U_k (F(Σ_k) − Σ_k) V_kᵀ``, so it stays low-rank and is stored as factors. Cost: one
SVD of a ``d_out × d_in`` matrix per layer and batch (float64). ``"memit-seq+prune"``, ...
"""

from __future__ import annotations

import math

import torch

from encore_fast.errors import ConfigError
from encore_fast.methods.transforms import LowRankUpdate, UpdateContext, UpdateTransform


def restrained(sigma: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """``F(σ)``: unchanged up to ``sigma_max``, ``ln σ + σ_max − ln σ_max`` above it."""
    return torch.where(sigma > sigma_max,
                       torch.log(sigma.clamp_min(sigma_max)) + sigma_max - math.log(sigma_max),
                       sigma)


class Prune(UpdateTransform):
    name = "prune"

    def apply(self, update: LowRankUpdate, ctx: UpdateContext) -> LowRankUpdate:
        if update.mask is not None:
            raise ConfigError("prune restrains a low-rank update: put it before a masking "
                              "transform (e.g. memit-seq+prune+rect)")
        if "sigma_max_w0" not in ctx.state.cache:  # (W0 never changes)
            ctx.state.cache["sigma_max_w0"] = torch.linalg.matrix_norm(
                ctx.original.double(), ord=2).reshape(1)
        s_max = float(ctx.state.cache["sigma_max_w0"])
        edit = (ctx.weight.double() - ctx.original.double()
                + update.u.double() @ update.v.double().T)
        u, s, vh = torch.linalg.svd(edit, full_matrices=False)
        big = s > s_max
        if not bool(big.any()):
            return update
        extra_u = u[:, big] * (restrained(s[big], s_max) - s[big])
        return LowRankUpdate(torch.cat([update.u, extra_u.to(update.u)], 1),
                             torch.cat([update.v, vh[big].T.to(update.v)], 1))
