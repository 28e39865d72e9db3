"""The fast engine's attention over packed rows, and its registration with transformers.

During value optimisation the model's attention modules are routed (by
:func:`packed_attention_mode`) to :func:`packed_attention`, which reads the fixed prefix keys
and values of the batch from a :class:`Fixed` store instead of a KV cache, computes no gradient
for them, and groups query heads by their key/value head instead of repeating the keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from encore_fast.models.arch import ModelView

ATTENTION = "encore_fast_packed"


class Fixed:
    """What :func:`packed_attention` reads and writes besides its arguments, per attention
    module: keys/values to ``record`` (the prefix pass), and the fixed ``prefix`` keys/values
    that this pass's queries also attend to (the steps), ``[b, h_kv, p, hd]`` each."""

    def __init__(self) -> None:
        self.record: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.prefix: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}


# The store that packed_attention reads: set by packed_attention_mode for the duration of a
# with block (in this context only: other threads and tasks see their own value).
_FIXED: ContextVar[Fixed | None] = ContextVar("encore_fast_packed_attention", default=None)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over packed rows (registered as a transformers attention function).

    ``query`` ``[b, h, q, hd]`` and ``key``/``value`` ``[b, h_kv, q, hd]`` are this pass's
    tokens; they also attend to the module's fixed prefix keys/values (``p`` of them, no
    gradient: they are constants). ``attention_mask`` is additive ``[b, 1, q, p + q]``. Query
    heads are grouped by their key/value head instead of repeating the keys.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("the fast engine does not support attention sinks; "
                                  "use engine='reference'")
    fixed = _FIXED.get()
    if fixed is not None and fixed.record is not None:
        fixed.record[module] = (key.detach(), value.detach())
    b, h, q, hd = query.shape
    h_kv = key.shape[1]
    g = h // h_kv
    qg = query.reshape(b, h_kv, g * q, hd)
    scores = qg @ key.transpose(-1, -2)
    pre = fixed.prefix.get(module) if fixed is not None else None
    if pre is not None:
        pre = (pre[0].detach(), pre[1].detach())
        scores = torch.cat([qg @ pre[0].transpose(-1, -2), scores], -1)
    k = scores.shape[-1]
    scores = scores.view(b, h_kv, g, q, k) * (scaling if scaling is not None else hd**-0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, -k:]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs.view(b, h_kv, g * q, k)
    out = probs[..., k - q:] @ value
    if pre is not None:
        out = out + probs[..., : k - q] @ pre[1]
    return out.view(b, h, q, hd).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_attention)


@contextlib.contextmanager
def reading_fixed(fixed: Fixed) -> Iterator[None]:
    """Make :func:`packed_attention` read and write ``fixed`` inside the with block (in this
    context; the store before is restored on exit). Routes no model to it."""
    token = _FIXED.set(fixed)
    try:
        yield
    finally:
        _FIXED.reset(token)


@contextlib.contextmanager
def packed_attention_mode(view: ModelView, fixed: Fixed) -> Iterator[None]:
    """Route the model's attention through :func:`packed_attention`, reading ``fixed``
    (restored on exit)."""
    with reading_fixed(fixed), view.attention_implementation(ATTENTION):
        yield
