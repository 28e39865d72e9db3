"""Edit settings and the published presets.

One :class:`EditConfig` holds every knob of the MEMIT-family algorithm (docs/design.md §2). Presets
give the papers' settings per model; every field can be overridden by keyword. What the settings
need to know of each method (:class:`MethodSettings`) is told to them by the method registry
(``encore_fast.methods.register``): this module sits below the methods and never imports them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from encore_fast.errors import ConfigError


@dataclass
class EditConfig:
    """All settings of one editing method on one model.

    Value optimisation: ``v_lr`` (Adam), ``v_num_grad_steps`` (iterations; at most n-1 updates),
    ``v_weight_decay``, ``clamp_norm_factor`` (‖δ‖ ≤ factor·‖h0‖), ``kl_factor``,
    ``loss_cutoff``. ``mpes_extra_steps``: ENCORE's early stopping "+k" (None disables MPES).
    Update: ``lambda_p`` (weight of C0), ``lambda_n`` (ENCORE's Frobenius-norm weight),
    ``alpha`` and ``null_space_threshold`` for AlphaEdit (``null_space_relative`` makes the
    threshold a fraction of C0's largest eigenvalue). Statistics: ``stats_samples`` texts of at
    most ``stats_max_length`` tokens. ``method_settings``: the settings a method (or each part
    of a composed one) declares for itself, ``{part: {name: value}}``, filled with its defaults.
    """

    layers: list[int] = field(default_factory=lambda: [4, 5, 6, 7, 8])
    lambda_p: float = 15000.0
    lambda_n: float = 0.0
    mpes_extra_steps: int | None = None
    v_lr: float = 0.5
    v_num_grad_steps: int = 25
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    loss_cutoff: float = 5e-2
    alpha: float = 10.0
    null_space_threshold: float = 2e-2
    null_space_relative: bool = False
    batch_size: int = 100
    stats_samples: int = 10000
    stats_max_length: int = 256
    context_seed: int = 0
    context_words: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10
    max_prompt_length: int = 256
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def replace(self, **overrides: Any) -> EditConfig:
        """A copy with ``overrides`` applied; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; valid: {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def validate(self, num_layers: int | None = None) -> EditConfig:
        """Raise :class:`ConfigError` naming the first setting of the wrong type or range."""
        layers = self.layers
        if (not isinstance(layers, (list, tuple)) or not layers
                or not all(_is_int(x) for x in layers)):
            raise ConfigError(f"layers must be a non-empty list of layer indices, got {layers!r}")
        if sorted(set(layers)) != list(layers):
            raise ConfigError(f"layers must be a non-empty ascending list, got {layers}")
        if num_layers is not None:
            bad = [layer for layer in layers if not 0 <= layer < num_layers]
            if bad:
                raise ConfigError(f"layers {bad} do not exist: the model has {num_layers} layers")
        for name, low in _INT_MIN.items():
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.mpes_extra_steps is not None and (
                not _is_int(self.mpes_extra_steps) or self.mpes_extra_steps < 0):
            raise ConfigError("mpes_extra_steps must be None (no MPES) or an integer >= 0, "
                              f"got {self.mpes_extra_steps!r}")
        for name, positive in _FLOATS.items():
            value = getattr(self, name)
            ok = _is_number(value) and math.isfinite(value) and (
                value > 0 if positive else value >= 0)
            if not ok:
                raise ConfigError(f"{name} must be a finite number {'>' if positive else '>='} "
                                  f"0, got {value!r}")
        if not isinstance(self.null_space_relative, bool):
            raise ConfigError(f"null_space_relative must be true or false, got "
                              f"{self.null_space_relative!r}")
        words = self.context_words
        if isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words):
            raise ConfigError(f"context_words must be a list of non-empty words, got {words!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["context_words"] = list(self.context_words)
        if not d["method_settings"]:
            del d["method_settings"]  # (files of methods without own settings stay as before)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditConfig:
        d = dict(d)
        if "context_words" in d:
            d["context_words"] = tuple(d["context_words"])
        return cls(**d)


_INT_MIN = dict(v_num_grad_steps=1, batch_size=1, stats_samples=1, stats_max_length=2,
                context_seed=0, context_length=1, max_prompt_length=2)
_FLOATS = dict(lambda_p=False, lambda_n=False, v_lr=True, v_weight_decay=False,
               clamp_norm_factor=True, kl_factor=False, loss_cutoff=False, alpha=True,
               null_space_threshold=False)  # name -> must be > 0 (else >= 0)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_LLAMA3 = dict(layers=[4, 5, 6, 7, 8], lambda_p=15000.0, v_lr=0.5, v_weight_decay=0.5,
               clamp_norm_factor=0.75, kl_factor=0.0625, v_num_grad_steps=25,
               stats_samples=10000)
_LLAMA2 = dict(_LLAMA3, stats_samples=100000)
_GPT2XL = dict(layers=[13, 14, 15, 16, 17], lambda_p=20000.0, v_lr=0.5, v_weight_decay=0.5,
               clamp_norm_factor=0.75, kl_factor=0.0625, v_num_grad_steps=20,
               stats_samples=100000)
# SmolLM2-135M: 30 layers, so layers 4-8 sit at the depth of Llama3-8B's 4-8 (of 32).
# Its keys are small (trace C0 ≈ 25-50), so λ_p, λ_n and τ are rescaled; see README "Presets".
_SMOLLM2 = dict(layers=[4, 5, 6, 7, 8], lambda_p=150.0, v_lr=0.5, v_weight_decay=0.5,
                clamp_norm_factor=0.75, kl_factor=0.0625, v_num_grad_steps=25,
                stats_samples=1000, stats_max_length=256, batch_size=50)

# (model preset, method) -> settings. "memit"/"memit-seq" use the MEMIT settings.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "llama3-8b": {
        "encore": dict(_LLAMA3, lambda_n=20.0, mpes_extra_steps=1),
        "memit": dict(_LLAMA3),
        "alphaedit": dict(_LLAMA3, v_lr=0.1, alpha=10.0, null_space_threshold=2e-2),
    },
    "llama2-7b": {
        "encore": dict(_LLAMA2, lambda_n=10.0, mpes_extra_steps=2),
        "memit": dict(_LLAMA2),
        "alphaedit": dict(_LLAMA2, v_lr=0.1, alpha=10.0, null_space_threshold=2e-2),
    },
    "gpt2-xl": {
        "encore": dict(_GPT2XL, lambda_n=10.0, mpes_extra_steps=3),
        "memit": dict(_GPT2XL),
        "alphaedit": dict(_GPT2XL, alpha=10.0, null_space_threshold=2e-2),
    },
    "smollm2-135m": {
        "encore": dict(_SMOLLM2, lambda_n=2.0, mpes_extra_steps=2),
        "memit": dict(_SMOLLM2, lambda_p=150.0),
        "alphaedit": dict(_SMOLLM2, alpha=1.0, null_space_threshold=2e-2),
    },
    # SmolLM2-135M for long streams (thousands of edits): λ_p 5000 / λ_n 20, chosen on
    # counterfact-train.json at 1,000 edits (README "Presets"); AlphaEdit was not tuned for it.
    "smollm2-135m-stream": {
        "encore": dict(_SMOLLM2, lambda_p=5000.0, lambda_n=20.0, mpes_extra_steps=2),
        "memit": dict(_SMOLLM2, lambda_p=5000.0),
        "alphaedit": dict(_SMOLLM2, alpha=1.0, null_space_threshold=2e-2),
    },
}

