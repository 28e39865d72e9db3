"""The public surface stays put across refactors: the packages' exported names, the Editor's
public methods and constructor, and every CLI subcommand's flags (with their defaults), against
``tests/data/public_surface.json`` (recorded before a refactor; ``ENCORE_FAST_RECORD_SURFACE=1``
writes it anew). New names and flags may be added; none may go or change."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
from pathlib import Path

from encore_fast.cli import build_parser
from encore_fast.editor import Editor

SURFACE = Path(__file__).parent / "data" / "public_surface.json"
PACKAGES = ("encore_fast", "encore_fast.eval", "encore_fast.methods", "encore_fast.models")


def current() -> dict:
    out: dict = {"exports": {}, "editor": {}, "cli": {}}
    for name in PACKAGES:
        out["exports"][name] = sorted(importlib.import_module(name).__all__)
    for name, member in inspect.getmembers(Editor):
        if not name.startswith("_") or name == "__init__":
            out["editor"][name] = str(inspect.signature(member)) if callable(member) else "attr"
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sorted(sub.choices.items()):
        flags = {}
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            key = "/".join(action.option_strings) or action.dest
            choices = sorted(action.choices) if action.choices else None
            flags[key] = {"default": repr(action.default), "choices": choices}
        out["cli"][command] = flags
    return out


def test_public_surface_is_unchanged():
    now = current()
    if os.environ.get("ENCORE_FAST_RECORD_SURFACE") == "1":
        SURFACE.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    was = json.loads(SURFACE.read_text())
    for pkg, names in was["exports"].items():
        assert set(names) <= set(now["exports"][pkg]), (pkg, set(names) - set(now["exports"][pkg]))
    for name, sig in was["editor"].items():
        assert now["editor"].get(name) == sig, name
    for command, flags in was["cli"].items():
        for flag, spec in flags.items():
            got = now["cli"][command].get(flag)
            assert got is not None, f"{command} {flag} is gone"
            assert got["default"] == spec["default"], (command, flag)
            if spec["choices"] is not None:  # (methods may be added by the registry)
                assert set(spec["choices"]) <= set(got["choices"] or ()), (command, flag)
