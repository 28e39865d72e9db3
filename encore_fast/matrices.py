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

from encore_fast.errors import EditorConflictError
from encore_fast.kernels import apply_lowrank_update_
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
    def apply(self, layer: int, u: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
        """``W += U Vᵀ``: in the weight's own dtype, or on the master in fp32, writing the
        model's weight rounded in the same pass; returns ‖W‖ after it and ‖Δ‖."""
        w = self.view.weight(layer)
        dev = w.device
        master = self.masters.get(layer)
        if master is None:
            norms = apply_lowrank_update_(w.data, u.to(dev), v.to(dev),
                                          transposed=self.view.arch.transposed)
        else:
            norms = apply_lowrank_update_(master, u.to(dev), v.to(dev),
                                          transposed=self.view.arch.transposed, out=w.data)
        return float(norms[0]), float(norms[1])

    @torch.no_grad()
    def put(self, layer: int, w: torch.Tensor) -> None:
        """Set the matrix of ``layer`` to ``w`` (the master, and the model's weight rounded)."""
        if layer in self.masters:
            self.masters[layer].copy_(w)
        self.view.weight(layer).data.copy_(w)
