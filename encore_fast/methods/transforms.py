"""Transforms that compose with any update rule: of the target values ``z`` before the rule
(NAS), and of each layer's update ``Δ = U Vᵀ`` after it (SPHERE, RECT).

A composed method (``"alphaedit+nas"``, ``"memit-seq+rect"``) runs its value transforms on the
batch's ``z`` in the order written, then, per layer, the rule's update through its update
transforms in the order written. An update stays low-rank (``U``, ``V``) unless a transform
masks it: ``Δ = M ⊙ (U Vᵀ)`` with a boolean ``M`` of the weight's ``d_out × d_in`` shape, stored
with the edits as one bit per weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from encore_fast.config import EditConfig
from encore_fast.methods.base import LayerState, Part
from encore_fast.models.arch import ModelView
from encore_fast.requests import EditRequest


@dataclass
class LowRankUpdate:
    """One layer's update ``Δ = U Vᵀ`` (``u`` ``[d_out, n]``, ``v`` ``[d_in, n]``, fp32), masked
    by ``mask`` (bool ``[d_out, d_in]``) when a transform sparsified it."""

    u: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """``Δ`` as a ``[d_out, d_in]`` fp32 matrix."""
        delta = self.u.float() @ self.v.float().T
        return delta if self.mask is None else delta * self.mask.to(delta.device)

    def with_mask(self, mask: torch.Tensor) -> LowRankUpdate:
        """This update restricted to ``mask`` (and to its own mask, if it has one)."""
        keep = mask if self.mask is None else mask & self.mask
        return replace(self, mask=keep)


@dataclass
class ValueContext:
    """What a value transform may read about a batch: the model (unchanged by the batch so
    far; ``edited``: by earlier batches), its requests and their optimised values, the
    settings, the last edited ``layer``, and ``optimize(requests, contexts, cfg)``, the
    engine's value optimisation (for statistics a transform computes once per model, cached
    under ``cache`` by model ``fingerprint``)."""

    view: ModelView
    tokenizer: Any
    requests: Sequence[EditRequest]
    values: Sequence[Any]  # ValueResult per request (z, h0, ...)
    cfg: EditConfig
    optimize: Callable[[Sequence[EditRequest], list[str], EditConfig], list[Any]]
    fingerprint: str
    cache: Path | None
    edited: bool = False
    progress: bool = False

    @property
    def layer(self) -> int:
        return self.cfg.layers[-1]


@dataclass
class UpdateContext:
    """What an update transform may read about a layer: its current edited matrix ``weight``
    and the unedited one ``original`` (both ``[d_out, d_in]``, fp32), its state, the settings
    and the batch's keys ``[n, d_in]``."""

    layer: int
    weight: torch.Tensor
    original: torch.Tensor
    state: LayerState
    cfg: EditConfig
    keys: torch.Tensor


class ValueTransform(Part):
    """A change of the batch's target values ``z`` ``[n, d_model]`` before the rule."""

    def apply(self, zs: torch.Tensor, ctx: ValueContext) -> torch.Tensor:
        raise NotImplementedError


class UpdateTransform(Part):
    """A change of one layer's update after the rule solved it (before it is applied; its
    factors on the device of the layer's weight)."""

    def apply(self, update: LowRankUpdate, ctx: UpdateContext) -> LowRankUpdate:
        raise NotImplementedError
