"""The compiled (GPU) path, checked on a machine without a GPU.

1. The kernels compile for a Hopper GPU (sm_90). No GPU is needed: ``triton.compile`` with an
explicit ``GPUTarget`` runs the whole pipeline (TTIR → TTGIR → LLVM → PTX → ptxas). Arguments
are specialised the way a launch on contiguous Llama3-8B-sized tensors would be (unit strides
become constants, sizes and pointers 16-divisible), so the PTX shows the real instruction mix:
``wgmma`` for 16-bit and tf32x3 dots, ``cp.async`` pipelining, vectorised W and C accesses.
One autotune config per case keeps this to a few seconds.

2. The autotuned launch path (``triton.autotune`` with ``restore_value``/``reset_to_zero``, the
grid from each config's meta-parameters, launch options) runs end to end, with only the final
``JITFunction.run`` swapped for the interpreter and the GPU timer for a fake one: several
configs are "benchmarked" on the real in-place tensors, so a missing restore or reset shows up
as a wrong result.
"""

from __future__ import annotations

import contextlib
import itertools
import re

import pytest
import torch

from encore_fast import kernels as K

cov_mod, lr_mod = K.covariance, K.lowrank_update

pytestmark = [
    pytest.mark.skipif(not K.has_triton(), reason="Triton is not installed"),
    pytest.mark.skipif(K._triton.env_interpret(), reason="TRITON_INTERPRET=1: no compiled mode"),
]


def _compile_sm90(kernel, args: dict, constexprs: dict, config) -> tuple[str, int]:
    """Compile ``kernel`` for sm_90 with launch-like specialisation; return (PTX, shared bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(kernel.fn)
    signature, consts, attrs = {}, {**constexprs, **config.meta}, {}
    for index, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):  # a pointer type such as "*bf16"
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton turns integer arguments equal to 1 into constants
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, consts, attrs),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                     "enable_fp_fusion": True},
        )
    except FileNotFoundError as err:  # a Triton build without its bundled ptxas
        pytest.skip(f"no CUDA toolchain to compile with: {err}")
    return compiled.asm["ptx"], compiled.metadata.shared


H100_SHARED = 227 * 1024


@pytest.mark.parametrize(
    "x_dtype,precision,has_mask",
    [("bf16", "tf32", False), ("fp16", "tf32", True), ("fp32", "ieee", True)],
)
def test_syrk_compiles_for_sm90(x_dtype, precision, has_mask):
    d, seq = 14336, 1024
    args = dict(C_ptr="*fp32", X_ptr=f"*{x_dtype}", M_ptr="*u8", d=d, n_tokens=16 * seq,
                seq_len=seq, stride_cm=d, stride_cn=1, stride_xb=seq * d, stride_xs=d,
                stride_xd=1, stride_mb=seq, stride_ms=1, alpha=1.0, beta=1.0, token_bucket=15)
    configs = cov_mod.SYRK_KERNEL.configs
    config = configs[0] if x_dtype != "fp32" else configs[-1]
    ptx, shared = _compile_sm90(
        cov_mod.SYRK_KERNEL, args,
        {"HAS_MASK": has_mask, "BETA_ZERO": False, "MIRROR": True, "INPUT_PRECISION": precision},
        config,
    )
    assert shared <= H100_SHARED
    assert "cp.async" in ptx  # token blocks are pipelined
    assert "st.global.v4" in ptx  # off-diagonal C tiles are stored vectorised
    if x_dtype != "fp32":
        ptx_type = {"bf16": "bf16", "fp16": "f16"}[x_dtype]
        assert re.search(rf"wgmma\.mma_async\S*\.{ptx_type}\.{ptx_type}", ptx)


def test_mirror_compiles_for_sm90():
    args = dict(C_ptr="*fp32", d=14336, stride_cm=14336, stride_cn=1)
    ptx, shared = _compile_sm90(cov_mod.MIRROR_KERNEL, args, {}, cov_mod.MIRROR_KERNEL.configs[0])
    assert shared <= H100_SHARED and "st.global.v4" in ptx


@pytest.mark.parametrize(
    "w_dtype,f_dtype,precision",
    [("bf16", "fp32", "tf32x3"), ("fp32", "fp32", "ieee"), ("fp16", "bf16", "tf32")],
)
def test_lowrank_update_compiles_for_sm90(w_dtype, f_dtype, precision):
    args = dict(W_ptr=f"*{w_dtype}", A_ptr=f"*{f_dtype}", B_ptr=f"*{f_dtype}", P_ptr="*fp32",
                O_ptr=f"*{w_dtype}", M=4096, N=14336, R=100, stride_wm=14336, stride_wn=1,
                stride_am=100, stride_ar=1, stride_bn=100, stride_br=1, stride_om=14336,
                stride_on=1, alpha=1.0, r_bucket=7)
    kernel = lr_mod.LOWRANK_UPDATE_KERNEL
    ptx, shared = _compile_sm90(kernel, args, {"INPUT_PRECISION": precision, "HAS_OUT": False},
                                kernel.configs[0])
    assert shared <= H100_SHARED
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx  # one vectorised pass over W
    if precision != "ieee":
        assert "wgmma.mma_async" in ptx


@pytest.mark.parametrize("out_dtype", ["bf16", "fp16"])
def test_lowrank_update_with_master_compiles_for_sm90(out_dtype):
    """fp32 master + 16-bit model copy: one pass, both stored vectorised."""
    args = dict(W_ptr="*fp32", A_ptr="*fp32", B_ptr="*fp32", P_ptr="*fp32",
                O_ptr=f"*{out_dtype}", M=4096, N=14336, R=100, stride_wm=14336, stride_wn=1,
                stride_am=100, stride_ar=1, stride_bn=100, stride_br=1, stride_om=14336,
                stride_on=1, alpha=1.0, r_bucket=7)
    kernel = lr_mod.LOWRANK_UPDATE_KERNEL
    ptx, shared = _compile_sm90(kernel, args, {"INPUT_PRECISION": "tf32x3", "HAS_OUT": True},
                                kernel.configs[0])
    assert shared <= H100_SHARED
    assert "ld.global.v4" in ptx and ptx.count("st.global.v4") >= 2  # master and copy
    assert "wgmma.mma_async" in ptx


def _simulated_autotuned(kernel, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Fresh autotuned launcher whose GPU launches run interpreted; returns the launch log."""
    from triton.runtime.interpreter import InterpretedFunction

    interpreted_language = K._triton._interpreted_language

    monkeypatch.setattr(kernel, "_compiled", None)
    autotuner = kernel.compiled
    jitted = autotuner.fn
    log: list[dict] = []

    def fake_run(*args, grid, warmup, **kwargs):
        log.append(kwargs)
        with interpreted_language():
            InterpretedFunction(jitted.fn).run(*args, grid=grid, warmup=False, **kwargs)

    timings = itertools.count(1.0)  # configs "benchmarked" later are slower: the first wins

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        t = next(timings)
        return [t, t, t]

    monkeypatch.setattr(jitted, "run", fake_run)
    monkeypatch.setattr(autotuner, "_do_bench", fake_bench)  # read by .do_bench
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return log


