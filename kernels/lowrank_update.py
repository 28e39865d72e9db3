"""Low-rank weight update ``W ← W + α·U Vᵀ`` in W's own dtype, with its norms from the same pass.

The edit of one layer is rank ``n`` (batch size, ≤ a few hundred), so the update is
memory-bound: its floor is one read and one write of W. The Triton kernel tiles W, forms
``α·U Vᵀ`` for its tile in fp32 from r-chunks of U and V (any r: the loop over r handles
r > BLOCK_R and tails), adds it in fp32, rounds once to W's dtype, stores, and writes per-program
partial sums of squares of the *stored* values and of the fp32 update to a small buffer. The
sums are reduced afterwards, giving ``‖W_new‖_F`` and ``‖α U Vᵀ‖_F`` — the norm-growth
diagnostics ENCORE tracks — with no second pass over W.

GPT-2's Conv1D stores its weight transposed (``[d_in, d_out]``): ``transposed=True`` applies
``W += α V Uᵀ`` — the same kernel with the two factors swapped.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._triton import KernelConfig, TritonKernel, cdiv, tl

__all__ = [
    "apply_lowrank_update_",
    "apply_lowrank_update_naive",
    "apply_lowrank_update_triton",
]

_KERNEL_W_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FACTOR_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- Triton kernel


# Long on purpose: one fused Triton kernel body (tile index, the rank-r product, the add to W,
# the optional 16-bit copy, the partial norms). A Triton kernel can call no ordinary Python
# helper, only other Triton functions, and TritonKernel builds a compiled and an interpreted
# flavour from this one plain function; splitting it would add helpers that need the same double
# build, and separate launches would lose the fusion (W read and written once, no Δ in memory).
def _lowrank_update_kernel(
    W_ptr,
    A_ptr,
    B_ptr,
    P_ptr,
    O_ptr,
    M,
    N,
    R,
    stride_wm,
    stride_wn,
    stride_am,
    stride_ar,
    stride_bn,
    stride_br,
    stride_om,
    stride_on,
    alpha,
    r_bucket,  # autotune key only: log2 of the rank
    INPUT_PRECISION: tl.constexpr,
    HAS_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One tile of ``W[m, n] += α Σ_r A[m, r] B[n, r]``; partial ‖W_new‖², ‖Δ‖² to P[pid].
    ``HAS_OUT``: also store the new tile rounded to O's dtype (the model's 16-bit copy of an
    fp32 master W), in the same pass."""
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_col_tiles  # row-major over W: consecutive programs stream along a row
    pid_n = pid - pid_m * n_col_tiles

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rk = r0 + tl.arange(0, BLOCK_R)
        r_ok = rk < R
        a = tl.load(A_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ar,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(B_ptr + rk[:, None] * stride_br + rn64[None, :] * stride_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, bt, acc, input_precision=INPUT_PRECISION)
    delta = acc * alpha  # zero outside W (masked factor rows)

    in_w = m_ok[:, None] & n_ok[None, :]
    w_ptrs = W_ptr + rm64[:, None] * stride_wm + rn64[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=in_w, other=0.0)
    new = (w.to(tl.float32) + delta).to(W_ptr.dtype.element_ty)
    tl.store(w_ptrs, new, mask=in_w)
    if HAS_OUT:
        o_ptrs = O_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on
        tl.store(o_ptrs, new.to(O_ptr.dtype.element_ty), mask=in_w)

    stored = new.to(tl.float32)  # the norm is of what W now holds, after rounding
    tl.store(P_ptr + 2 * pid, tl.sum(tl.sum(stored * stored, axis=1), axis=0))
    tl.store(P_ptr + 2 * pid + 1, tl.sum(tl.sum(delta * delta, axis=1), axis=0))


LOWRANK_UPDATE_KERNEL = TritonKernel(
    _lowrank_update_kernel,
    configs=(
        KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=8, num_stages=3),
        KernelConfig({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_R": 32}, num_warps=4, num_stages=3),
        KernelConfig({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_R": 64}, num_warps=4, num_stages=3),
        KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 64}, num_warps=4, num_stages=2),
    ),
    interpret_config={"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 16},
    key=("M", "N", "r_bucket"),
    restore_value=("W_ptr", "O_ptr"),
    reset_to_zero=("P_ptr",),
)


def _factor_dtype(U: torch.Tensor, V: torch.Tensor) -> torch.dtype:
    """Keep matching 16-bit factors (exact products, fp32 accumulation); else fp32."""
    if U.dtype == V.dtype and U.dtype in (torch.float16, torch.bfloat16):
        return U.dtype
    return torch.float32


def apply_lowrank_update_triton(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    alpha: float = 1.0,
    transposed: bool = False,
    out: torch.Tensor | None = None,
    interpret: bool = False,
) -> tuple[float, float]:
    """Launch the update kernel (inputs already validated; see :func:`apply_lowrank_update_`)."""
    A, B = (V, U) if transposed else (U, V)
    M, N = W.shape
    R = A.shape[1]
    if W.numel() == 0:
        return 0.0, 0.0
    fdt = _factor_dtype(A, B)
    A, B = A.to(fdt), B.to(fdt)
    if fdt != torch.float32:
        precision = "tf32"  # ignored for 16-bit operands
    elif W.dtype == torch.float32 or interpret or torch.version.hip is not None:
        precision = "ieee"  # fp32 result: full fp32 products (and no tf32x3 on ROCm)
    else:
        # 16-bit W: three-pass tf32 (≈ fp32 accuracy, far below W's own rounding) keeps the
        # kernel on tensor cores, so it stays memory-bound at r ≈ 100.
        precision = "tf32x3"
    metas = LOWRANK_UPDATE_KERNEL.metas(interpret)
    n_slots = max(cdiv(M, m["BLOCK_M"]) * cdiv(N, m["BLOCK_N"]) for m in metas)
    partial = torch.zeros(n_slots, 2, dtype=torch.float32, device=W.device)

    def grid(meta: dict) -> tuple[int]:
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    O = W if out is None else out  # never written without HAS_OUT
    LOWRANK_UPDATE_KERNEL.launch(
        grid,
        W, A, B, partial, O,
        M, N, R,
        W.stride(0), W.stride(1),
        A.stride(0), A.stride(1),
        B.stride(0), B.stride(1),
        O.stride(0), O.stride(1),
        float(alpha),
        max(R, 1).bit_length(),
        INPUT_PRECISION=precision,
        HAS_OUT=out is not None,
        interpret=interpret,
        device=W.device,
    )
    w_sq, d_sq = partial.double().sum(0).tolist()
    return w_sq**0.5, d_sq**0.5


# --------------------------------------------------------------------------- reference


def apply_lowrank_update_naive(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    alpha: float = 1.0,
    transposed: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[float, float]:
    """PyTorch reference: ``addmm_`` in fp32 (fp64 for an fp64 W), norms afterwards; ``out``
    (if given) receives the new W rounded to its dtype.

    ``‖α U Vᵀ‖_F`` comes from the r×r Gram matrices in fp64 (``Σ (UᵀU) ∘ (VᵀV)``), so Δ is
    never materialised on its own. Production path on CPU.
    """
    A, B = (V, U) if transposed else (U, V)
    compute = torch.promote_types(W.dtype, torch.float32)
    A, B = A.to(compute), B.to(compute)
    if W.dtype == compute:
        W.addmm_(A, B.mT, alpha=alpha)
        w_norm = torch.linalg.vector_norm(W)
    else:
        work = W.to(compute)
        work.addmm_(A, B.mT, alpha=alpha)
        W.copy_(work)
        work.copy_(W)  # the values W actually holds, after rounding
        w_norm = torch.linalg.vector_norm(work)
    if out is not None:
        out.copy_(W)
    gram = (A.double().mT @ A.double()) * (B.double().mT @ B.double())
    d_sq = gram.sum().clamp_min(0.0)
    return float(w_norm), abs(float(alpha)) * float(d_sq.sqrt())


# --------------------------------------------------------------------------- public API


def _check_out(W: torch.Tensor, out: torch.Tensor | None) -> None:
    if out is None:
        return
    if tuple(out.shape) != tuple(W.shape) or out.device != W.device:
        raise ValueError(f"out {tuple(out.shape)} on {out.device} must match W "
                         f"{tuple(W.shape)} on {W.device}")
    if not out.is_floating_point():
        raise TypeError("out must be a floating tensor")
    if out.data_ptr() == W.data_ptr():
        raise ValueError("out must not be W itself")


def _check_inputs(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor, transposed: bool) -> None:
    if W.dim() != 2 or U.dim() != 2 or V.dim() != 2:
        raise ValueError("W, U and V must be 2-D")
    if U.shape[1] != V.shape[1]:
        raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} must share the rank r")
    want = (V.shape[0], U.shape[0]) if transposed else (U.shape[0], V.shape[0])
    if tuple(W.shape) != want:
        layout = "[d_in, d_out]" if transposed else "[d_out, d_in]"
        raise ValueError(f"W must be {layout} = {want}, got {tuple(W.shape)}")
    if not (W.is_floating_point() and U.is_floating_point() and V.is_floating_point()):
        raise TypeError("W, U and V must be floating tensors")
    if not (W.device == U.device == V.device):
        raise ValueError(f"W, U, V are on different devices ({W.device}, {U.device}, {V.device})")


@torch.no_grad()
def apply_lowrank_update_(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    *,
    alpha: float = 1.0,
    transposed: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[float, float]:
    """In place ``W ← W + α·U Vᵀ`` (``W += α·V Uᵀ`` if ``transposed``); returns two floats.

    ``U``: ``[d_out, r]``, ``V``: ``[d_in, r]``; ``W``: ``[d_out, d_in]``, or ``[d_in, d_out]``
    with ``transposed=True`` (GPT-2 Conv1D). W keeps its dtype (fp32/fp16/bf16); the math is
    fp32 and W is rounded once. ``out``: a tensor of W's shape (the model's 16-bit weight when
    W is its fp32 master copy) that receives the new W rounded to-nearest to its own dtype, in
    the same pass. Returns ``(‖W_new‖_F, ‖α U Vᵀ‖_F)`` as Python floats (this synchronises
    with the GPU), the first of the values stored in W. Works on parameters (``no_grad``).
    """
    _check_inputs(W, U, V, transposed)
    _check_out(W, out)
    supported = (
        (out is None or (out.dtype in _KERNEL_W_DTYPES
                         and dispatch.dot_dtype_ok(out.dtype, out.device)))
        and W.dtype in _KERNEL_W_DTYPES
        and U.dtype in _FACTOR_DTYPES
        and V.dtype in _FACTOR_DTYPES
        and dispatch.dot_dtype_ok(W.dtype, W.device)
        and dispatch.dot_dtype_ok(_factor_dtype(U, V), W.device)
    )
    backend = dispatch.select_backend("lowrank_update", W, U, V, supported=supported)
    if backend == "torch":
        return apply_lowrank_update_naive(W, U, V, alpha=alpha, transposed=transposed, out=out)
    return apply_lowrank_update_triton(W, U, V, alpha=alpha, transposed=transposed, out=out,
                                       interpret=backend == "interpret")
