"""UltraEdit: its update against a direct float64 computation, its normaliser against the
official update written out, its gradients against finite differences, and the method on tiny
models (gate and up projections edited; undo, save/load and more batches bit-exact, bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import counterfact_requests

from encore_fast.editor import Editor
from encore_fast.errors import ConfigError
from encore_fast.methods.normaliser import EPS, fold, record
from encore_fast.methods.ultraedit import site_update
from encore_fast.models.arch import ModelView
from encore_fast.values.gradients import _sequences, answer_rows


class CodeNormaliser:
    """The official running mean/std, written out (n, mean, var, std; var += m·var_b + ...)."""

    def __init__(self, width):
        self.n, self.mean = 0.0, [0.0] * width
        self.var, self.std = [0.0] * width, [0.0] * width

    def update(self, rows):
        m = len(rows)
        n = self.n + m
        for j in range(len(self.mean)):
            col = [r[j] for r in rows]
            mu = sum(col) / m
            vb = sum((x - mu) ** 2 for x in col) / (m - 1)
            d = mu - self.mean[j]
            self.mean[j] += m * d / n
            self.var[j] += m * vb + self.n * m * d * d / n
            self.std[j] = (self.var[j] / (n - 1 + EPS)) ** 0.5
        self.n = n


def test_normaliser_folds_as_the_official_code():
    g = torch.Generator().manual_seed(0)
    code, state = CodeNormaliser(5), {}
    for m in (4, 7, 3):
        rows = torch.randn(m, 5, generator=g, dtype=torch.float64) * 3 + 1
        code.update(rows.tolist())
        state = fold(state, record(rows))
    assert float(state["n"]) == code.n
    f64 = torch.float64
    assert torch.allclose(state["mean"].double(), torch.tensor(code.mean, dtype=f64), atol=1e-5)
    assert torch.allclose(state["std"].double(), torch.tensor(code.std, dtype=f64), atol=1e-5)


def test_update_equals_a_direct_float64_computation():
    g = torch.Generator().manual_seed(1)
    prior = {}
    for _ in range(2):  # (a batch after a first one: the normaliser carries over)
        k = torch.randn(6, 4, generator=g)
        grad = torch.randn(6, 3, generator=g) * 1e-3
        rec, upd = site_update(k, grad, prior, lr=0.7)
        st = fold(prior, rec)
        z = (torch.cat([k, grad], 1).double() - st["mean"].double()) / (st["std"].double() + EPS)
        k_hat, g_hat = z[:, :4], z[:, 4:]
        v = -0.7 * (k_hat ** 2).sum(1, keepdim=True) * g_hat  # [N, d_out]
        k64 = k.double()
        want = (torch.linalg.solve(k64.T @ k64 + torch.eye(4, dtype=torch.float64),
                                   k64.T @ v)).T  # the code's d_in × d_in form
        assert torch.allclose((upd.u.double() @ upd.v.double().T), want, rtol=1e-4, atol=1e-7)
        prior = st


def test_gradients_are_those_of_the_answer_loss(tiny_models, tokenizer, data_dir):
    model = copy.deepcopy(tiny_models["llama"]).double()
    view = ModelView(model)
    reqs = counterfact_requests(data_dir, 0, 2)
    site = "mlp_up.2"
    k, g = answer_rows(view, tokenizer, reqs, [site], group_size=2)[site]
    seqs, answers = _sequences(tokenizer, reqs)
    assert k.shape[0] == sum(len(t) for _, t in answers)

    def loss(bump_row: int, eps: float) -> float:
        """The answer tokens' mean NLL with ``eps`` added to the module output's first entry
        at one answer row (a plain forward per request)."""
        pos = [(b, p + j) for b, (p, t) in enumerate(answers) for j in range(len(t))]
        at, total, count = pos[bump_row], 0.0, 0
        for b, (p, targets) in enumerate(answers):
            def bump(_m, _a, out, b=b):
                if b == at[0]:
                    out = out.clone()
                    out[0, at[1], 0] += eps
                return out
            handle = view.linear(site).register_forward_hook(bump)
            try:
                logp = model(input_ids=torch.tensor([seqs[b]])).logits[0].log_softmax(-1)
            finally:
                handle.remove()
            for j, tok in enumerate(targets):
                total -= float(logp[p + j, tok])
                count += 1
        return total / count

    with torch.no_grad():
        for row in (0, k.shape[0] - 1):
            # (a central difference with a step the model's fp32 rotary tables do not drown)
            fd = (loss(row, 1e-3) - loss(row, -1e-3)) / 2e-3
            assert fd == pytest.approx(float(g[row, 0]), rel=1e-2, abs=1e-6)


def _editor(model, tokenizer, **over):
    sites = {"gate_layers": [1], "up_layers": [2, 3]} if model.config.model_type == "llama" \
        else {"gate_layers": [], "up_layers": [1, 2]}
    return Editor(model, tokenizer, "ultraedit", preset=None, stats_cache=False, progress=False,
                  **{**sites, "lr": 1e-2, "group_size": 3, **over})


def _weights(ed):
    return {s: ed.edited_weight(s).detach().clone() for s in ed.sites}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_undo_save_load_bit_exact(tiny_models, tokenizer, data_dir, kind, tmp_path):
    reqs = counterfact_requests(data_dir, 0, 12)
    ed = _editor(copy.deepcopy(tiny_models[kind]), tokenizer)
    w0 = _weights(ed)
    ed.edit(reqs[:4], batch_size=4)
    one = _weights(ed)
    assert all(not torch.equal(one[s], w0[s]) for s in ed.sites)  # every site edited
    ed.edit(reqs[4:8], batch_size=4)
    ed.undo()
    assert all(torch.equal(one[s], w) for s, w in _weights(ed).items())
    ed.edit(reqs[4:8], batch_size=4)
    ed.history = 1  # (the first batch as a base: its normaliser saved as state)
    ed.save_edits(tmp_path / "e.safetensors")
    ed.edit(reqs[8:], batch_size=4)
    loaded = _editor(copy.deepcopy(tiny_models[kind]), tokenizer)
    loaded.load_edits(tmp_path / "e.safetensors")
    loaded.edit(reqs[8:], batch_size=4)
    assert all(torch.equal(_weights(ed)[s], w) for s, w in _weights(loaded).items())
    assert float(loaded.layer_states()[ed.sites[0]].extra["n"]) > 0


def test_bf16_and_clear_errors(tiny_models, tokenizer, data_dir):
    ed = _editor(copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16), tokenizer)
    ed.edit(counterfact_requests(data_dir, 0, 4), batch_size=4)
    assert all(bool(torch.isfinite(w).all()) for w in _weights(ed).values())
    with pytest.raises(ConfigError, match="cannot edit 'mlp_gate.1'"):
        _editor(copy.deepcopy(tiny_models["gpt2"]), tokenizer, gate_layers=[1])
    with pytest.raises(ConfigError, match="ultraedit.lr"):
        _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, lr=0)


def test_gguf_names_of_the_edited_sites():
    from encore_fast.export import gguf_name

    assert gguf_name(4) == "blk.4.ffn_down.weight"
    assert gguf_name("mlp_gate.10") == "blk.10.ffn_gate.weight"
    assert gguf_name("mlp_up.17") == "blk.17.ffn_up.weight"
    with pytest.raises(ConfigError, match="no GGUF tensor"):
        gguf_name("attn_out.3")


def test_weight_snapshots_hold_the_edited_sites(tiny_models, tokenizer, data_dir, tmp_path):
    from encore_fast.eval.snapshots import load_snapshot, save_snapshot

    ed = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer)
    ed.edit(counterfact_requests(data_dir, 0, 3), batch_size=3)
    save_snapshot(ed, tmp_path / "w.safetensors", {"edits_done": 3})
    fresh = copy.deepcopy(tiny_models["llama"])
    load_snapshot(fresh, tmp_path / "w.safetensors", ed.fingerprint)
    for site in ed.sites:
        assert torch.equal(ModelView(fresh).weight(site), ed.view.weight(site))
