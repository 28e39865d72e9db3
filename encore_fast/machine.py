"""What machine a number was measured on: the one description every result file uses."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU model (``/proc/cpuinfo``) and its native bf16 instructions, if any."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = info.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({'native bf16: ' + ', '.join(native) if native else 'no native bf16'})"


def describe_machine(device: Any = "cpu") -> str:
    """``"<GPU name>"`` for a CUDA device, else ``"<CPU model> (..., N threads)"``."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"
