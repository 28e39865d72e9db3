"""Benchmarks of the two kernels against the best plain-PyTorch way to get the same result.

Two ways to run it:

* ``pytest benchmarks/bench_kernels.py [--kernel-shapes=auto|small|llama3]`` — pytest-benchmark
  cases; device, torch/triton versions and the backend that ran go to ``extra_info``.
* ``python benchmarks/bench_kernels.py [--shapes ...] [--out results/kernels_<device>.csv]``
  — measures the covariance kernel's TFLOP/s against a measured bf16 matmul ceiling and the
  update's GB/s against a measured copy bandwidth, prints a table and writes a CSV.

Shapes: ``llama3`` is Llama3-8B's edited matrix (``down_proj``: d_in = 14336, W 4096 × 14336
bf16, rank 100) with 16k tokens of keys; ``small`` is SmolLM2-135M-sized (d_in = 1536, W 576 ×
1536) for CPUs. ``auto`` picks llama3 on CUDA, small otherwise. On CPU the "kernel" rows run
the dispatch default, i.e. the PyTorch reference.

FLOP convention: the covariance does ``tokens · d²`` useful FLOPs — the distinct half of the
symmetric product ``XᵀX`` at 2 FLOPs per multiply-add. The same count is used for the torch
baseline (which computes the full GEMM, so its rate is half its raw GEMM rate). The ceiling is
the raw rate ``2N³/t`` of a large square bf16 ``torch.mm``. The update moves ``2 · W.nbytes``
(one read, one write of W); its ceiling is ``W.copy_`` of the same size, ``2 · nbytes / t``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from encore_fast import kernels as K
from encore_fast.machine import describe_machine

apply_lowrank_update_naive = K.lowrank_update.apply_lowrank_update_naive

SHAPES = {
    "llama3": {"d": 14336, "tokens": 16384, "w_out": 4096, "w_in": 14336, "rank": 100,
               "ceiling_n": 8192},
    "small": {"d": 1536, "tokens": 2048, "w_out": 576, "w_in": 1536, "rank": 100,
              "ceiling_n": 1024},
}


# --------------------------------------------------------------------------- environment


def bench_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_shapes(name: str, device: torch.device) -> str:
    """``auto`` → ``llama3`` on CUDA, ``small`` elsewhere."""
    if name == "auto":
        return "llama3" if device.type == "cuda" else "small"
    return name


def environment(device: torch.device) -> dict[str, str]:
    """Device, versions and date, for extra_info and the CSV."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "absent"
    return {
        "device": describe_machine(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda) if device.type == "cuda" else "-",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 2,
            reps: int = 10) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------- the cases