def test_autotuned_covariance_launch_simulated(monkeypatch):
    log = _simulated_autotuned(cov_mod.SYRK_KERNEL, monkeypatch)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2, 50, 150, generator=gen)
    mask = torch.rand(2, 50, generator=gen) > 0.3
    C0 = torch.randn(150, 150, generator=gen)
    C0 = C0 + C0.T
    C = C0.clone()
    cov_mod.covariance_update_triton(C, X, alpha=-0.5, beta=2.0, mask=mask, interpret=False)
    n_configs = len(cov_mod.SYRK_KERNEL.configs)
    assert len(log) == n_configs + 1  # every config benchmarked once, then the real launch
    assert all(entry["enable_fp_fusion"] is True for entry in log)
    assert log[-1]["BLOCK_D"] == cov_mod.SYRK_KERNEL.configs[0].meta["BLOCK_D"]
    kept = X[mask].double()
    ref = 2.0 * C0.double() - 0.5 * kept.T @ kept  # C was restored after each trial
    assert float((C.double() - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(C, C.T)


def test_autotuned_lowrank_launch_simulated(monkeypatch):
    log = _simulated_autotuned(lr_mod.LOWRANK_UPDATE_KERNEL, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    U, V = torch.randn(130, 70, generator=gen), torch.randn(200, 70, generator=gen)
    W0 = torch.randn(130, 200, generator=gen)
    W = W0.clone()
    w_norm, d_norm = lr_mod.apply_lowrank_update_triton(W, U, V, alpha=0.1, interpret=False)
    assert len(log) == len(lr_mod.LOWRANK_UPDATE_KERNEL.configs) + 1
    delta = 0.1 * U.double() @ V.double().T
    ref = W0.double() + delta  # W restored after each trial, partial sums reset before the last
    assert float((W.double() - ref).norm() / ref.norm()) < 1e-5
    assert abs(w_norm - float(W.double().norm())) < 1e-5 * w_norm
    assert abs(d_norm - float(delta.norm())) < 1e-5 * d_norm
