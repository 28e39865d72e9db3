"""RECT (Gu et al., 2024): ``Δ ← M ⊙ Δ``, ``M`` true on the ``round(keep · d_out d_in)`` entries
of the layer's matrix with the largest relative change ``|Δ_ij| / |W_ij|`` (W before this batch's
update, as in both codes; one top-k over the whole matrix, not per row; ``|W_ij| < 1e-8`` counts
as 1e-8: zeros are kept first, larger ``|Δ|`` first). ``keep``: 0.4 as AlphaEdit's baseline; RECT's
own code keeps 0.2 (Model-Editing-Hurt rome_main.py:76-79). ``select="kthvalue"``: the baseline's
code (NAS memit_rect_main.py:81-84), every entry with ``|Δ / (W + 1e-8)|`` at least its
``⌊(1 − keep) d_out d_in⌋``-th smallest (one more, and ties). Later layers' keys see the masked
update (both codes: the unmasked one). Costs a dense ``d_out × d_in`` mask per layer and batch,
stored as one bit per weight in the edits file.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from encore_fast.methods.checks import choice, number
from encore_fast.methods.transforms import LowRankUpdate, UpdateContext, UpdateTransform


class Rect(UpdateTransform):
    name = "rect"
    own: ClassVar[dict[str, Any]] = {"keep": 0.4, "select": "top"}

    @staticmethod
    def check_settings(s: dict[str, Any]) -> None:
        number("rect.keep", s["keep"], 0, 1, open_low=True)
        choice("rect.select", s["select"], ("top", "kthvalue"))

    def apply(self, update: LowRankUpdate, ctx: UpdateContext) -> LowRankUpdate:
        o, w = self.opts(ctx.cfg), ctx.weight.flatten()
        if o["keep"] >= 1:
            return update
        delta = update.dense().flatten()  # (on the weight's device, as transforms get it)
        if o["select"] == "kthvalue":
            rel = (delta / (w + 1e-8)).abs()
            mask = rel >= rel.kthvalue(max(1, int(rel.numel() * (1 - o["keep"])))).values
        else:
            rel = delta.abs() / w.abs().clamp_min(1e-8)
            mask = torch.zeros_like(rel, dtype=torch.bool)
            mask[rel.topk(max(1, round(o["keep"] * rel.numel()))).indices] = True
        return update.with_mask(mask.view_as(ctx.weight))
