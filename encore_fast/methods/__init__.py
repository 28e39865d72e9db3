"""Update rules: MEMIT, sequential MEMIT, ENCORE and AlphaEdit on shared machinery."""

from encore_fast.methods.alphaedit import AlphaEdit, null_space_projector
from encore_fast.methods.base import LayerState, UpdateRule
from encore_fast.methods.encore import Encore
from encore_fast.methods.memit import Memit, MemitSequential

RULES: dict[str, type[UpdateRule]] = {
    "encore": Encore,
    "memit": Memit,
    "memit-seq": MemitSequential,
    "alphaedit": AlphaEdit,
}


def get_rule(name: str) -> UpdateRule:
    """The update rule called ``name``."""
    try:
        return RULES[name]()
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(RULES)}") from None


__all__ = ["RULES", "AlphaEdit", "Encore", "LayerState", "Memit", "MemitSequential",
           "UpdateRule", "get_rule", "null_space_projector"]
