"""encore_fast: fast lifelong knowledge editing (ENCORE, MEMIT, AlphaEdit).

The public face: :class:`Editor` (edit, undo, reset, save/load), :class:`EditRequest`, the
settings type :class:`EditConfig` and its presets, and model loading.
"""

from encore_fast.config import PRESETS, EditConfig, make_config
from encore_fast.editor import BatchReport, Editor
from encore_fast.models import ArchSpec, load_model
from encore_fast.requests import EditRequest, RequestError

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ArchSpec",
    "BatchReport",
    "EditConfig",
    "EditRequest",
    "Editor",
    "RequestError",
    "load_model",
    "make_config",
]