_NAME_HINTS = [
    ("smollm2-135m", ("smollm2-135m", "smollm2")),
    ("llama3-8b", ("llama-3-8b", "llama-3.1-8b", "llama3-8b", "meta-llama-3-8b")),
    ("llama2-7b", ("llama-2-7b", "llama2-7b")),
    ("gpt2-xl", ("gpt2-xl",)),
]


def guess_preset(model_name: str | None, num_layers: int | None = None) -> str | None:
    """The preset whose name matches ``model_name`` (case-insensitive substring), if any."""
    name = (model_name or "").lower()
    for preset, hints in _NAME_HINTS:
        if any(h in name for h in hints):
            return preset
    return None


def scaled_layers(num_layers: int) -> list[int]:
    """Five consecutive layers at the relative depth of Llama3-8B's 4-8 (of 32)."""
    start = max(1, round(4 * num_layers / 32))
    end = min(num_layers - 1, start + 4)
    return list(range(start, end + 1))


# ----------------------------------------------------------------------------- methods

PRESET_FAMILIES = ("memit", "encore", "alphaedit")
"""The method columns of :data:`PRESETS`: every method starts from one family's settings."""

KINDS = ("rule", "value", "update")
"""What a registered method part is: an update rule, a value transform (``z`` before the rule)
or an update transform (a layer's Δ after it)."""


@dataclass(frozen=True)
class MethodSettings:
    """What the settings know about one registered method part.

    ``preset_family``: the column of :data:`PRESETS` a rule's settings start from (one of
    :data:`PRESET_FAMILIES`); ``mpes``: whether MPES (``mpes_extra_steps``) stays on by default;
    ``kind``: one of :data:`KINDS`; ``own``: the part's own settings and their defaults (they go
    to ``EditConfig.method_settings[name]``); ``presets``: per model preset, values of its own
    settings and of :class:`EditConfig` fields; ``check``: validates its own settings (raises
    :class:`ConfigError`).
    """

    preset_family: str = "memit"
    mpes: bool = False
    kind: str = "rule"
    own: Mapping[str, Any] = field(default_factory=dict)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None


METHODS: dict[str, MethodSettings] = {}
"""Part name -> :class:`MethodSettings`: the method parts :func:`make_config` knows. Filled by
``encore_fast.methods.register`` (which every method, built-in or user-defined, goes through)
and emptied by ``unregister``, so it always names the registered ones. The settings never
import the methods: the methods are built on the settings, and tell them what they need."""


