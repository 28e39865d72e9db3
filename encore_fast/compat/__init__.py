"""Compatibility layers for users coming from other knowledge-editing libraries.

:mod:`encore_fast.compat.easyedit`: EasyEdit's MEMIT / AlphaEdit hparams files and its
``edit()`` call shape (``EasyEditor.from_hparams(path).edit(...)``).
"""

from encore_fast.compat.easyedit import (
    EasyEditor,
    EasyEditSettings,
    read_hparams,
    summary_metrics,
    translate_hparams,
)

__all__ = ["EasyEditSettings", "EasyEditor", "read_hparams", "summary_metrics",
           "translate_hparams"]
