"""Options for the kernel benchmarks (``pytest benchmarks/bench_kernels.py``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kernel-shapes",
        action="store",
        default="auto",
        choices=("auto", "small", "llama3"),
        help="kernel benchmark shapes: llama3 (d=14336, 16k tokens; W 4096x14336, r=100), "
        "small (SmolLM2-sized, for CPUs) or auto (llama3 on CUDA, small otherwise)",
    )
