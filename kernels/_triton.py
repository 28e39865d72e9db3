"""Optional Triton import, and a kernel holder with a compiled and an interpreted flavour.

Triton decides at decoration time (``triton.jit``) whether a kernel is compiled or interpreted,
from ``TRITON_INTERPRET``. That would tie the whole process to one mode, so kernels here are
plain Python functions wrapped in :class:`TritonKernel`, which builds both flavours lazily:

* ``compiled`` — ``triton.jit`` (plus ``triton.autotune`` on CUDA), for GPU tensors;
* ``interpreted`` — Triton's interpreter, which runs the same kernel body on CPU tensors with
  NumPy. It is what the tests use, and it needs no environment variable: the rest of a process
  (other tests, other Triton users) keeps compiling normally. Triton's own library functions
  (``tl.zeros``, ``tl.sum``, ...) were built as compiled ``JITFunction``s when Triton was
  imported, so for the duration of an interpreted launch :func:`_interpreted_language` makes
  calling them run an interpreted twin instead.

When Triton is not importable, ``HAS_TRITON`` is False, ``tl`` is a stub that only lets the
kernel modules be imported, and every op runs its PyTorch reference instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

try:  # Triton is an optional dependency (extra "triton").
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install (missing driver libraries, ...)
    triton = None

    class _LanguageStub:
        """Stand-in for ``triton.language`` so kernel annotations evaluate without Triton."""

        constexpr = "constexpr"

    tl = _LanguageStub()  # type: ignore[assignment]
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "KernelConfig", "TritonKernel", "env_interpret", "tl", "triton"]


def env_interpret() -> bool:
    """True when the user asked Triton itself to interpret every kernel (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: meta-parameters (block sizes) plus warps and pipeline stages."""

    meta: dict[str, int]
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class TritonKernel:
    """A Triton kernel body with lazily built compiled (autotuned) and interpreted launchers.

    ``configs`` is the CUDA autotune list; ``interpret_config`` the single configuration used
    under the interpreter (which cannot autotune). Tests may change ``interpret_config`` to get
    more, smaller tiles out of small inputs.
    """

    fn: Callable[..., Any]
    configs: Sequence[KernelConfig]
    interpret_config: dict[str, int]
    key: Sequence[str] = ()
    restore_value: Sequence[str] = ()
    reset_to_zero: Sequence[str] = ()
    _compiled: Any = field(default=None, init=False, repr=False)
    _interpreted: Any = field(default=None, init=False, repr=False)

    @property
    def compiled(self) -> Any:
        """The ``triton.jit`` kernel, wrapped in ``triton.autotune`` when several configs exist."""
        if self._compiled is None:
            jitted = triton.jit(self.fn)
            configs = [
                triton.Config(dict(c.meta), num_warps=c.num_warps, num_stages=c.num_stages)
                for c in self.configs
            ]
            self._compiled = triton.autotune(
                configs=configs,
                key=list(self.key),
                restore_value=list(self.restore_value) or None,
                reset_to_zero=list(self.reset_to_zero) or None,
            )(jitted)
        return self._compiled

    @property
    def interpreted(self) -> Any:
        """The kernel under Triton's interpreter (runs on CPU tensors, one config)."""
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def metas(self, interpret: bool) -> list[dict[str, int]]:
        """Every meta-parameter dict a launch may use (to size per-program buffers)."""
        if interpret or env_interpret():
            return [dict(self.interpret_config)]
        return [dict(c.meta) for c in self.configs]

    def launch(
        self,
        grid: Callable[[dict[str, Any]], tuple[int, ...]],
        *args: Any,
        interpret: bool,
        device: torch.device,
        **kwargs: Any,
    ) -> None:
        """Launch over ``grid(meta)`` programs, interpreted (CPU) or compiled on ``device``."""
        if interpret or env_interpret():
            with _interpreted_language():
                self.interpreted[grid](*args, **kwargs, **self.interpret_config)
        else:
            # On the tensors' GPU (not merely the current one); FMA contraction stated
            # explicitly (Triton 3.9's default, which 3.10 is announced to flip).
            with torch.cuda.device(device):
                self.compiled[grid](*args, **kwargs, enable_fp_fusion=True)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids."""
    return -(-a // b)


_INTERPRETED_TWINS: dict[int, tuple[Any, Any]] = {}


@contextmanager
def _interpreted_language() -> Iterator[None]:
    """Let interpreted kernels call Triton's library jit functions (``tl.zeros``, ``tl.sum``).

    With ``TRITON_INTERPRET=1`` at import time Triton builds those as interpreted functions;
    here they are compiled-mode ``JITFunction`` objects, whose ``__call__`` refuses to run
    outside a kernel. For the duration of one interpreted launch, ``JITFunction.__call__``
    runs the same body interpreted instead. Identities are untouched (the interpreter compares
    ``combine_fn is tl.standard._sum_combine`` to pick its NumPy sum), and every patch of
    ``triton.language`` made for such a call is undone when it returns, so compiled kernels
    built later in the process are unaffected.
    """
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    def call_interpreted(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = _INTERPRETED_TWINS.get(id(self))
        if entry is None or entry[0] is not self:
            entry = _INTERPRETED_TWINS[id(self)] = (self, interpreter.InterpretedFunction(self.fn))
        scope = interpreter._patch_lang(self.fn)  # the callee's module (tl.core) may be unpatched
        try:
            return entry[1].rewrite()(*args, **kwargs)
        finally:
            if scope is not None:
                scope.restore()

    original = JITFunction.__call__
    JITFunction.__call__ = call_interpreted  # type: ignore[method-assign]
    try:
        yield
    finally:
        JITFunction.__call__ = original  # type: ignore[method-assign]
