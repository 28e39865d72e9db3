"""The edited matrices of an editor: their original values, the fp32 masters of a 16-bit
model, ``W += U Vᵀ`` through the kernel dispatch; and who edits a model (one live editor each).

With masters (``Editor(master_weights=)``), updates are added in fp32 to the master and the
model's weight is refreshed from it, rounded to nearest, in the same pass; so rounding does not
pile up over thousands of edits, and undo, reset, save/load and the norms work on the masters.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from encore_fast.config import EditConfig
from encore_fast.errors import EditorConflictError
from encore_fast.kernels import apply_lowrank_update_
from encore_fast.methods import LayerState, UpdateContext
from encore_fast.models.arch import ModelView

_HOLDERS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[Any]] = (
    weakref.WeakKeyDictionary())  # model -> the live editor that edits it


def check_free(model: torch.nn.Module) -> None:
    """No other live editor edits ``model`` (it would hold the history and sequential state,
    so two would silently undo each other's edits)."""
    holder = _HOLDERS.get(model)
    if holder is not None and holder() is not None:
        raise EditorConflictError(
            "this model object is already edited by another live Editor (it holds the "
            "history and sequential state, so two would silently undo each other's "
            "edits); use that editor, call its release(), or edit copy.deepcopy(model)")


def claim(model: torch.nn.Module, editor: Any) -> None:
    """``editor`` edits ``model`` from now on, as long as it lives (see :func:`check_free`)."""
    _HOLDERS[model] = weakref.ref(editor)


def unclaim(model: torch.nn.Module, editor: Any) -> None:
    """``editor`` no longer edits ``model`` (if it was the one that did)."""
    holder = _HOLDERS.get(model)
    if holder is not None and holder() is editor:
        del _HOLDERS[model]


class EditedMatrices:
    """The edited layers' matrices: ``original`` (``{layer: W0}``, kept unedited) and
    ``masters`` (``{layer: fp32 W}``; empty without masters)."""

    def __init__(self, view: ModelView, layers: list[int], master_weights: bool | None) -> None:
        self.view = view
        self.original = {l: view.weight(l).detach().clone() for l in layers}
        half = view.dtype in (torch.float16, torch.bfloat16)
        self.use_masters = half and (master_weights is None or bool(master_weights))
        self.masters: dict[int, torch.Tensor] = {
            l: w0.float() for l, w0 in self.original.items()} if self.use_masters else {}

    def edited(self, layer: int) -> torch.Tensor:
        """The matrix as the editor accumulates it: the fp32 master, else the model's weight."""
        return self.masters.get(layer, self.view.weight(layer))

    @torch.no_grad()
    def apply(self, layer: int, u: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> tuple[float, float]:
        """``W += U Vᵀ`` (``M ⊙ U Vᵀ`` with a ``mask``): in the weight's own dtype, or on the
        master in fp32, writing the model's weight rounded in the same pass; returns ‖W‖ after
        it and ‖Δ‖."""
        w = self.view.weight(layer)
        master = self.masters.get(layer)
        return apply_update_(w.data if master is None else master, u, v, mask,
                             self.view.arch.transposed, out=None if master is None else w.data)

    def out_in(self, layer: int, original: bool = False) -> torch.Tensor:
        """The edited (or ``original``) matrix of ``layer`` as ``[d_out, d_in]`` fp32."""
        w = (self.original[layer] if original else self.edited(layer)).detach().float()
        return w.T if self.view.arch.transposed else w

    def update_context(self, layer: int, state: LayerState, cfg: EditConfig,
                       keys: torch.Tensor) -> UpdateContext:
        """What an update transform of ``layer`` reads (:class:`UpdateContext`)."""
        return UpdateContext(layer, self.out_in(layer), self.out_in(layer, original=True),
                             state, cfg, keys)

    @torch.no_grad()
    def put(self, layer: int, w: torch.Tensor) -> None:
        """Set the matrix of ``layer`` to ``w`` (the master, and the model's weight rounded)."""
        if layer in self.masters:
            self.masters[layer].copy_(w)
        self.view.weight(layer).data.copy_(w)


@torch.no_grad()
def apply_update_(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  transposed: bool, out: torch.Tensor | None = None) -> tuple[float, float]:
    """``w += U Vᵀ`` through the kernel dispatch, or ``w += M ⊙ (U Vᵀ)`` densely in fp32 for a
    masked update (``mask``: ``[d_out, d_in]`` bool); ``out`` receives ``w`` rounded to its
    dtype. Returns ‖w‖ after it and ‖Δ‖. The one place an update is added to a matrix."""
    dev = w.device
    u, v = u.to(dev), v.to(dev)
    if mask is None:
        norms = apply_lowrank_update_(w, u, v, transposed=transposed, out=out)
        return float(norms[0]), float(norms[1])
    delta = (u.float() @ v.float().T) * mask.to(dev)
    w.add_((delta.T if transposed else delta).to(w.dtype))
    if out is not None:
        out.copy_(w)
    return float(w.float().norm()), float(delta.norm())
