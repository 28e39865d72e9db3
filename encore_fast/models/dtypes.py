"""Dtype names as users type them (``fp32``, ``bf16``, ``fp16``): the one table of them."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; an unknown name is a ValueError naming the choices."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def short_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the name of :data:`DTYPES`; else torch's own)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")