def make_covariance(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(shape["tokens"], shape["d"], generator=gen, device=device).to(dtype)
    C = torch.zeros(shape["d"], shape["d"], device=device)
    return C, X


def torch_covariance(C: torch.Tensor, X: torch.Tensor) -> Callable[[], object]:
    """The best plain-PyTorch ``C += XᵀX`` (fp32 C): fp32 addmm, or a 16-bit GEMM with fp32
    output (``out_dtype``, where this torch/device has it), else an fp32 copy of X."""
    if X.dtype == torch.float32:
        return lambda: C.addmm_(X.mT, X)
    probe = torch.ones(16, 16, device=X.device, dtype=X.dtype)
    try:
        torch.addmm(probe.float(), probe, probe, out_dtype=torch.float32)
        return lambda: torch.addmm(C, X.mT, X, out_dtype=torch.float32, out=C)
    except (RuntimeError, TypeError, NotImplementedError):
        pass
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
        return lambda: C.add_(torch.mm(X.mT, X, out_dtype=torch.float32))
    except (RuntimeError, TypeError, NotImplementedError):
        pass

    def via_fp32() -> None:
        xf = X.float()
        C.addmm_(xf.mT, xf)

    return via_fp32


def make_update(shape: dict, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    W = torch.randn(shape["w_out"], shape["w_in"], generator=gen, device=device).bfloat16()
    U = torch.randn(shape["w_out"], shape["rank"], generator=gen, device=device) * 1e-3
    V = torch.randn(shape["w_in"], shape["rank"], generator=gen, device=device)
    return W, U, V


# --------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
except ImportError:  # script mode does not need pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def device() -> torch.device:
        return bench_device()

    @pytest.fixture(scope="module")
    def shape_name(request: pytest.FixtureRequest, device: torch.device) -> str:
        try:
            option = request.config.getoption("--kernel-shapes")
        except ValueError:  # conftest not loaded
            option = os.environ.get("ENCORE_FAST_KERNEL_SHAPES", "auto")
        return resolve_shapes(option, device)

    def _run(benchmark, fn: Callable[[], object], device: torch.device, info: dict) -> None:
        def call() -> None:
            fn()
            sync(device)

        call()  # first call: Triton compile + autotune, outside the measurement
        benchmark.extra_info.update(environment(device))
        benchmark.extra_info.update(info)
        benchmark.pedantic(call, rounds=10 if device.type == "cuda" else 3, iterations=1,
                           warmup_rounds=1)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
    @pytest.mark.parametrize("impl", ["kernel", "torch"])
    def test_covariance(benchmark, device, shape_name, impl, dtype):
        shape = SHAPES[shape_name]
        C, X = make_covariance(shape, dtype, device)
        fn = (lambda: K.covariance_update_(C, X)) if impl == "kernel" else torch_covariance(C, X)
        fn()
        backend = K.last_backend("covariance_update") if impl == "kernel" else "torch"
        _run(benchmark, fn, device, {"shapes": shape_name, "backend": backend,
                                     "useful_flop": shape["tokens"] * shape["d"] ** 2})

    @pytest.mark.parametrize("impl", ["kernel", "torch-fp32", "torch-addmm-bf16"])
    def test_lowrank_update(benchmark, device, shape_name, impl):
        shape = SHAPES[shape_name]
        W, U, V = make_update(shape, device)
        if impl == "kernel":
            fn = lambda: K.apply_lowrank_update_(W, U, V)  # noqa: E731
        elif impl == "torch-fp32":  # same math and norms as the kernel
            fn = lambda: apply_lowrank_update_naive(W, U, V)  # noqa: E731
        else:  # the fast but coarser plain way: bf16 factors, no norms
            Ub, Vb = U.bfloat16(), V.bfloat16()
            fn = lambda: W.addmm_(Ub, Vb.mT)  # noqa: E731
        fn()
        backend = K.last_backend("lowrank_update") if impl == "kernel" else "torch"
        _run(benchmark, fn, device, {"shapes": shape_name, "backend": backend,
                                     "bytes": 2 * W.numel() * W.element_size()})


# --------------------------------------------------------------------------- script mode


def measure(shape_name: str, device: torch.device, reps: int) -> list[dict]:
    """All rows of the CSV: ceilings, covariance and update, kernel and torch."""
    shape = SHAPES[shape_name]
    warm = 2 if device.type == "cpu" else 3
    rows: list[dict] = []

    def row(case, dtype, dims, backend, ms, metric, value, ceiling):
        rows.append({"case": case, "dtype": dtype, "shape": dims, "backend": backend,
                     "ms": round(ms, 4), "metric": metric, "value": round(value, 3),
                     "ceiling": round(ceiling, 3) if ceiling else "",
                     "fraction": round(value / ceiling, 3) if ceiling else ""})

    n = shape["ceiling_n"]
    ab = torch.randn(2, n, n, device=device).bfloat16()
    ms = time_ms(lambda: torch.mm(ab[0], ab[1]), device, warmup=warm, reps=reps)
    flops_ceiling = 2 * n**3 / (ms * 1e-3) / 1e12
    row("ceiling: torch.mm bf16", "bf16", f"{n}x{n}x{n}", "torch", ms, "TFLOP/s",
        flops_ceiling, None)
    ab = None  # free before the big cases

    W, U, V = make_update(shape, device)
    copies = [torch.randn_like(W)]
    nbytes = 2 * W.numel() * W.element_size()
    ms = time_ms(lambda: W.copy_(copies[0]), device, warmup=warm, reps=reps)
    copy_ceiling = nbytes / (ms * 1e-3) / 1e9
    dims = f"{shape['w_out']}x{shape['w_in']}"
    row("ceiling: W.copy_", "bf16", dims, "torch", ms, "GB/s", copy_ceiling, None)
    copies.clear()

    useful = shape["tokens"] * shape["d"] ** 2
    cov_dims = f"tokens={shape['tokens']} d={shape['d']}"
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        C, X = make_covariance(shape, dtype, device)
        for impl in ("kernel", "torch"):
            fn = (lambda C=C, X=X: K.covariance_update_(C, X)) if impl == "kernel" \
                else torch_covariance(C, X)
            fn()
            backend = K.last_backend("covariance_update") if impl == "kernel" else "torch"
            ms = time_ms(fn, device, warmup=warm, reps=reps)
            row(f"covariance {impl}", tag, cov_dims, backend, ms, "useful TFLOP/s",
                useful / (ms * 1e-3) / 1e12, flops_ceiling)
        del C, X

    upd_dims = f"{dims} r={shape['rank']}"
    for impl in ("kernel", "torch"):
        fn = (lambda: K.apply_lowrank_update_(W, U, V)) if impl == "kernel" \
            else (lambda: apply_lowrank_update_naive(W, U, V))
        fn()
        backend = K.last_backend("lowrank_update") if impl == "kernel" else "torch"
        ms = time_ms(fn, device, warmup=warm, reps=reps)
        row(f"lowrank update {impl}", "bf16", upd_dims, backend, ms, "GB/s",
            nbytes / (ms * 1e-3) / 1e9, copy_ceiling)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="auto", choices=("auto", "small", "llama3"))
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default benchmarks/results/kernels_<device>.csv)")
    args = parser.parse_args(argv)

    device = bench_device()
    shape_name = resolve_shapes(args.shapes, device)
    reps = args.reps or (20 if device.type == "cuda" else 3)
    env = environment(device)
    rows = measure(shape_name, device, reps)

    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{env['date']} | shapes={shape_name}")
    print(f"{'case':28s} {'dtype':5s} {'backend':9s} {'ms':>10s} {'value':>10s} "
          f"{'metric':15s} {'of ceiling':>10s}")
    for r in rows:
        frac = f"{r['fraction']:.0%}" if r["fraction"] != "" else ""
        print(f"{r['case']:28s} {r['dtype']:5s} {r['backend']:9s} {r['ms']:10.3f} "
              f"{r['value']:10.2f} {r['metric']:15s} {frac:>10s}")

    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40]
        out = Path(__file__).parent / "results" / f"kernels_{slug}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["date", "device", "torch", "triton", "cuda", "shapes", "case", "dtype", "shape",
              "backend", "ms", "metric", "value", "ceiling", "fraction"]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({**env, "shapes": shape_name, **r})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
