"""Architecture knowledge and model loading."""

from encore_fast.models.arch import (
    ARCHITECTURES,
    ArchSpec,
    ModelView,
    block_hidden,
    detect_arch,
    replace_block_hidden,
)
from encore_fast.models.loading import bundled_model_dir, cache_dir, load_model, prepare_tokenizer

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ModelView",
    "block_hidden",
    "bundled_model_dir",
    "cache_dir",
    "detect_arch",
    "load_model",
    "prepare_tokenizer",
    "replace_block_hidden",
]
