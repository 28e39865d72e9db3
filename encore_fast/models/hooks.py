"""Forward hooks the editor runs the model with: capture the edited matrices' inputs (keys),
and end a forward pass early once the last layer needed has run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from encore_fast.models.arch import ModelView


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after it is needed)."""


@contextlib.contextmanager
def capture_mlp_inputs(view: ModelView, layers: Iterable[int], stop_after: int | None = None
                       ) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of each edited matrix (the keys) during a forward pass.

    Yields a dict filled by the hooks: layer -> ``[batch, seq, d_in]``. If ``stop_after`` is
    given, the forward pass is cut off (``StopForward``) once that block has run.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def pre_hook(_mod: Any, args: tuple, layer: int = layer) -> None:
            captured[layer] = args[0]
        handles.append(view.mlp_out(layer).register_forward_pre_hook(pre_hook))
    if stop_after is not None:
        def stop_hook(_mod: Any, _args: Any, _out: Any) -> None:
            raise StopForward
        handles.append(view.blocks[stop_after].register_forward_hook(stop_hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def run_until(model: torch.nn.Module, **inputs: Any) -> None:
    """Run ``model(**inputs)``, swallowing the :class:`StopForward` of an early-exit hook."""
    with contextlib.suppress(StopForward):
        model(**inputs)


@contextlib.contextmanager
def editing_mode(model: torch.nn.Module) -> Iterator[None]:
    """Inside: eval mode (no dropout) and no parameter requires grad; both restored after,
    so editing leaves a model in training exactly as it found it."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        for m, training in modes:
            m.training = training
