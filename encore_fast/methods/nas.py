"""NAS: the target values' norms anchored to what the unedited model's values look like.

With ``v0`` the last edited layer's MLP output at the subject's last token (raw prompt) and
``v* = v0 + δ`` (``δ = z − h0``, the value optimisation's shift): a request whose ‖v*‖ exceeds
``skip_factor · μ`` keeps ``v* = v0`` (it stays in the batch, as a constraint to preserve);
every other one gets ``v* ← μ · v*/‖v*‖``; then ``z = (h0 − v0) + v*``. The anchor ``μ`` is the
mean ‖v*‖ of value optimisations on the unedited model, its top 5% dropped
(:mod:`encore_fast.methods.nas_anchor`). A value transform: ``"alphaedit+nas"`` (the official
pairing, alias ``"nas"``), ``"encore+nas"``, ... (NAS, arXiv 2602.02543.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from encore_fast.methods.nas_anchor import ANCHOR_SETTINGS, anchor, check_anchor_settings
from encore_fast.methods.transforms import ValueContext, ValueTransform
from encore_fast.values.keys import SubjectForwards


def anchored(zs: torch.Tensor, h0: torch.Tensor, v0: torch.Tensor, mu: float,
             skip_factor: float) -> torch.Tensor:
    """NAS's targets from the rule's ``zs``, the block outputs ``h0`` and MLP outputs ``v0``
    (all ``[n, d]``, fp32) and the anchor ``mu``."""
    v_star = v0 + (zs - h0)
    norm = v_star.norm(dim=1, keepdim=True)
    scaled = v_star * (mu / norm.clamp_min(1e-12))
    v_star = torch.where(norm > skip_factor * mu, v0, scaled)
    return (h0 - v0) + v_star


class Nas(ValueTransform):
    name = "nas"
    own: dict[str, Any] = {"skip_factor": 2.0, **ANCHOR_SETTINGS}
    # (its SmolLM2 tuning, composed with AlphaEdit: α 10; a rule without α ignores it)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"smollm2-135m-stream": {"alpha": 10.0}}
    check_settings = staticmethod(check_anchor_settings)

    def __init__(self) -> None:
        self.anchors: dict[str, float] = {}  # (computed once per editor, also without a cache)

    def apply(self, zs: torch.Tensor, ctx: ValueContext) -> torch.Tensor:
        opts = self.opts(ctx.cfg)
        mu = anchor(ctx, opts, self.anchors)
        h0 = torch.stack([v.h0 for v in ctx.values]).float().to(zs.device)
        v0 = SubjectForwards(ctx.view, ctx.tokenizer, ctx.requests, []).mlp_outputs(ctx.layer)
        return anchored(zs.float(), h0, v0.to(zs.device), mu, opts["skip_factor"]).to(zs.dtype)
