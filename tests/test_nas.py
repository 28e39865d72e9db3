"""NAS (a value transform): its targets against a direct float64 computation, its two
identities, its anchor (trimmed mean, cache, refusal on an edited model), and ``alphaedit+nas``
on a tiny model: both engines, undo, save/load and more batches bit-exact, bf16."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import FAST, counterfact_requests

from encore_fast.config import make_config
from encore_fast.editor import Editor
from encore_fast.errors import ConfigError
from encore_fast.methods import build_method
from encore_fast.methods import nas_anchor as anchor_mod
from encore_fast.methods.nas import anchored
from encore_fast.methods.nas_anchor import trimmed_mean


def _direct(zs, h0, v0, mu, skip):
    """NAS per request, written out: v* = v0 + (z − h0); v0 if ‖v*‖ > skip·μ else μ v*/‖v*‖;
    z = h0 − v0 + v*."""
    out = []
    for z, h, v in zip(zs.tolist(), h0.tolist(), v0.tolist(), strict=True):
        vs = [v_i + z_i - h_i for v_i, z_i, h_i in zip(v, z, h, strict=True)]
        n = sum(x * x for x in vs) ** 0.5
        vs = list(v) if n > skip * mu else [x * mu / n for x in vs]
        out.append([h_i - v_i + s_i for h_i, v_i, s_i in zip(h, v, vs, strict=True)])
    return torch.tensor(out, dtype=torch.float64)


def test_targets_equal_a_direct_float64_computation():
    g = torch.Generator().manual_seed(0)
    zs, h0, v0 = (torch.randn(6, 9, generator=g, dtype=torch.float64) for _ in range(3))
    mu = float((v0 + zs - h0).norm(dim=1).median())
    got = anchored(zs, h0, v0, mu, 1.2)
    assert torch.allclose(got, _direct(zs, h0, v0, mu, 1.2), rtol=0, atol=1e-12)
    norms = (v0 + zs - h0).norm(dim=1)
    assert (norms > 1.2 * mu).any() and (norms <= 1.2 * mu).any()  # (both branches ran)


def test_a_value_at_the_anchor_is_unchanged_and_one_above_twice_keeps_v0():
    g = torch.Generator().manual_seed(1)
    h0, v0, d = (torch.randn(2, 7, generator=g, dtype=torch.float64) for _ in range(3))
    mu = float((v0[0] + d[0]).norm())
    d[1] *= 10 * mu / float((v0[1] + d[1]).norm())  # ‖v*‖ ≈ 10 μ > 2 μ
    zs = h0 + d
    got = anchored(zs, h0, v0, mu, 2.0)
    assert torch.allclose(got[0], zs[0], rtol=0, atol=1e-12)  # ‖v*‖ = μ: nothing changes
    assert torch.allclose(got[1], h0[1], rtol=0, atol=1e-12)  # v* = v0: z = h0, no edit


def test_trimmed_mean_drops_the_top_share():
    norms = torch.arange(1.0, 101.0)
    mu, kept = trimmed_mean(norms, 0.05)
    top = sorted(norms.tolist())
    q = torch.quantile(norms.double(), 0.95).item()
    want = [x for x in top if x <= q]
    assert kept == len(want) == 95 and mu == pytest.approx(sum(want) / len(want))
    assert trimmed_mean(norms, 0.0) == (pytest.approx(50.5), 100)


def test_settings_are_namespaced_and_checked():
    cfg = make_config("alphaedit+nas", None, **{"nas.anchor": 2.5, "skip_factor": 3.0})
    assert cfg.method_settings["nas"]["anchor"] == 2.5
    assert cfg.method_settings["nas"]["skip_factor"] == 3.0
    assert build_method("nas").name == "alphaedit+nas"
    for bad in ({"nas.anchor": -1.0}, {"nas.anchor_samples": 0}, {"nas.anchor_trim": 1.0},
                {"nas.skip_factor": 0}):
        with pytest.raises(ConfigError, match="nas\\."):
            make_config("alphaedit+nas", None, **bad)
    with pytest.raises(ConfigError, match="unknown setting 'nas.anchr'"):
        make_config("alphaedit+nas", None, **{"nas.anchr": 1.0})
    with pytest.raises(ConfigError, match="one update rule"):
        make_config("encore+alphaedit", None)


def _editor(model, tokenizer, corpus, engine="fast", **over):
    return Editor(model, tokenizer, "alphaedit+nas", preset=None, engine=engine, corpus=corpus,
                  stats_cache=False, progress=False, **{**FAST, "alpha": 1.0, **over})


@pytest.fixture
def anchor_file(tmp_path, data_dir):
    records = json.loads((data_dir / "counterfact" / "counterfact-train.json").read_text())
    path = tmp_path / "anchor.json"
    path.write_text(json.dumps(records[100:106]))
    return path


def test_anchor_is_computed_once_cached_and_refused_on_an_edited_model(
        tiny_models, tokenizer, corpus, data_dir, anchor_file, tmp_path, monkeypatch):
    reqs = counterfact_requests(data_dir, 0, 4)
    opts = {"nas.anchor_data": str(anchor_file), "nas.anchor_samples": 5}
    ed = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "nas", preset=None,
                corpus=corpus, stats_cache=tmp_path / "cache", progress=False,
                **{**FAST, "alpha": 1.0, **opts})
    ed.edit(reqs, batch_size=2)
    (cached,) = (tmp_path / "cache" / "anchors").glob("nas-*.json")
    saved = json.loads(cached.read_text())
    assert saved["samples"] == 5 and saved["kept"] == 4 and saved["anchor"] > 0
    # a second editor reads the cache: nothing is optimised for the anchor
    monkeypatch.setattr(anchor_mod, "value_norms", lambda *a: pytest.fail("recomputed"))
    again = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "nas", preset=None,
                   corpus=corpus, stats_cache=tmp_path / "cache", progress=False,
                   **{**FAST, "alpha": 1.0, **opts})
    again.edit(reqs[:2], batch_size=2)
    # an edited model with no cached anchor is refused, naming the way out
    path = tmp_path / "e.safetensors"
    ed.save_edits(path)
    fresh = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "nas", preset=None,
                   corpus=corpus, stats_cache=False, progress=False,
                   **{**FAST, "alpha": 1.0, **opts})
    fresh.load_edits(path)
    with pytest.raises(ConfigError, match="nas.anchor=<value>"):
        fresh.edit(reqs[:1])


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_alphaedit_nas_undo_save_load_bit_exact(tiny_models, tokenizer, corpus, data_dir,
                                                engine, tmp_path):
    reqs = counterfact_requests(data_dir, 0, 6)
    ed = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine,
                 **{"nas.anchor": 1.0})
    ed.edit(reqs[:4], batch_size=2)
    after_one = {l: w.clone() for l, w in _weights(ed).items()}
    ed.undo()
    ed.edit(reqs[2:4], batch_size=2)
    assert all(torch.equal(after_one[l], w) for l, w in _weights(ed).items())
    ed.save_edits(tmp_path / "e.safetensors")
    ed.edit(reqs[4:], batch_size=2)
    loaded = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine,
                     **{"nas.anchor": 1.0})
    loaded.load_edits(tmp_path / "e.safetensors")
    loaded.edit(reqs[4:], batch_size=2)
    assert all(torch.equal(_weights(ed)[l], w) for l, w in _weights(loaded).items())
    plain = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, "alphaedit", preset=None,
                   engine=engine, corpus=corpus, stats_cache=False, progress=False,
                   **{**FAST, "alpha": 1.0})
    plain.edit(reqs, batch_size=2)
    assert not all(torch.equal(_weights(plain)[l], w) for l, w in _weights(ed).items())
    with pytest.raises(Exception, match="alphaedit"):
        plain.reset() or plain.load_edits(tmp_path / "e.safetensors")


def test_alphaedit_nas_in_bf16(tiny_models, tokenizer, corpus, data_dir):
    model = copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16)
    ed = _editor(model, tokenizer, corpus, **{"nas.anchor": 1.0})
    ed.edit(counterfact_requests(data_dir, 0, 4), batch_size=2)
    assert all(bool(torch.isfinite(w).all()) for w in _weights(ed).values())


def _weights(ed):
    return {l: ed.edited_weight(l).detach() for l in ed.hparams.layers}
