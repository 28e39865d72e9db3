"""A cheap, stable identity for a model's weights (for caches and saved edits)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from encore_fast.models.placement import stored_parameters

_SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over architecture, every parameter's name, shape and dtype, and a strided
    sample of its values. Distinguishes different checkpoints and any edit of a sampled row, in
    milliseconds rather than hashing gigabytes."""
    return _fingerprint(model, None)


@torch.no_grad()
def weights_fingerprint(model: nn.Module, precision: torch.dtype = torch.bfloat16) -> str:
    """Like :func:`model_fingerprint`, but blind to the storage dtype: the sampled values are
    rounded to ``precision`` first. An fp32 model and its bf16 copy (``model.to(bfloat16)``)
    get the same value; the statistics cache uses it to find fp32 ``C0`` for a bf16 copy."""
    return _fingerprint(model, precision)


def _fingerprint(model: nn.Module, precision: torch.dtype | None) -> str:
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "vocab_size", "n_embd", "n_layer"):
            h.update(f"{key}={getattr(cfg, key, None)};".encode())
    for name, p in stored_parameters(model):  # (offloaded ones as stored)
        dtype = p.dtype if precision is None else "any"
        h.update(f"{name}:{tuple(p.shape)}:{dtype};".encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu")
        if precision is not None:
            sample = sample.to(precision)
        sample = sample.to(torch.float32).contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
