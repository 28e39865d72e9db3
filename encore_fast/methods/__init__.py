"""Update rules (MEMIT, sequential MEMIT, ENCORE, AlphaEdit, ...), the transforms that compose
with them, and the registry every list of methods comes from (the CLI's choices, the presets,
the editor). A method is a rule, or a rule joined with transforms: ``"alphaedit+nas"``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from encore_fast.config import (
    PRESET_FAMILIES,
    MethodSettings,
    declare_method,
    forget_method,
    method_parts,
)
from encore_fast.errors import ConfigError
from encore_fast.methods.alphaedit import AlphaEdit, null_space_projector
from encore_fast.methods.base import LayerState, Part, UpdateRule, eye_like
from encore_fast.methods.emmet import Emmet
from encore_fast.methods.encore import Encore
from encore_fast.methods.evoedit import EvoEdit
from encore_fast.methods.memit import Memit, MemitSequential
from encore_fast.methods.nas import Nas
from encore_fast.methods.prune import Prune
from encore_fast.methods.rect import Rect
from encore_fast.methods.rlsedit import RLSEdit
from encore_fast.methods.sphere import Sphere
from encore_fast.methods.transforms import (
    LowRankUpdate,
    UpdateContext,
    UpdateTransform,
    ValueContext,
    ValueTransform,
)
from encore_fast.methods.ultraedit import UltraEdit

RULES: dict[str, type[UpdateRule]] = {}
TRANSFORMS: dict[str, type[ValueTransform] | type[UpdateTransform]] = {}
ALIASES: dict[str, str] = {}
"""Short names of the published pairings (``"nas"`` -> ``"alphaedit+nas"``)."""


def register(part: type[Part], *, replace: bool = False) -> type[Part]:
    """Make ``part`` (an :class:`UpdateRule`, :class:`ValueTransform` or
    :class:`UpdateTransform` subclass) available by its ``name`` everywhere, alone (a rule) or
    in compositions; usable as a class decorator. A taken name needs ``replace=True``. The
    settings (``encore_fast.config``) learn its kind, preset family, MPES default and own
    settings here."""
    kinds = {UpdateRule: "rule", ValueTransform: "value", UpdateTransform: "update"}
    kind = next((k for base, k in kinds.items()
                 if isinstance(part, type) and issubclass(part, base)), None)
    if kind is None:
        raise ConfigError(f"register() expects an UpdateRule, ValueTransform or "
                          f"UpdateTransform subclass, got {part!r}")
    name = part.name
    if not isinstance(name, str) or not name or name == Part.name or "+" in name:
        raise ConfigError(f"{part.__name__} needs a name without '+' (class attribute 'name')")
    family = getattr(part, "preset", "memit")
    if family not in PRESET_FAMILIES:
        raise ConfigError(f"{part.__name__}.preset must be one of {PRESET_FAMILIES}, got "
                          f"{family!r}")
    taken = RULES.get(name) or TRANSFORMS.get(name)
    aliased = name in ALIASES and name not in ALIASES[name].split("+")  # ("sphere": its own)
    if (taken is not None and taken is not part and not replace) or aliased:
        what = taken.__name__ if taken is not None else f"an alias of {ALIASES[name]}"
        raise ConfigError(f"a method called {name!r} is already registered ({what}); pass "
                          "replace=True to replace it")
    check = part.check_settings if part.check_settings is not Part.check_settings else None
    declare_method(name, MethodSettings(
        preset_family=family, mpes=bool(getattr(part, "mpes", False)), kind=kind,
        own=dict(part.own), presets={k: dict(v) for k, v in part.presets.items()}, check=check))
    RULES.pop(name, None)
    TRANSFORMS.pop(name, None)
    (RULES if kind == "rule" else TRANSFORMS)[name] = part  # type: ignore[index]
    return part


def unregister(name: str) -> None:
    """Remove a registered method part (for user code and tests), from the settings too."""
    RULES.pop(name, None)
    TRANSFORMS.pop(name, None)
    forget_method(name)


def get_rule(name: str) -> UpdateRule:
    """The update rule called ``name``."""
    try:
        return RULES[name]()
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(RULES)}") from None


def canonical(method: str) -> str:
    """A method's full name: an alias expanded, its parts checked (a ConfigError else)."""
    method = ALIASES.get(method, method)
    method_parts(method)
    return method


@dataclass
class Method:
    """A method as run: its rule and its transforms, each kind in the order written."""

    name: str
    rule: UpdateRule
    value_transforms: list[ValueTransform] = field(default_factory=list)
    update_transforms: list[UpdateTransform] = field(default_factory=list)

    def transform_values(self, zs: torch.Tensor,
                         context: Callable[[], ValueContext]) -> torch.Tensor:
        """The batch's target values after every value transform (``context`` is made only
        when there is one)."""
        ctx = context() if self.value_transforms else None
        for t in self.value_transforms:
            zs = t.apply(zs, ctx)
        return zs

    def transform_update(self, update: LowRankUpdate,
                         context: Callable[[], UpdateContext]) -> LowRankUpdate:
        """A layer's update after every update transform (``context`` made only for one), its
        factors on the device of the layer's weight (``device_map`` models)."""
        if not self.update_transforms:
            return update
        ctx = context()
        dev = ctx.weight.device
        update = LowRankUpdate(update.u.to(dev), update.v.to(dev), update.mask)
        for t in self.update_transforms:
            update = t.apply(update, ctx)
        return update


def build_method(method: str) -> Method:
    """The rule and transforms of ``method`` (a rule's name, an alias or a composition)."""
    name = canonical(method)
    parts = method_parts(name)
    rule = next(RULES[p]() for p in parts if p in RULES)
    made = [TRANSFORMS[p]() for p in parts if p in TRANSFORMS]
    return Method(name, rule, [t for t in made if isinstance(t, ValueTransform)],
                  [t for t in made if isinstance(t, UpdateTransform)])


class MethodNames:
    """The CLI's ``--method`` choices: lists the rules and aliases; accepts every valid
    composition (``"alphaedit+nas"``)."""

    def __iter__(self) -> Iterator[str]:
        return iter(sorted([*RULES, *ALIASES]))

    def __contains__(self, name: object) -> bool:
        try:
            canonical(str(name))
        except ConfigError:
            return False
        return True


for _part in (Encore, Memit, MemitSequential, AlphaEdit, Emmet, EvoEdit, RLSEdit, Nas, Prune,
              Sphere, Rect, UltraEdit):
    register(_part)
ALIASES.update({"nas": "alphaedit+nas", "prune": "memit-seq+prune", "sphere": "alphaedit+sphere",
                "rect": "memit-seq+rect"})

__all__ = ["ALIASES", "RULES", "TRANSFORMS", "AlphaEdit", "Emmet", "Encore", "EvoEdit",
           "LayerState", "LowRankUpdate", "Memit", "MemitSequential", "Method", "MethodNames",
           "Nas", "Part", "Prune", "RLSEdit", "Rect", "Sphere", "UltraEdit",
           "UpdateContext", "UpdateRule", "UpdateTransform", "ValueContext", "ValueTransform",
           "build_method", "canonical", "eye_like", "get_rule", "null_space_projector",
           "register", "unregister"]
