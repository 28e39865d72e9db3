"""The checks of method parts' own settings: one ConfigError wording for all of them."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from encore_fast.errors import ConfigError


def number(where: str, value: Any, low: float = 0.0, high: float = math.inf, *,
           open_low: bool = False, integer: bool = False) -> None:
    """``value`` is a finite number (an integer with ``integer``) in ``[low, high]`` (``(low,
    high]`` with ``open_low``); ``where`` names the setting (``"emmet.lambda_e"``)."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > low if open_low else value >= low) and value <= high
    if not ok:
        what = "an integer" if integer else "a number"
        span = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise ConfigError(f"{where} must be {what} in {span}, got {value!r}")


def choice(where: str, value: Any, choices: Collection[Any]) -> None:
    """``value`` is one of ``choices`` (``True``/``False`` for a switch)."""
    if value not in choices or (isinstance(value, bool) != all(
            isinstance(c, bool) for c in choices)):
        raise ConfigError(f"{where} must be one of {sorted(map(str, choices))}, got {value!r}")
