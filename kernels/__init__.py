"""Triton kernels for encore_fast (installed as ``encore_fast.kernels``).

Two ops, each with its Triton kernel, launcher and PyTorch reference in its own module:

* :func:`covariance_update_` / :func:`mirror_upper_` (``covariance.py``):
  ``C ← β·C + α·XᵀX`` over the unmasked tokens, upper tiles only, fp32 accumulation.
* :func:`apply_lowrank_update_` (``lowrank_update.py``): ``W ← W + α·U Vᵀ`` in W's dtype,
  returning ``(‖W_new‖_F, ‖α U Vᵀ‖_F)`` from the same pass.

``dispatch.py`` picks the backend per call: compiled Triton on CUDA tensors, the PyTorch
reference on CPU tensors, overridable with ``ENCORE_FAST_KERNELS=auto|triton|interpret|torch``
or :func:`use_backend`. Triton is optional; without it every op runs its reference.
"""

from .covariance import covariance_update_, mirror_upper_
from .dispatch import (
    backend_counts,
    has_triton,
    last_backend,
    requested_backend,
    select_backend,
    use_backend,
)
from .lowrank_update import apply_lowrank_update_

__all__ = [
    "apply_lowrank_update_",
    "backend_counts",
    "covariance_update_",
    "has_triton",
    "last_backend",
    "mirror_upper_",
    "requested_backend",
    "select_backend",
    "use_backend",
]
