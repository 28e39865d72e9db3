"""Kernels vs float64 references, on odd sizes, with poisoned outputs; and the backend choice.

Every correctness test runs on each available backend:

* ``torch-cpu`` — the PyTorch reference (production path on CPU);
* ``interpret-cpu`` — the Triton kernels themselves, run by Triton's interpreter on CPU tensors
  (``ENCORE_FAST_KERNELS=interpret``; no ``TRITON_INTERPRET`` needed, nothing global changes);
* ``triton-cuda`` — the compiled kernels, when a GPU is present.

After each call the test asserts which backend actually ran (``last_backend``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from encore_fast import kernels as K

cov_mod, lr_mod, dispatch = K.covariance, K.lowrank_update, K.dispatch

HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

needs_triton = pytest.mark.skipif(not K.has_triton(), reason="Triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and K.has_triton()), reason="needs CUDA + Triton")

BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("interpret", "cpu"), id="interpret-cpu", marks=needs_triton),
]
if HAS_CUDA:  # listed only where it can run, to keep CPU reports short
    BACKENDS.append(pytest.param(("triton", "cuda"), id="triton-cuda", marks=needs_cuda))
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(backend name, device), selected through the environment variable."""
    name, device = request.param
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    return name, device


def _skip_bf16_interpreted(name: str, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and name == "interpret":
        pytest.skip("Triton's interpreter computes bf16 wrongly; bf16 Triton is tested on CUDA")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _assert_symmetric(C: torch.Tensor, name: str) -> None:
    """Triton mirrors bitwise; the reference's full GEMM is symmetric up to rounding."""
    if name == "torch":
        assert torch.allclose(C, C.T, rtol=1e-6, atol=1e-6 * float(C.abs().max()))
    else:
        assert torch.equal(C, C.T)


def _sym(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return (a + a.T).float()


# --------------------------------------------------------------------------- covariance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,tokens", [(37, 77), (70, 45), (5, 3)])
def test_covariance_overwrite_poisoned(backend, dtype, d, tokens):
    name, device = backend
    _skip_bf16_interpreted(name, dtype)
    gen = torch.Generator().manual_seed(d * 1000 + tokens)
    X = torch.randn(tokens, d, generator=gen).to(dtype)
    C = torch.full((d, d), float("nan"), device=device)  # β = 0: C must not be read
    out = K.covariance_update_(C, X.to(device), beta=0.0)
    assert out is C
    assert K.last_backend("covariance_update") == name
    ref = X.double().T @ X.double()
    assert torch.isfinite(C).all()
    assert _rel(C.cpu(), ref) < TOL[dtype]
    _assert_symmetric(C, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_covariance_alpha_beta(backend, dtype):
    name, device = backend
    _skip_bf16_interpreted(name, dtype)
    gen = torch.Generator().manual_seed(1)
    d, tokens, alpha, beta = 53, 61, -0.7, 0.45
    X = torch.randn(tokens, d, generator=gen).to(dtype)
    C0 = _sym(d, gen)
    C = C0.clone().to(device)
    K.covariance_update_(C, X.to(device), alpha=alpha, beta=beta)
    assert K.last_backend("covariance_update") == name
    ref = beta * C0.double() + alpha * (X.double().T @ X.double())
    assert _rel(C.cpu(), ref) < TOL[dtype]
    _assert_symmetric(C, name)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_covariance_masked_skips_padding(backend, dtype, mask_dtype):
    name, device = backend
    gen = torch.Generator().manual_seed(2)
    batch, seq, d = 3, 29, 37
    lengths = torch.tensor([seq, 11, 0])  # full, right-padded, empty
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    X = torch.randn(batch, seq, d, generator=gen).to(dtype)
    X[~mask] = float("nan")  # a padded token that is read at all poisons C
    C = torch.full((d, d), float("nan"), device=device)
    K.covariance_update_(C, X.to(device), beta=0.0, mask=mask.to(mask_dtype).to(device))
    assert K.last_backend("covariance_update") == name
    kept = X[mask].double()
    ref = kept.T @ kept
    assert torch.isfinite(C).all()
    assert _rel(C.cpu(), ref) < TOL[dtype]


def test_covariance_strided_inputs(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    d = 41
    base = torch.randn(2 * d, 50, generator=gen)
    X2 = base[::2].T  # [50, d], stride over d is 100, over tokens 1
    X3 = torch.randn(17, 4, d, generator=gen).transpose(0, 1)  # [4, 17, d], non-contiguous
    mask = torch.rand(4, 17, generator=gen) > 0.3
    big = torch.full((d + 3, d + 3), -7.0, device=device)
    C = big[1 : d + 1, 2 : d + 2]  # strided view inside a sentinel-filled buffer
    C.fill_(float("nan"))
    K.covariance_update_(C, X2.to(device), beta=0.0)
    K.covariance_update_(C, X3.to(device), mask=mask.to(device), alpha=2.0)
    assert K.last_backend("covariance_update") == name
    kept = X3[mask].double()
    ref = X2.double().T @ X2.double() + 2.0 * kept.T @ kept
    assert _rel(C.cpu(), ref) < 1e-5
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[1 : d + 1, 2 : d + 2] = False
    assert (big[outside] == -7.0).all()


def test_covariance_mirror_false_then_mirror(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(4)
    d = 70
    X = torch.randn(33, d, generator=gen)
    C = torch.full((d, d), float("nan"), device=device)
    K.covariance_update_(C, X.to(device), beta=0.0, mirror=False)
    ref = X.double().T @ X.double()
    upper = torch.ones(d, d, dtype=torch.bool).triu()
    assert _rel(C.cpu()[upper], ref[upper]) < 1e-5
    if name != "torch":  # the kernel writes upper tiles only, and nothing below the diagonal
        assert torch.isnan(C.cpu()[~upper]).all()
    out = K.mirror_upper_(C)
    assert out is C
    assert K.last_backend("mirror_upper") == name
    assert torch.equal(C, C.T)
    assert _rel(C.cpu(), ref) < 1e-5


def test_mirror_upper_exact(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(5)
    for d in (1, 2, 33, 65):
        C0 = torch.randn(d, d, generator=gen)
        C = C0.clone().to(device)
        K.mirror_upper_(C)
        assert K.last_backend("mirror_upper") == name
        assert torch.equal(C.cpu(), torch.triu(C0) + torch.triu(C0, 1).T)


def test_covariance_no_tokens(backend):
    name, device = backend
    d = 9
    C0 = _sym(d, torch.Generator().manual_seed(6))
    C = C0.clone().to(device)
    K.covariance_update_(C, torch.zeros(0, d, device=device), beta=0.5)
    assert torch.allclose(C.cpu(), 0.5 * C0)
    C.fill_(float("nan"))
    K.covariance_update_(C, torch.zeros(0, d, device=device), beta=0.0)
    assert K.last_backend("covariance_update") == name
    assert (C == 0).all()


@needs_triton
def test_covariance_many_tiles_interpreted(monkeypatch):
    """Small interpreter blocks: 28 upper tiles, several token blocks with a tail."""
    monkeypatch.setitem(cov_mod.SYRK_KERNEL.interpret_config, "BLOCK_D", 16)
    monkeypatch.setitem(cov_mod.SYRK_KERNEL.interpret_config, "BLOCK_T", 16)
    monkeypatch.setitem(cov_mod.MIRROR_KERNEL.interpret_config, "BLOCK_D", 16)
    gen = torch.Generator().manual_seed(7)
    d, tokens = 100, 83
    X = torch.randn(tokens, d, generator=gen)
    C = torch.full((d, d), float("nan"))
    with K.use_backend("interpret"):
        K.covariance_update_(C, X, beta=0.0, mirror=False)
        K.mirror_upper_(C)
    ref = X.double().T @ X.double()
    assert _rel(C, ref) < 1e-5
    assert torch.equal(C, C.T)


def test_upper_tile_enumeration_covers_each_tile_once():
    """The kernels' pid -> (i, j ≤ ...) formula (fp32 sqrt + ±1 fix-up), replayed in NumPy."""
    nb = 1200  # d = 153,600 with 128-wide tiles
    pid = np.arange(nb * (nb + 1) // 2, dtype=np.int64)
    j = ((np.sqrt(8.0 * pid.astype(np.float32) + 1.0, dtype=np.float32) - 1.0) * 0.5)
    j = j.astype(np.int64)
    j = np.where(j * (j + 1) // 2 > pid, j - 1, j)
    j = np.where((j + 1) * (j + 2) // 2 <= pid, j + 1, j)
    i = pid - j * (j + 1) // 2
    assert (0 <= i).all() and (i <= j).all() and (j < nb).all()
    assert len(np.unique(i * nb + j)) == len(pid)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_covariance_cuda_realistic(dtype):
    gen = torch.Generator().manual_seed(8)
    d, tokens = 1031, 2500
    X = torch.randn(2, tokens, d, generator=gen).to(dtype)
    mask = torch.rand(2, tokens, generator=gen) > 0.2
    C = torch.full((d, d), float("nan"), device="cuda")
    with K.use_backend("auto"):
        K.covariance_update_(C, X.cuda(), beta=0.0, mask=mask.cuda())
        K.covariance_update_(C, X[0].cuda(), alpha=-1.0)
    assert K.last_backend("covariance_update") == "triton"
    kept = X[mask].double()
    ref = kept.T @ kept - X[0].double().T @ X[0].double()
    assert _rel(C.cpu(), ref) < TOL[dtype]


# --------------------------------------------------------------------------- low-rank update


def _lowrank_ref(W0, U, V, alpha, transposed):
    delta = alpha * (V.double() @ U.double().T if transposed else U.double() @ V.double().T)
    return W0.double() + delta, delta


def _check_update(W, W0, U, V, alpha, transposed, norms, dtype):
    ref, delta = _lowrank_ref(W0, U, V, alpha, transposed)
    tol = TOL[dtype]
    # elementwise: every element moved to its own target (an unwritten tile keeps W0 and fails)
    err = (W.double().cpu() - ref).abs()
    assert (err <= tol * ref.abs() + tol * ref.abs().max()).all()
    assert _rel(W.cpu(), ref) < tol
    w_norm, d_norm = norms
    assert isinstance(w_norm, float) and isinstance(d_norm, float)
    assert abs(w_norm - float(torch.linalg.norm(W.double()))) <= 1e-5 * w_norm
    assert abs(d_norm - float(torch.linalg.norm(delta))) <= 1e-5 * d_norm


@pytest.mark.parametrize("rank", [1, 40])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "Wt"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lowrank_update(backend, dtype, transposed, rank):
    name, device = backend
    _skip_bf16_interpreted(name, dtype)
    gen = torch.Generator().manual_seed(rank * 10 + transposed)
    d_out, d_in, alpha = 45, 70, -0.3
    U = torch.randn(d_out, rank, generator=gen)
    V = torch.randn(d_in, rank, generator=gen)
    W0 = torch.randn((d_in, d_out) if transposed else (d_out, d_in), generator=gen).to(dtype)
    W = W0.clone().to(device)
    norms = K.apply_lowrank_update_(W, U.to(device), V.to(device), alpha=alpha,
                                    transposed=transposed)
    assert K.last_backend("lowrank_update") == name
    assert W.dtype == dtype
    _check_update(W, W0, U, V, alpha, transposed, norms, dtype)


def test_lowrank_update_strided_and_16bit_factors(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(11)
    d_out, d_in, rank = 39, 50, 20
    U = torch.randn(d_out, rank, generator=gen).half()
    V = torch.randn(rank, d_in, generator=gen).half().T  # non-contiguous factor
    big0 = torch.randn(d_out + 2, d_in + 9, generator=gen)
    big = big0.clone().to(device)
    W = big[1 : d_out + 1, 4 : d_in + 4]  # strided view of a larger buffer
    W0 = W.cpu().clone()
    norms = K.apply_lowrank_update_(W, U.to(device), V.to(device), alpha=0.25)
    assert K.last_backend("lowrank_update") == name
    _check_update(W, W0, U, V, 0.25, False, norms, torch.float32)
    outside = torch.ones_like(big0, dtype=torch.bool)
    outside[1 : d_out + 1, 4 : d_in + 4] = False
    assert torch.equal(big.cpu()[outside], big0[outside])


def test_lowrank_update_parameter_and_zero_rank(backend):
    name, device = backend
    gen = torch.Generator().manual_seed(12)
    W = torch.nn.Parameter(torch.randn(33, 35, generator=gen, device=device))
    W0 = W.detach().clone()
    w_norm, d_norm = K.apply_lowrank_update_(W, torch.zeros(33, 0, device=device),
                                             torch.zeros(35, 0, device=device))
    assert K.last_backend("lowrank_update") == name
    assert torch.equal(W.detach(), W0) and d_norm == 0.0
    assert abs(w_norm - float(W0.double().norm())) <= 1e-6 * w_norm
    assert W.requires_grad


@needs_triton
def test_lowrank_many_tiles_interpreted(monkeypatch):
    for key, value in (("BLOCK_M", 16), ("BLOCK_N", 16), ("BLOCK_R", 16)):
        monkeypatch.setitem(lr_mod.LOWRANK_UPDATE_KERNEL.interpret_config, key, value)
    gen = torch.Generator().manual_seed(13)
    U, V = torch.randn(61, 37, generator=gen), torch.randn(50, 37, generator=gen)
    W0 = torch.randn(61, 50, generator=gen)
    W = W0.clone()
    with K.use_backend("interpret"):
        norms = K.apply_lowrank_update_(W, U, V, alpha=1.5)
    _check_update(W, W0, U, V, 1.5, False, norms, torch.float32)


@pytest.mark.parametrize("transposed", [False, True], ids=["W", "Wt"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lowrank_update_master_and_16bit_copy(backend, out_dtype, transposed):
    """fp32 master + the model's 16-bit weight in one pass: master exact to fp32, the copy is
    the master rounded to-nearest (bitwise), every element written (poisoned beforehand)."""
    name, device = backend
    _skip_bf16_interpreted(name, out_dtype)
    gen = torch.Generator().manual_seed(21 + transposed)
    d_out, d_in, rank, alpha = 37, 58, 19, 0.7
    U = torch.randn(d_out, rank, generator=gen)
    V = torch.randn(d_in, rank, generator=gen)
    M0 = torch.randn((d_in, d_out) if transposed else (d_out, d_in), generator=gen)
    master = M0.clone().to(device)
    out = torch.full(M0.shape, float("nan"), dtype=out_dtype, device=device)
    norms = K.apply_lowrank_update_(master, U.to(device), V.to(device), alpha=alpha,
                                    transposed=transposed, out=out)
    assert K.last_backend("lowrank_update") == name
    _check_update(master, M0, U, V, alpha, transposed, norms, torch.float32)
    assert torch.equal(out, master.to(out_dtype))


def test_lowrank_update_out_checked():
    W = torch.zeros(4, 5)
    U, V = torch.zeros(4, 2), torch.zeros(5, 2)
    with pytest.raises(ValueError, match="must match W"):
        K.apply_lowrank_update_(W, U, V, out=torch.zeros(5, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not be W"):
        K.apply_lowrank_update_(W, U, V, out=W)


def test_lowrank_update_rejects_bad_shapes():
    W = torch.zeros(4, 5)
    with pytest.raises(ValueError):
        K.apply_lowrank_update_(W, torch.zeros(5, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError):
        K.apply_lowrank_update_(W, torch.zeros(4, 2), torch.zeros(5, 3))
    K.apply_lowrank_update_(W, torch.zeros(5, 2), torch.zeros(4, 2), transposed=True)


def test_covariance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        K.covariance_update_(torch.zeros(4, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        K.covariance_update_(torch.zeros(4, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError):
        K.covariance_update_(torch.zeros(4, 4), torch.zeros(2, 3, 4), mask=torch.ones(3, 2))


# --------------------------------------------------------------------------- dispatch


def test_dispatch_default_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert K.requested_backend() == "auto"
    C = torch.zeros(8, 8)
    K.covariance_update_(C, torch.randn(5, 8))
    assert K.last_backend("covariance_update") == "torch"


@pytest.mark.parametrize(
    "env,expected",
    [("torch", "torch"), ("TORCH", "torch"), ("auto", "torch"), ("", "torch"),
     ("triton", "interpret"), ("interpret", "interpret")],
)
def test_dispatch_env_var_on_cpu(monkeypatch, env, expected):
    if expected == "interpret" and not K.has_triton():
        expected = "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, env)
    W = torch.zeros(6, 7)
    K.apply_lowrank_update_(W, torch.ones(6, 1), torch.ones(7, 1))
    assert K.last_backend("lowrank_update") == expected
    assert (W == 1).all()


def test_dispatch_use_backend_overrides_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
    with K.use_backend("torch"):
        assert K.select_backend("probe", torch.zeros(1)) == "torch"
    assert K.requested_backend() == "interpret"


def test_dispatch_rejects_unknown_backend(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="ENCORE_FAST_KERNELS"):
        K.covariance_update_(torch.zeros(2, 2), torch.zeros(1, 2))


def test_dispatch_unsupported_inputs_use_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    C = torch.zeros(6, 6, dtype=torch.float64)  # fp64 statistic: no kernel for it
    X = torch.randn(4, 6, dtype=torch.float64)
    K.covariance_update_(C, X)
    assert K.last_backend("covariance_update") == "torch"
    assert torch.allclose(C, X.T @ X)


def test_dispatch_without_triton_falls_back(monkeypatch):
    monkeypatch.setattr(dispatch._triton, "HAS_TRITON", False)
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    C = torch.zeros(3, 3)
    with pytest.warns(RuntimeWarning, match="Triton is not importable"):
        K.covariance_update_(C, torch.ones(2, 3))
    assert K.last_backend("covariance_update") == "torch"
    assert (C == 2).all()


@needs_triton
def test_interpreter_really_runs_the_kernel(monkeypatch):
    """With the reference disabled, the interpret backend still produces the result."""

    def boom(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(cov_mod, "covariance_update_naive", boom)
    monkeypatch.setattr(lr_mod, "apply_lowrank_update_naive", boom)
    monkeypatch.setenv(dispatch.ENV_VAR, "interpret")
    before = K.backend_counts().get(("covariance_update", "interpret"), 0)
    X = torch.randn(20, 18)
    C = torch.empty(18, 18)
    K.covariance_update_(C, X, beta=0.0)
    assert torch.allclose(C, X.T @ X, atol=1e-5)
    W = torch.zeros(18, 20)
    K.apply_lowrank_update_(W, X.T, torch.eye(20), alpha=1.0)
    assert torch.allclose(W, X.T)
    assert K.backend_counts()[("covariance_update", "interpret")] == before + 1


@needs_triton
@pytest.mark.skipif(K._triton.env_interpret(), reason="TRITON_INTERPRET=1: no compiled mode")
def test_interpreted_launch_leaves_triton_compilable():
    """The interpreted launch restores Triton's JITFunction (compiled mode stays usable)."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def snapshot() -> dict:
        spaces = (tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.dtype)
        return {(id(space), k): v for space in spaces for k, v in vars(space).items()}

    def launches() -> None:
        with K.use_backend("interpret"):
            K.mirror_upper_(torch.randn(5, 5))
            K.apply_lowrank_update_(torch.zeros(20, 20), torch.ones(20, 2), torch.ones(20, 2))

    launches()  # first use imports Triton's interpreter (one-off module attributes)
    before, call = snapshot(), JITFunction.__call__
    launches()
    assert JITFunction.__call__ is call
    after = snapshot()
    keys = before.keys() | after.keys()
    changed = [key[1] for key in keys if before.get(key) is not after.get(key)]
    assert not changed, f"triton.language left patched: {changed}"
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        tl.zeros((2,), dtype=tl.float32)


def test_checkout_kernels_folder_does_not_shadow_hugging_face_kernels() -> None:
    """From the repository root (``python -m`` puts it on ``sys.path``) the folder ``kernels/``
    must not stand in for Hugging Face's ``kernels`` package that transformers imports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import importlib.util, os, sys\n"
        "import encore_fast.kernels as ours\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is not None and os.path.dirname(spec.origin).endswith('kernels'), spec\n"
        "try:\n"
        "    import kernels\n"
        "except ImportError as e:\n"
        "    assert 'encore_fast.kernels' in str(e), e\n"
        "    print('absent')\n"
        "else:\n"
        "    assert not hasattr(kernels, 'covariance_update_'), kernels.__file__\n"
        "    assert os.path.abspath(kernels.__file__) != os.path.abspath(ours.__file__)\n"
        "    print('handed over')\n"
        "assert hasattr(ours, 'covariance_update_')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in {"absent", "handed over"}
