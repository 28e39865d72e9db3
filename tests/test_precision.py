"""bf16 models with fp32 master weights: updates accumulate in fp32, the model holds them
rounded once; without masters the rounding piles up."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from encore_fast.editor import Editor
from encore_fast.models import ModelView
from encore_fast.requests import EditRequest

FAST = dict(layers=[2, 3], v_num_grad_steps=3, stats_samples=16, stats_max_length=32,
            lambda_p=10.0, lambda_n=1.0)
N_BATCHES = 20


def _requests(data_dir, n: int) -> list[EditRequest]:
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())
    return [EditRequest.from_dict(r) for r in records[:n]]


@pytest.fixture(scope="module")
def bf16_runs(tiny_models, tokenizer, corpus, data_dir, tmp_path_factory):
    """20 sequential batches of 2 on a tiny bf16 Llama with masters, and the applied Σ U Vᵀ."""
    model = copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16)
    ed = Editor(model, tokenizer, preset=None, corpus=corpus, stats_cache=False, progress=False,
                **FAST)
    assert ed.master_weights
    w0 = {l: ed.view.weight(l).detach().float().clone() for l in FAST["layers"]}
    reqs = _requests(data_dir, 2 * N_BATCHES)
    for b in range(N_BATCHES):
        ed.edit(reqs[2 * b : 2 * b + 2])
        if b == N_BATCHES - 2:
            before_last = {l: m.clone() for l, m in ed.matrices.masters.items()}
    total = {l: torch.zeros_like(w) for l, w in w0.items()}
    for batch in ed.edit_history.batches:
        for l, (u, v, _k) in batch.factors.items():
            total[l] += u.float() @ v.float().T  # fp32 accumulation of the applied updates
    path = ed.save_edits(tmp_path_factory.mktemp("bf16") / "edits.safetensors")
    return ed, w0, total, before_last, path, model


def test_masters_hold_the_fp32_sum_and_the_model_their_rounding(bf16_runs):
    ed, w0, total, _, _, _ = bf16_runs
    for l in FAST["layers"]:
        master, weight = ed.matrices.masters[l], ed.view.weight(l).detach()
        assert weight.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(weight, master.to(torch.bfloat16))
        exact = w0[l] + total[l]
        assert float((master - exact).abs().max()) <= 1e-6 * float(exact.abs().max())
        assert ed.weight_norms()[l] == pytest.approx(float(master.norm()), rel=1e-6)


def test_without_masters_the_rounding_piles_up(bf16_runs, tokenizer, corpus):
    ed, w0, total, _, path, model = bf16_runs
    fresh = copy.deepcopy(model)
    for l in FAST["layers"]:  # back to the original weights
        ModelView(fresh).weight(l).data.copy_(w0[l])
    off = Editor(fresh, tokenizer, preset=None, corpus=corpus, stats_cache=False,
                 progress=False, master_weights=False, **FAST)
    assert not off.master_weights
    off.load_edits(path)  # the very same 20 updates, each added to the bf16 weight
    for l in FAST["layers"]:
        exact = w0[l] + total[l]
        err_on = float((ed.view.weight(l).detach().float() - exact).norm())
        err_off = float((off.view.weight(l).detach().float() - exact).norm())
        print(f"layer {l}: |W - exact| masters {err_on:.3g}, without {err_off:.3g}")
        assert err_off > 1.5 * err_on, (l, err_on, err_off)


def test_undo_and_load_are_exact_on_the_masters(bf16_runs, tokenizer, corpus):
    ed, w0, _, before_last, path, model = bf16_runs
    fresh = copy.deepcopy(model)
    for l in FAST["layers"]:
        ModelView(fresh).weight(l).data.copy_(w0[l])
    loaded = Editor(fresh, tokenizer, preset=None, corpus=corpus, stats_cache=False,
                    progress=False, **FAST)
    loaded.load_edits(path)
    for l in FAST["layers"]:
        assert torch.equal(loaded.matrices.masters[l], ed.matrices.masters[l])
        assert torch.equal(loaded.view.weight(l), ed.view.weight(l))
    loaded.undo()
    for l in FAST["layers"]:
        assert torch.equal(loaded.matrices.masters[l], before_last[l])
        assert torch.equal(loaded.view.weight(l), before_last[l].to(torch.bfloat16))
