"""A new method is one class and one registration, in user code: ridge-MEMIT (sequential MEMIT
with ``λ_n I`` in its system, i.e. ENCORE without MPES) defined here alone, run on both engines."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAST, counterfact_requests

from encore_fast.cli import build_parser
from encore_fast.editor import Editor
from encore_fast.errors import ConfigError
from encore_fast.methods import LayerState, MemitSequential, eye_like, register, unregister


class RidgeMemit(MemitSequential):
    """``Δ = R Kᵀ (λ_p C0 + S + λ_n I + K Kᵀ)⁻¹``, no MPES."""

    name = "ridge-memit"

    def base_matrix(self, state: LayerState, cfg) -> torch.Tensor:
        return super().base_matrix(state, cfg) + cfg.lambda_n * eye_like(state.c0)


@pytest.fixture
def ridge():
    register(RidgeMemit)
    yield RidgeMemit
    unregister(RidgeMemit.name)


def _run(model, tokenizer, corpus, reqs, method, engine, **over):
    ed = Editor(copy.deepcopy(model), tokenizer, method, preset=None, engine=engine,
                corpus=corpus, stats_cache=False, progress=False, **{**FAST, **over})
    reports = ed.edit(reqs, batch_size=3)
    return ed, reports


def test_registered_rule_runs_on_both_engines_and_equals_encore_without_mpes(
        ridge, tiny_models, tokenizer, corpus, data_dir):
    model = tiny_models["llama"]
    reqs = counterfact_requests(data_dir, 0, 6)
    ref, _ = _run(model, tokenizer, corpus, reqs, "ridge-memit", "reference")
    fast, fast_reports = _run(model, tokenizer, corpus, reqs, "ridge-memit", "fast")
    enc, enc_reports = _run(model, tokenizer, corpus, reqs, "encore", "fast",
                            mpes_extra_steps=None)
    assert ref.hparams.mpes_extra_steps is None  # the rule says: no MPES by default
    assert not any(m for r in fast_reports for m in r.mpes_stopped)
    for layer in FAST["layers"]:
        w_ref, w_fast = ref.view.weight(layer).detach(), fast.view.weight(layer).detach()
        w0 = ref._original[layer]
        assert float((w_fast - w0 - (w_ref - w0)).norm() / (w_ref - w0).norm()) < 1e-3
        assert torch.allclose(w_fast, enc.view.weight(layer).detach(), rtol=0, atol=1e-6)
    assert [r.steps for r in fast_reports] == [r.steps for r in enc_reports]
    # ... and it is a method like the others: in the CLI's choices
    method = next(a for a in build_parser()._subparsers._actions[-1].choices["edit"]._actions
                  if a.dest == "method")
    assert "ridge-memit" in method.choices


def test_register_refuses_what_is_not_a_rule_or_a_taken_name():
    with pytest.raises(ConfigError, match="UpdateRule, ValueTransform or UpdateTransform subclass"):
        register(object)  # type: ignore[arg-type]

    class Taken(MemitSequential):
        name = "encore"

    with pytest.raises(ConfigError, match="already registered"):
        register(Taken)
