"""The settings learn what they need of each method from the method registry (they never import
the methods): registering a rule declares its preset family and MPES default to
``encore_fast.config``, unregistering forgets it, and the two tables name the same methods."""

from __future__ import annotations

import pytest

from encore_fast.config import METHODS, MethodSettings, declare_method, make_config
from encore_fast.errors import ConfigError
from encore_fast.methods import RULES, TRANSFORMS, MemitSequential, register, unregister


class QuietEncore(MemitSequential):
    """ENCORE's settings without MPES (a rule of the "encore" family)."""

    name = "quiet-encore"
    preset = "encore"


class LoudEncore(QuietEncore):
    mpes = True


def test_the_settings_know_exactly_the_registered_methods():
    assert set(METHODS) == set(RULES) | set(TRANSFORMS)
    assert METHODS["encore"] == MethodSettings(preset_family="encore", mpes=True)
    assert METHODS["memit-seq"] == MethodSettings(preset_family="memit", mpes=False)


def test_registration_declares_and_unregistration_forgets():
    register(QuietEncore)
    try:
        assert METHODS["quiet-encore"] == MethodSettings(preset_family="encore", mpes=False)
        cfg = make_config("quiet-encore", "smollm2-135m")
        assert cfg.lambda_n == 2.0 and cfg.mpes_extra_steps is None  # encore's, no MPES
        register(LoudEncore, replace=True)
        assert make_config("quiet-encore", "smollm2-135m").mpes_extra_steps == 2
    finally:
        unregister("quiet-encore")
    assert "quiet-encore" not in METHODS and set(METHODS) == set(RULES) | set(TRANSFORMS)
    with pytest.raises(ConfigError, match=r"unknown method 'quiet-encore'; choose one of \["):
        make_config("quiet-encore", None)


def test_a_method_needs_a_known_preset_family():
    with pytest.raises(ConfigError, match="preset family must be one of"):
        declare_method("odd", MethodSettings(preset_family="rome"))
    assert "odd" not in METHODS
