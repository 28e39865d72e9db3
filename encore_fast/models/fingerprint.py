"""A cheap, stable identity for a model's weights (for caches and saved edits)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

_SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) over architecture, every parameter's name and shape, and a strided sample
    of its values. Distinguishes different checkpoints and any edit of a sampled row, in
    milliseconds rather than hashing gigabytes."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "vocab_size", "n_embd", "n_layer"):
            h.update(f"{key}={getattr(cfg, key, None)};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32).contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
