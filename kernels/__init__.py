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

import sys as _sys

if __name__ == "kernels":
    # Imported as a top-level ``kernels`` because the repository root is on ``sys.path`` (``python
    # -m`` from a checkout). That name belongs to Hugging Face's ``kernels`` package, which
    # transformers imports; hand the name over to it rather than shadow it.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _others = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _others)
    if _spec is None or _spec.loader is None:
        raise ImportError(
            "no installed package named 'kernels'; this checkout's kernels/ is importable only as "
            "encore_fast.kernels",
            name="kernels",
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
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
