"""The fast engine computes the same edits as the reference engine."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from encore_fast.config import make_config
from encore_fast.editor import Editor
from encore_fast.methods import LayerState, get_rule
from encore_fast.methods.solver import WoodburySolver
from encore_fast.models import ModelView
from encore_fast.requests import EditRequest
from encore_fast.values import fast, reference
from encore_fast.values.prompts import build_value_prompts

CONTEXTS = ["{}", "Once upon a time. {}", "I think. {}"]


def _requests(data_dir, start, n):
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())
    return [EditRequest.from_dict(r) for r in records[start : start + n]]


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def test_values_match_reference(tiny, tokenizer, data_dir):
    view = ModelView(tiny)
    reqs = _requests(data_dir, 0, 4) + [
        EditRequest("{} is a", "Microsoft", "fruit"),  # subject first: empty prefix rows
        EditRequest("The mother tongue is {}", "Danielle Darrieux", "English"),
    ]
    cfg = make_config("encore", None, layers=[2, 3], v_num_grad_steps=10, mpes_extra_steps=1,
                      clamp_norm_factor=4.0, v_lr=0.3)
    prompts = [build_value_prompts(tokenizer, r, CONTEXTS) for r in reqs]
    for p in view.model.parameters():
        p.requires_grad_(False)
    ref = reference.optimize_values(view, tokenizer, prompts, 3, cfg)
    got = fast.optimize_values(view, tokenizer, prompts, 3, cfg)
    assert any(r.mpes_stopped for r in ref) and not all(r.mpes_stopped for r in ref)
    for r, g in zip(ref, got, strict=True):
        assert _rel(g.z, r.z) < 1e-4
        assert torch.allclose(g.h0, r.h0, rtol=1e-5, atol=1e-6)
        assert (g.steps, g.updates, g.mpes_stopped) == (r.steps, r.updates, r.mpes_stopped)
        assert g.loss_history == pytest.approx(r.loss_history, rel=1e-4)


@pytest.mark.parametrize("method", ["encore", "memit", "memit-seq", "alphaedit"])
def test_woodbury_matches_direct_solve(method):
    g = torch.Generator().manual_seed(0)
    d, n = 31, 6
    k0 = torch.randn(d, 300, generator=g, dtype=torch.float64)
    c0 = k0 @ k0.T / 300
    cfg = make_config(method, None, layers=[0], lambda_p=2.0, lambda_n=0.5, alpha=0.7,
                      null_space_threshold=0.3, null_space_relative=True)
    rule = get_rule(method)
    ref_state, fast_state = LayerState(c0=c0.clone()), LayerState(c0=c0.clone())
    solver = WoodburySolver(rule, fast_state, cfg, check_every=2)
    for _ in range(5):
        keys = torch.randn(d, n, generator=g, dtype=torch.float64)
        resid = torch.randn(d // 2, n, generator=g, dtype=torch.float64)
        want = rule.solve(keys, resid, ref_state, cfg)
        got = solver.solve(keys, resid)
        assert _rel(got, want) < 1e-9
        rule.after_batch(keys, ref_state)
        rule.after_batch(keys, fast_state)
        solver.after_batch()
    assert solver.drift() < 1e-10
    # A corrupted inverse is detected and recomputed.
    solver.inv.mul_(1.01)
    assert solver.check_drift() and solver.refactorisations == 1 and solver.drift() < 1e-10


@pytest.mark.parametrize("method", ["encore", "memit", "alphaedit"])
def test_three_batches_match_reference(tiny_models, tokenizer, corpus, data_dir, method):
    model = tiny_models["llama"]
    settings = dict(layers=[2, 3], v_num_grad_steps=6, stats_samples=16, stats_max_length=32,
                    lambda_p=10.0, lambda_n=1.0, null_space_threshold=0.5,
                    null_space_relative=True)
    eds = {}
    for engine in ("reference", "fast"):
        ed = Editor(copy.deepcopy(model), tokenizer, method, preset=None, engine=engine,
                    corpus=corpus, stats_cache=False, progress=False, **settings)
        ed.edit(_requests(data_dir, 20, 9), batch_size=3)
        eds[engine] = ed
    for layer in settings["layers"]:
        w_ref = eds["reference"].view.weight(layer)
        w_fast = eds["fast"].view.weight(layer)
        w0 = eds["reference"]._original[layer]
        assert not torch.equal(w_ref, w0)
        assert _rel(w_fast, w_ref) < 1e-4
        assert _rel(w_fast - w0, w_ref - w0) < 1e-3  # the edits themselves agree too
