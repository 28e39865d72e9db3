"""Helpers shared by the editor tests: small settings, real CounterFact requests, an editor."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from encore_fast.editor import Editor
from encore_fast.paths import data_folders
from encore_fast.requests import EditRequest

FAST = dict(layers=[2, 3], v_num_grad_steps=4, stats_samples=16, stats_max_length=32,
            lambda_p=10.0, lambda_n=1.0)


def counterfact_requests(data_dir: Any, start: int, n: int) -> list[EditRequest]:
    """``n`` requests of ``counterfact-train.json`` from record ``start`` on."""
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())
    return [EditRequest.from_dict(r) for r in records[start : start + n]]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as module ``name`` (registered in ``sys.modules``, where
    dataclasses look their module up; the caller pops it when done)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def small_editor(model: Any, tokenizer: Any, corpus: Any, method: str = "encore",
                 **over: Any) -> Editor:
    """An editor with :data:`FAST` settings (overridable), no cache, no progress bars."""
    return Editor(model, tokenizer, method, preset=None, corpus=corpus, stats_cache=False,
                  progress=False, **{**FAST, **over})


DATA_SKIP = "needs the data sets"  # (the reason's start: the terminal summary counts these)
NEEDED = ("counterfact/counterfact-train.json", "counterfact/counterfact-edit.json",
          "wikitext-2/valid.txt", "known_1000.json", "zsre/zsre_mend_train-1k.json")


def need_data(what: str) -> None:
    """Skip (or, with ENCORE_FAST_REQUIRE_DATA=1, fail) a test that needs data not here."""
    message = (f"{DATA_SKIP}: {what} not found ($ENCORE_FAST_DATA, a data folder beside the "
               "checkout, or the download cache)")
    if os.environ.get("ENCORE_FAST_REQUIRE_DATA") == "1":
        pytest.fail(message + "; ENCORE_FAST_REQUIRE_DATA=1 forbids skipping", pytrace=False)
    pytest.skip(message)


def find_data_dir() -> Path | None:
    """The first data folder (see ``encore_fast.paths.data_folders``) with the files the
    tests read."""
    for folder in data_folders():
        if all((folder / rel).exists() for rel in NEEDED):
            return folder
    return None
