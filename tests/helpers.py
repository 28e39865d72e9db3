"""Helpers shared by the editor tests: small settings, real CounterFact requests, an editor."""

from __future__ import annotations

import json
from typing import Any

from encore_fast.editor import Editor
from encore_fast.requests import EditRequest

FAST = dict(layers=[2, 3], v_num_grad_steps=4, stats_samples=16, stats_max_length=32,
            lambda_p=10.0, lambda_n=1.0)


def counterfact_requests(data_dir: Any, start: int, n: int) -> list[EditRequest]:
    """``n`` requests of ``counterfact-train.json`` from record ``start`` on."""
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())
    return [EditRequest.from_dict(r) for r in records[start : start + n]]


def small_editor(model: Any, tokenizer: Any, corpus: Any, method: str = "encore",
                 **over: Any) -> Editor:
    """An editor with :data:`FAST` settings (overridable), no cache, no progress bars."""
    return Editor(model, tokenizer, method, preset=None, corpus=corpus, stats_cache=False,
                  progress=False, **{**FAST, **over})