def declare_method(name: str, settings: MethodSettings) -> None:
    """Tell :func:`make_config` about method part ``name`` (replacing what it knew of it)."""
    if settings.preset_family not in PRESET_FAMILIES:
        raise ConfigError(f"method {name!r}: preset family must be one of {PRESET_FAMILIES}, "
                          f"got {settings.preset_family!r}")
    if settings.kind not in KINDS:
        raise ConfigError(f"method {name!r}: kind must be one of {KINDS}, got "
                          f"{settings.kind!r}")
    METHODS[name] = settings


def forget_method(name: str) -> None:
    """Remove method part ``name`` from :data:`METHODS` (nothing happens for an unknown one)."""
    METHODS.pop(name, None)


def method_settings(name: str) -> MethodSettings:
    """What the settings know about method part ``name``; an unknown name is a ConfigError."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


def method_parts(method: str) -> list[str]:
    """The parts of a method name, ``"alphaedit+nas"`` -> ``["alphaedit", "nas"]``: exactly one
    update rule and any transforms, each registered and named once (a ConfigError else)."""
    parts = [p.strip() for p in str(method).split("+")]
    rules = [p for p in parts if p and method_settings(p).kind == "rule"]  # (unknown: raise)
    if "" in parts or len(rules) != 1 or len(set(parts)) != len(parts):
        raise ConfigError(
            f"method {method!r}: write one update rule and any transforms joined by '+', each "
            f"once (rules: {sorted(n for n, m in METHODS.items() if m.kind == 'rule')}; "
            f"transforms: {sorted(n for n, m in METHODS.items() if m.kind != 'rule')})")
    return parts


def make_config(
    method: str, preset: str | None, num_layers: int | None = None, **overrides: Any
) -> EditConfig:
    """Settings for ``method`` from ``preset`` (or generic Llama3-like ones), then overrides.

    Without a preset, the Llama3-8B settings are used at the same relative depth (and the caller
    is told to tune λ_p / λ_n / τ for the model's key scale; see README). ``method`` may be
    composed (``"alphaedit+nas"``): the rule's settings, then each part's preset values and
    own settings; an override ``part.name=value`` sets a part's own setting (a plain ``name``
    does too when exactly one part has it).
    """
    parts = method_parts(method)
    rule = next(p for p in parts if METHODS[p].kind == "rule")
    known = METHODS[rule]
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    settings = dict(PRESETS[preset or "llama3-8b"][known.preset_family])
    if preset is None and num_layers is not None:
        settings["layers"] = scaled_layers(num_layers)
    own = {p: dict(METHODS[p].own) for p in parts}
    for p in parts:
        for key, value in METHODS[p].presets.get(preset or "", {}).items():
            (own[p] if key in own[p] else settings)[key] = value
    cfg = EditConfig().replace(**settings)
    if not known.mpes and "mpes_extra_steps" not in overrides:
        cfg = cfg.replace(mpes_extra_steps=None)
    plain = _route_own(method, own, overrides)
    cfg = cfg.replace(**plain, method_settings={p: v for p, v in own.items() if v})
    if isinstance(cfg.context_words, list):
        cfg = cfg.replace(context_words=tuple(cfg.context_words))
    if isinstance(cfg.layers, tuple):
        cfg = cfg.replace(layers=list(cfg.layers))
    for p in parts:
        if METHODS[p].check is not None:
            METHODS[p].check(own[p])
    return cfg.validate(num_layers)


def _route_own(method: str, own: dict[str, dict[str, Any]],
               overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Put the overrides of the parts' own settings into ``own`` (in place); the rest."""
    fields = {f.name for f in dataclasses.fields(EditConfig)} - {"method_settings"}
    plain = {}
    for key, value in overrides.items():
        part, dot, name = key.rpartition(".")
        if dot:
            if part not in own or name not in own[part]:
                raise ConfigError(f"unknown setting {key!r} for method {method!r} (its parts' "
                                  f"own settings: {_own_names(own)})")
            own[part][name] = value
            continue
        owners = [p for p, names in own.items() if key in names]
        if key in fields or not owners:
            plain[key] = value
        elif len(owners) == 1:
            own[owners[0]][key] = value
        else:
            raise ConfigError(f"setting {key!r} belongs to several parts of {method!r} "
                              f"({owners}); write {owners[0]}.{key}=...")
    unknown = sorted(set(plain) - fields)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} for method {method!r}; valid: "
                          f"{sorted(fields)} and the parts' own settings {_own_names(own)}")
    return plain


def _own_names(own: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return [f"{p}.{n}" for p, names in own.items() for n in names]


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lambda_p=150", "layers=[4,5]"]`` -> ``{"lambda_p": 150, "layers": [4, 5]}``: the one
    parser of ``--set KEY=VALUE`` (VALUE read as JSON when it is JSON, else kept as text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
