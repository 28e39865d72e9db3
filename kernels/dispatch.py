"""Backend choice for every op in ``encore_fast.kernels``: Triton, Triton's interpreter, or torch.

The backend comes from, in order: a :func:`use_backend` block (tests, benchmarks), then the
environment variable ``ENCORE_FAST_KERNELS`` read at each call:

``auto`` (default)
    compiled Triton when every tensor is on CUDA and Triton is installed; otherwise the
    PyTorch reference (the production path on CPU).
``triton``
    the Triton kernels everywhere: compiled on CUDA tensors, Triton's interpreter on CPU tensors.
``interpret``
    the Triton kernels under the interpreter, whatever the device (slow; for tests).
``torch``
    the PyTorch reference everywhere.

The interpreter is built per kernel (see ``_triton.py``), so none of this needs
``TRITON_INTERPRET=1`` or any import order. If the user does set ``TRITON_INTERPRET=1``, Triton
launches are interpreted as Triton itself would do. Without Triton, or for inputs a kernel does
not cover (e.g. a float64 ``C``), the reference runs. What ran is recorded:
:func:`last_backend` and :func:`backend_counts`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from . import _triton

ENV_VAR = "ENCORE_FAST_KERNELS"
BACKENDS = ("auto", "triton", "interpret", "torch")

_override: ContextVar[str | None] = ContextVar("encore_fast_kernels_backend", default=None)
_last: dict[str, str] = {}
_counts: Counter[tuple[str, str]] = Counter()
_warned: set[str] = set()


def _check(name: str) -> str:
    value = name.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {name!r}")
    return value


def requested_backend() -> str:
    """The backend asked for: a :func:`use_backend` block, else ``$ENCORE_FAST_KERNELS``."""
    override = _override.get()
    if override is not None:
        return override
    return _check(os.environ.get(ENV_VAR, "auto"))


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend (``auto|triton|interpret|torch``) inside a ``with`` block."""
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


def has_triton() -> bool:
    """Whether Triton could be imported."""
    return _triton.HAS_TRITON


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def select_backend(op: str, *tensors: torch.Tensor, supported: bool = True) -> str:
    """Pick ``"triton"``, ``"interpret"`` or ``"torch"`` for one call of ``op`` and record it.

    ``supported`` says whether the Triton kernel covers these inputs (dtypes, layouts).
    """
    requested = requested_backend()
    if requested == "torch" or not supported:
        backend = "torch"
    elif not has_triton():
        if requested != "auto":
            _warn_once(f"{ENV_VAR}={requested} but Triton is not importable; using torch")
        backend = "torch"
    elif requested == "interpret":
        backend = "interpret"
    elif all(t.is_cuda for t in tensors):
        backend = "interpret" if _triton.env_interpret() else "triton"
    elif requested == "triton":
        backend = "interpret"
    else:
        backend = "torch"
    _last[op] = backend
    _counts[(op, backend)] += 1
    return backend


def dot_dtype_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether Triton's ``tl.dot`` takes ``dtype`` on ``device`` (bf16 needs sm_80+ on NVIDIA)."""
    if dtype == torch.bfloat16 and device.type == "cuda" and torch.version.hip is None:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return True


def last_backend(op: str) -> str | None:
    """The backend the last call of ``op`` ran on (None if it never ran)."""
    return _last.get(op)


def backend_counts() -> dict[tuple[str, str], int]:
    """How many calls ran on each backend, keyed by ``(op, backend)``."""
    return dict(_counts)
