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
from encore_fast.values import attention, fast, packing, reference
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


def test_pack_places_every_item_once_within_the_width():
    lengths = [5, 1, 1, 3, 2, 5, 4, 1, 2, 2, 3]
    rows = packing.pack(lengths)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max(lengths) for row in rows)
    # First-fit decreasing fills the gaps: no more rows than twice the lower bound.
    assert len(rows) <= 2 * -(-sum(lengths) // max(lengths))


def _naive_attention(q, k, v, mask, scale):
    """Repeat keys per query head, explicit softmax: what packed_attention must equal."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = torch.softmax((q @ k.transpose(-1, -2)) * scale + mask, -1)
    return (w @ v).transpose(1, 2)


def test_packed_attention_matches_naive_with_fixed_prefix():
    g = torch.Generator().manual_seed(0)
    b, h, h_kv, q_len, p_len, hd = 3, 6, 2, 5, 7, 8
    q = torch.randn(b, h, q_len, hd, generator=g, requires_grad=True)
    k_new = torch.randn(b, h_kv, q_len, hd, generator=g, requires_grad=True)
    v_new = torch.randn(b, h_kv, q_len, hd, generator=g, requires_grad=True)
    k_pre = torch.randn(b, h_kv, p_len, hd, generator=g, requires_grad=True)
    v_pre = torch.randn(b, h_kv, p_len, hd, generator=g, requires_grad=True)
    allowed = torch.rand(b, 1, q_len, p_len + q_len, generator=g) > 0.4
    allowed[..., p_len:] |= torch.eye(q_len, dtype=torch.bool)  # no empty rows
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = torch.nn.Linear(1, 1)
    fixed = attention.Fixed()
    fixed.prefix = {module: (k_pre, v_pre)}
    with _fixed_only(fixed):
        got, _ = attention.packed_attention(module, q, k_new, v_new, mask, scaling=0.3)
    want = _naive_attention(q, torch.cat([k_pre, k_new], 2), torch.cat([v_pre, v_new], 2),
                            mask, 0.3)
    assert torch.allclose(got, want, atol=1e-5)
    got.square().sum().backward()
    assert k_pre.grad is None and v_pre.grad is None  # constants: no gradient computed
    grads = [t.grad.clone() for t in (q, k_new, v_new)]
    for t in (q, k_new, v_new):
        t.grad = None
    want.square().sum().backward()
    for got_g, t in zip(grads, (q, k_new, v_new), strict=True):
        assert torch.allclose(got_g, t.grad, atol=1e-4)


def _fixed_only(fixed):
    """Install a Fixed store for packed_attention without touching any model config."""
    return attention.reading_fixed(fixed)


def test_attention_implementation_restored_and_window_checked(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
        max_position_embeddings=64)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    before = model.config._attn_implementation
    cfg = make_config("encore", None, layers=[1], v_num_grad_steps=2)
    prompts = [build_value_prompts(tokenizer, EditRequest("The mother tongue of {} is",
                                                          "Danielle Darrieux", "English"),
                                   CONTEXTS)]
    with pytest.raises(ValueError, match="sliding attention window"):
        fast.optimize_values(ModelView(model), tokenizer, prompts, 1, cfg)
    assert model.config._attn_implementation == before
    model.config.sliding_window = 4096  # prompts fit: the packed path runs and agrees
    got = fast.optimize_values(ModelView(model), tokenizer, prompts, 1, cfg)
    ref = reference.optimize_values(ModelView(model), tokenizer, prompts, 1, cfg)
    assert _rel(got[0].z, ref[0].z) < 1e-4
    assert model.config._attn_implementation == before


def test_solver_falls_back_to_direct_when_the_inverse_does_not_fit(
        tiny_models, tokenizer, corpus, data_dir, monkeypatch):
    import encore_fast.engines as engines_mod

    def no_room(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.6 GiB")

    settings = dict(layers=[2, 3], v_num_grad_steps=4, stats_samples=16, stats_max_length=32,
                    lambda_p=10.0, lambda_n=1.0)
    eds = {}
    for name in ("woodbury", "fallback"):
        if name == "fallback":
            monkeypatch.setattr(engines_mod, "WoodburySolver", no_room)
        ed = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "encore", preset=None,
                    corpus=corpus, stats_cache=False, progress=False, **settings)
        if name == "fallback":
            with pytest.warns(UserWarning, match="does not fit"):
                ed.edit(_requests(data_dir, 40, 4), batch_size=2)
            assert all(type(s).__name__ == "DirectSolver" for s in ed._solvers.values())
        else:
            ed.edit(_requests(data_dir, 40, 4), batch_size=2)
        eds[name] = ed
    for layer in settings["layers"]:
        assert _rel(eds["fallback"].view.weight(layer), eds["woodbury"].view.weight(layer)) < 1e-5


def test_chunked_value_optimisation_gives_the_same_values(tiny_models, tokenizer, data_dir):
    view = ModelView(copy.deepcopy(tiny_models["llama"]))
    for p in view.model.parameters():
        p.requires_grad_(False)
    cfg = make_config("encore", None, layers=[2, 3], v_num_grad_steps=6, mpes_extra_steps=1,
                      clamp_norm_factor=4.0, v_lr=0.3)
    prompts = [build_value_prompts(tokenizer, r, CONTEXTS) for r in _requests(data_dir, 60, 5)]
    together = fast.optimize_values(view, tokenizer, prompts, 3, cfg)
    one_by_one = fast.optimize_values(view, tokenizer, prompts, 3, cfg, max_tokens=1)
    for a, b in zip(together, one_by_one, strict=True):
        assert _rel(b.z, a.z) < 1e-5 and (a.steps, a.mpes_stopped) == (b.steps, b.mpes_stopped)
    with pytest.raises(ValueError, match="max_tokens"):
        fast.optimize_values(view, tokenizer, prompts, 3, cfg, max_tokens=0)
