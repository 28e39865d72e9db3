"""Update rules: MEMIT, sequential MEMIT, ENCORE and AlphaEdit on shared machinery, and the
registry every list of methods comes from (the CLI's choices, the presets, the editor)."""

from encore_fast.config import PRESET_FAMILIES, MethodSettings, declare_method, forget_method
from encore_fast.errors import ConfigError
from encore_fast.methods.alphaedit import AlphaEdit, null_space_projector
from encore_fast.methods.base import LayerState, UpdateRule, eye_like
from encore_fast.methods.encore import Encore
from encore_fast.methods.memit import Memit, MemitSequential

RULES: dict[str, type[UpdateRule]] = {}


def register(rule: type[UpdateRule], *, replace: bool = False) -> type[UpdateRule]:
    """Make ``rule`` (an :class:`UpdateRule` subclass) available as ``method=rule.name``
    everywhere; usable as a class decorator. A taken name needs ``replace=True``. The settings
    (``encore_fast.config``) learn the rule's preset family and MPES default here."""
    if not (isinstance(rule, type) and issubclass(rule, UpdateRule)):
        raise ConfigError(f"register() expects an UpdateRule subclass, got {rule!r}")
    name = rule.name
    if not isinstance(name, str) or not name or name == UpdateRule.name:
        raise ConfigError(f"{rule.__name__} needs a name (class attribute 'name')")
    if rule.preset not in PRESET_FAMILIES:
        raise ConfigError(f"{rule.__name__}.preset must be one of {PRESET_FAMILIES}, got "
                          f"{rule.preset!r}")
    if name in RULES and RULES[name] is not rule and not replace:
        raise ConfigError(f"a method called {name!r} is already registered "
                          f"({RULES[name].__name__}); pass replace=True to replace it")
    declare_method(name, MethodSettings(preset_family=rule.preset, mpes=bool(rule.mpes)))
    RULES[name] = rule
    return rule


def unregister(name: str) -> None:
    """Remove a registered method (for user code and tests), from the settings too."""
    RULES.pop(name, None)
    forget_method(name)


def get_rule(name: str) -> UpdateRule:
    """The update rule called ``name``."""
    try:
        return RULES[name]()
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(RULES)}") from None


for _rule in (Encore, Memit, MemitSequential, AlphaEdit):
    register(_rule)

__all__ = ["RULES", "AlphaEdit", "Encore", "LayerState", "Memit", "MemitSequential",
           "UpdateRule", "eye_like", "get_rule", "null_space_projector", "register",
           "unregister"]
