"""SPHERE (Liu et al., 2026): ``Δ ← Δ (I − a U Uᵀ)``, i.e. ``V ← V − a U (Uᵀ V)``: still low-rank.

``U``: the top eigenvectors of ``Ŵᵀ Ŵ / d_out`` (``Ŵ``: W's rows scaled to unit norm), the
fewest whose eigenvalues' cumulative share exceeds ``eta`` (0.5), among those Ŵ spans; ``a``
0.5. ``weights``: ``"pretrained"`` W0, as the paper (U once per layer, cached), or ``"current"``
W before the batch, as the official code (EasyEdit SPHERE_main.py:100-101): one float64
eigendecomposition of the smaller Gram (``min(d_out, d_in)²``) per layer and batch. Later
layers' keys see the projected update (the code: the unprojected one, SPHERE_main.py:274). Write
it before ``rect`` (a masked update is refused).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from encore_fast.errors import ConfigError
from encore_fast.methods.checks import choice, number
from encore_fast.methods.transforms import LowRankUpdate, UpdateContext, UpdateTransform


def principal_directions(w: torch.Tensor, eta: float) -> torch.Tensor:
    """``U`` ``[d_in, r]`` (float64, orthonormal) of ``w`` ``[d_out, d_in]``."""
    norms = w.double().norm(dim=1, keepdim=True)
    w_hat = w.double() / torch.where(norms > 0, norms, 1.0)
    small = w_hat.shape[0] < w_hat.shape[1]  # (Ŵ Ŵᵀ: the same nonzero spectrum; U = Ŵᵀ Y)
    lam, y = torch.linalg.eigh((w_hat @ w_hat.T if small else w_hat.T @ w_hat) / len(w_hat))
    lam, y = lam.flip(0), y.flip(1)
    r = min(int((lam.cumsum(0) / lam.sum() <= eta).sum()) + 1, int((lam > 1e-12 * lam[0]).sum()))
    u = w_hat.T @ y[:, :r] if small else y[:, :r]
    return u / u.norm(dim=0)


class Sphere(UpdateTransform):
    name = "sphere"
    own: ClassVar[dict[str, Any]] = {"eta": 0.5, "a": 0.5, "weights": "pretrained"}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"smollm2-135m-stream": {"a": 0.2}}  # (tuned)

    @staticmethod
    def check_settings(s: dict[str, Any]) -> None:
        number("sphere.eta", s["eta"], 0, 1, open_low=True)
        number("sphere.a", s["a"], 0, 1)
        choice("sphere.weights", s["weights"], ("pretrained", "current"))

    def apply(self, update: LowRankUpdate, ctx: UpdateContext) -> LowRankUpdate:
        o, cache = self.opts(ctx.cfg), ctx.state.cache
        if update.mask is not None:
            raise ConfigError("sphere cannot project a masked update: write it before rect")
        key = f"sphere:U:{o['eta']}"  # (W0 never changes: its U is made once per layer)
        if o["weights"] == "current":
            u = principal_directions(ctx.weight, o["eta"])
        elif key in cache:
            u = cache[key]
        else:
            u = cache[key] = principal_directions(ctx.original, o["eta"])
        v = update.v.to(u.device, torch.float64)
        return LowRankUpdate(update.u, (v - o["a"] * (u @ (u.T @ v))).to(update.v))
