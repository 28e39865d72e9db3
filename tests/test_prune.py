"""PRUNE (an update transform of the accumulated edit): against a direct float64 computation,
the identity below ``σ_max(W0)``, and ``memit-seq+prune`` on a tiny model (both engines, undo,
save/load and more batches bit-exact, bf16)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import FAST, counterfact_requests

from encore_fast.editor import Editor
from encore_fast.methods import LayerState, LowRankUpdate, UpdateContext, build_method
from encore_fast.methods.prune import Prune


def _ctx(w0, w):
    state = LayerState(c0=torch.eye(w0.shape[1], dtype=torch.float64))
    return UpdateContext(0, w, w0, state, None, torch.zeros(1, w0.shape[1]))


def test_restrains_the_accumulated_edit_as_written():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 9, generator=g, dtype=torch.float64)
    w = w0 + 2.0 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    upd = LowRankUpdate(3 * torch.randn(5, 3, generator=g, dtype=torch.float64),
                        torch.randn(9, 3, generator=g, dtype=torch.float64))
    got = Prune().apply(upd, _ctx(w0, w))
    new_w = w + got.u @ got.v.T
    # direct: E = W + Δ − W0 = U Σ Vᵀ; σ > σ_max(W0) -> ln σ + σ_max − ln σ_max
    e = w + upd.u @ upd.v.T - w0
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    s_max = float(torch.linalg.svdvals(w0)[0])
    f = torch.tensor([math.log(x) + s_max - math.log(s_max) if x > s_max else x
                      for x in s.tolist()], dtype=torch.float64)
    assert (s > s_max).sum() >= 1 and (s <= s_max).sum() >= 1  # (both branches)
    assert torch.allclose(new_w, w0 + u @ torch.diag(f) @ vh, rtol=0, atol=1e-10)
    assert got.u.shape[1] == 3 + int((s > s_max).sum())


def test_an_edit_below_sigma_max_is_unchanged():
    g = torch.Generator().manual_seed(1)
    w0 = 5 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    upd = LowRankUpdate(0.01 * torch.randn(5, 2, generator=g, dtype=torch.float64),
                        torch.randn(9, 2, generator=g, dtype=torch.float64))
    got = Prune().apply(upd, _ctx(w0, w0.clone()))
    assert got.u is upd.u and got.v is upd.v


def _editor(model, tokenizer, corpus, engine="fast", method="memit-seq+prune"):
    return Editor(model, tokenizer, method, preset=None, engine=engine, corpus=corpus,
                  stats_cache=False, progress=False, **{**FAST, "lambda_p": 0.01})


def _weights(ed):
    return {l: ed.edited_weight(l).detach().clone() for l in ed.hparams.layers}


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_memit_seq_prune_undo_save_load_bit_exact(tiny_models, tokenizer, corpus, data_dir,
                                                  engine, tmp_path):
    reqs = counterfact_requests(data_dir, 0, 6)
    ed = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine)
    ed.edit(reqs[:2], batch_size=2)
    one = _weights(ed)
    ed.edit(reqs[2:4], batch_size=2)
    ed.undo()
    assert all(torch.equal(one[l], w) for l, w in _weights(ed).items())
    ed.edit(reqs[2:4], batch_size=2)
    ed.save_edits(tmp_path / "e.safetensors")
    ed.edit(reqs[4:], batch_size=2)
    loaded = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine)
    loaded.load_edits(tmp_path / "e.safetensors")
    loaded.edit(reqs[4:], batch_size=2)
    assert all(torch.equal(_weights(ed)[l], w) for l, w in _weights(loaded).items())
    # (λ_p tiny: edits large enough that the restraint acted: factors of rank n + k)
    assert any(u.shape[1] > len(b.requests) for b in ed.edit_history.batches
               for u, _, _ in b.factors.values())


def test_memit_seq_prune_in_bf16(tiny_models, tokenizer, corpus, data_dir):
    ed = _editor(copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16), tokenizer, corpus)
    ed.edit(counterfact_requests(data_dir, 0, 4), batch_size=2)
    assert all(bool(torch.isfinite(w).all()) for w in _weights(ed).values())
    assert build_method("prune").name == "memit-seq+prune"
