"""Covariance accumulation ``C ← β·C + α·XᵀX`` (a SYRK) and the upper→lower mirror.

Used for the key statistics: ``C0`` over millions of corpus tokens, the running ``S += KKᵀ``,
and (with α = −1) the Woodbury down-date. ``X`` is ``[tokens, d]`` or ``[batch, seq, d]`` with an
attention mask ``[batch, seq]`` (0 = padding) that the kernel applies while loading, so padded
tokens are never gathered into a copy. ``C`` is fp32 ``[d, d]``, updated in place.

The Triton kernel launches one program per *upper* tile ``(i, j), i ≤ j`` of ``C`` (half the
FLOPs of a GEMM) and accumulates over tokens in fp32 with ``tl.dot`` (IEEE fp32 for fp32 inputs,
tensor cores for fp16/bf16). With ``mirror=True`` each tile is also stored transposed into the
lower triangle in the same epilogue; with ``mirror=False`` only the upper triangle (diagonal
included) is written — call :func:`mirror_upper_` once when the statistic is final.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._triton import KernelConfig, TritonKernel, cdiv, tl

__all__ = [
    "covariance_update_",
    "covariance_update_naive",
    "covariance_update_triton",
    "mirror_upper_",
    "mirror_upper_naive",
    "mirror_upper_triton",
]

_KERNEL_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Token rows per chunk in the reference: bounds the fp32 copy of a 16-bit X.
_NAIVE_CHUNK_TOKENS = 8192


# --------------------------------------------------------------------------- Triton kernels


# Long on purpose: one fused Triton kernel body (tile index, the token loop with its padding
# mask, the two epilogues). A Triton kernel can call no ordinary Python helper, only other
# Triton functions, and TritonKernel builds a compiled and an interpreted flavour from this one
# plain function; splitting it would add helpers that need the same double build, and separate
# launches would lose the fusion (each X tile read once, C read and written once).
def _syrk_kernel(
    C_ptr,
    X_ptr,
    M_ptr,
    d,
    n_tokens,
    seq_len,
    stride_cm,
    stride_cn,
    stride_xb,
    stride_xs,
    stride_xd,
    stride_mb,
    stride_ms,
    alpha,
    beta,
    token_bucket,  # autotune key only: log2 of the token count
    HAS_MASK: tl.constexpr,
    BETA_ZERO: tl.constexpr,
    MIRROR: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One upper tile of ``C ← β·C + α·XᵀX``; token t is (t // seq_len, t % seq_len)."""
    # Program id -> upper tile (i, j), i <= j, enumerated column by column (column j holds
    # j + 1 tiles), so neighbouring programs share the column strip of X.
    pid = tl.program_id(0)
    j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2

    rows = i * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < d
    col_ok = cols < d
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        keep = t < n_tokens
        b = t // seq_len
        s = t - b * seq_len
        tok = b.to(tl.int64) * stride_xb + s.to(tl.int64) * stride_xs
        if HAS_MASK:
            m = tl.load(M_ptr + b.to(tl.int64) * stride_mb + s.to(tl.int64) * stride_ms,
                        mask=keep, other=0)
            keep = keep & (m != 0)
        # a: X[tokens, rows]ᵀ as [BLOCK_D, BLOCK_T]; bt: X[tokens, cols] as [BLOCK_T, BLOCK_D].
        a = tl.load(X_ptr + rows64[:, None] * stride_xd + tok[None, :],
                    mask=row_ok[:, None] & keep[None, :], other=0.0)
        bt = tl.load(X_ptr + tok[:, None] + cols64[None, :] * stride_xd,
                     mask=keep[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)

    acc = acc * alpha
    in_c = row_ok[:, None] & col_ok[None, :]
    c_ptrs = C_ptr + rows64[:, None] * stride_cm + cols64[None, :] * stride_cn
    ct_ptrs = C_ptr + cols64[None, :] * stride_cm + rows64[:, None] * stride_cn
    # Two epilogues so that off-diagonal tiles (all but ~1/nb of them) keep masks that are
    # uniform along rows and vectorise; only diagonal tiles need the triangular masks.
    if i == j:
        upper = in_c & (rows[:, None] <= cols[None, :])
        if not BETA_ZERO:  # β = 0 means overwrite: C is never read (NaN cannot propagate)
            acc += beta * tl.load(c_ptrs, mask=upper, other=0.0)
        tl.store(c_ptrs, acc, mask=upper)
        if MIRROR:  # strict upper half, transposed: disjoint from the store above
            tl.store(ct_ptrs, acc, mask=in_c & (rows[:, None] < cols[None, :]))
    else:
        if not BETA_ZERO:
            acc += beta * tl.load(c_ptrs, mask=in_c, other=0.0)
        tl.store(c_ptrs, acc, mask=in_c)
        if MIRROR:
            tl.store(ct_ptrs, acc, mask=in_c)


def _mirror_kernel(C_ptr, d, stride_cm, stride_cn, BLOCK_D: tl.constexpr):
    """Copy the strict upper part of one upper tile of C onto its transposed position."""
    pid = tl.program_id(0)
    j = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2

    rows = i * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = j * BLOCK_D + tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    src = C_ptr + rows64[:, None] * stride_cm + cols64[None, :] * stride_cn
    dst = C_ptr + cols64[None, :] * stride_cm + rows64[:, None] * stride_cn
    if i == j:
        strict_upper = (rows[:, None] < cols[None, :]) & (cols[None, :] < d)
        tl.store(dst, tl.load(src, mask=strict_upper), mask=strict_upper)
    else:
        in_c = (rows[:, None] < d) & (cols[None, :] < d)
        tl.store(dst, tl.load(src, mask=in_c), mask=in_c)


SYRK_KERNEL = TritonKernel(
    _syrk_kernel,
    configs=(
        KernelConfig({"BLOCK_D": 128, "BLOCK_T": 64}, num_warps=8, num_stages=3),
        KernelConfig({"BLOCK_D": 128, "BLOCK_T": 32}, num_warps=4, num_stages=4),
        KernelConfig({"BLOCK_D": 64, "BLOCK_T": 64}, num_warps=4, num_stages=4),
        KernelConfig({"BLOCK_D": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3),
    ),
    interpret_config={"BLOCK_D": 32, "BLOCK_T": 32},
    key=("d", "token_bucket", "HAS_MASK", "BETA_ZERO", "MIRROR"),
    restore_value=("C_ptr",),
)

MIRROR_KERNEL = TritonKernel(
    _mirror_kernel,
    configs=(KernelConfig({"BLOCK_D": 64}, num_warps=4, num_stages=1),),
    interpret_config={"BLOCK_D": 32},
)


def _n_upper_tiles(d: int, block: int) -> int:
    nb = cdiv(d, block)
    return nb * (nb + 1) // 2


def _as_batched(
    X: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """View X as [batch, seq, d] and the mask as [batch, seq] (no copies)."""
    X3 = X.unsqueeze(0) if X.dim() == 2 else X
    if mask is None:
        return X3, None
    M2 = mask.unsqueeze(0) if mask.dim() == 1 else mask
    if M2.dtype == torch.bool:
        M2 = M2.view(torch.uint8)
    return X3, M2


def covariance_update_triton(
    C: torch.Tensor,
    X: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    mask: torch.Tensor | None = None,
    mirror: bool = True,
    interpret: bool = False,
) -> torch.Tensor:
    """Launch the SYRK kernel (inputs already validated; see :func:`covariance_update_`)."""
    X3, M2 = _as_batched(X, mask)
    batch, seq, d = X3.shape
    n_tokens = batch * seq
    if d == 0:
        return C
    precision = "ieee" if X3.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit

    def grid(meta: dict) -> tuple[int]:
        return (_n_upper_tiles(d, meta["BLOCK_D"]),)

    SYRK_KERNEL.launch(
        grid,
        C, X3, M2 if M2 is not None else X3,
        d, n_tokens, max(seq, 1),
        C.stride(0), C.stride(1),
        X3.stride(0), X3.stride(1), X3.stride(2),
        M2.stride(0) if M2 is not None else 0, M2.stride(1) if M2 is not None else 0,
        float(alpha), float(beta),
        max(n_tokens, 1).bit_length(),
        HAS_MASK=M2 is not None,
        BETA_ZERO=beta == 0,
        MIRROR=bool(mirror),
        INPUT_PRECISION=precision,
        interpret=interpret,
        device=C.device,
    )
    return C


def mirror_upper_triton(C: torch.Tensor, *, interpret: bool = False) -> torch.Tensor:
    """Launch the mirror kernel: ``C[j, i] = C[i, j]`` for ``i < j``."""
    d = C.shape[0]
    if d > 1:
        MIRROR_KERNEL.launch(
            lambda meta: (_n_upper_tiles(d, meta["BLOCK_D"]),),
            C, d, C.stride(0), C.stride(1),
            interpret=interpret,
            device=C.device,
        )
    return C


# --------------------------------------------------------------------------- references


def covariance_update_naive(
    C: torch.Tensor,
    X: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    mask: torch.Tensor | None = None,
    mirror: bool = True,
) -> torch.Tensor:
    """PyTorch reference: ``addmm_`` in C's dtype on the kept rows, in token chunks.

    Production path on CPU. The masked rows are gathered (a copy; fine here). It computes the
    full product, so both triangles are always valid and ``mirror`` has nothing to do (they
    agree to rounding; :func:`mirror_upper_` makes them bitwise equal if that matters).
    """
    del mirror  # the full GEMM already fills the lower triangle
    d = C.shape[0]
    rows = X.reshape(-1, d) if mask is None else X[mask != 0]
    chunks = rows.split(_NAIVE_CHUNK_TOKENS) if rows.shape[0] else ()
    if not chunks:  # no tokens: C ← β·C (β = 0 overwrites, never reads C)
        return C.zero_() if beta == 0 else C.mul_(beta)
    for k, chunk in enumerate(chunks):
        xc = chunk.to(C.dtype)
        C.addmm_(xc.mT, xc, beta=beta if k == 0 else 1.0, alpha=alpha)
    return C


def mirror_upper_naive(C: torch.Tensor, block: int = 512) -> torch.Tensor:
    """PyTorch reference of :func:`mirror_upper_`: block by block, so each transposed copy
    stays in cache and nothing d × d is allocated."""
    d = C.shape[0]
    for i0 in range(0, d, block):
        i1 = min(i0 + block, d)
        diag = C[i0:i1, i0:i1]
        diag.copy_(torch.triu(diag).add_(torch.triu(diag, 1).mT))
        if i1 < d:
            C[i1:, i0:i1].copy_(C[i0:i1, i1:].mT)
    return C


# --------------------------------------------------------------------------- public API


def _check_inputs(C: torch.Tensor, X: torch.Tensor, mask: torch.Tensor | None) -> None:
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square [d, d], got {tuple(C.shape)}")
    if not C.is_floating_point():
        raise TypeError(f"C must be a floating tensor, got {C.dtype}")
    if X.dim() not in (2, 3) or X.shape[-1] != C.shape[0]:
        raise ValueError(f"X must be [tokens, d] or [batch, seq, d] with d={C.shape[0]}, "
                         f"got {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"X must be a floating tensor, got {X.dtype}")
    if X.device != C.device:
        raise ValueError(f"C and X are on different devices ({C.device}, {X.device})")
    if mask is not None:
        if tuple(mask.shape) != tuple(X.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(X.shape[:-1])}, "
                             f"got {tuple(mask.shape)}")
        if mask.device != X.device:
            raise ValueError("mask and X are on different devices")


@torch.no_grad()
def covariance_update_(
    C: torch.Tensor,
    X: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    mask: torch.Tensor | None = None,
    mirror: bool = True,
) -> torch.Tensor:
    """In place ``C ← β·C + α·XᵀX`` over the tokens of X whose mask is nonzero; returns C.

    ``C``: ``[d, d]`` fp32 (other float dtypes run the reference). ``X``: ``[tokens, d]`` or
    ``[batch, seq, d]`` in fp32/fp16/bf16; ``mask``: ``X.shape[:-1]``, any dtype, 0 = skip.
    ``beta == 0`` overwrites C without reading it. ``alpha`` may be negative (down-dates).
    ``mirror=False`` guarantees only the upper triangle (with the diagonal); the strict lower
    part may be stale until :func:`mirror_upper_`.
    """
    _check_inputs(C, X, mask)
    supported = (
        C.dtype == torch.float32
        and X.dtype in _KERNEL_X_DTYPES
        and dispatch.dot_dtype_ok(X.dtype, X.device)
    )
    extra = (mask,) if mask is not None else ()
    backend = dispatch.select_backend("covariance_update", C, X, *extra, supported=supported)
    if backend == "torch":
        return covariance_update_naive(C, X, alpha=alpha, beta=beta, mask=mask, mirror=mirror)
    return covariance_update_triton(C, X, alpha=alpha, beta=beta, mask=mask, mirror=mirror,
                                    interpret=backend == "interpret")


@torch.no_grad()
def mirror_upper_(C: torch.Tensor) -> torch.Tensor:
    """In place ``C[j, i] ← C[i, j]`` for ``i < j`` (finalise a ``mirror=False`` statistic)."""
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be square [d, d], got {tuple(C.shape)}")
    backend = dispatch.select_backend("mirror_upper", C, supported=C.dtype == torch.float32)
    if backend == "torch":
        return mirror_upper_naive(C)
    return mirror_upper_triton(C, interpret=backend == "interpret")
