"""C0 statistics: equal to brute force, cached, refused for another model, resumable."""

from __future__ import annotations

import copy

import pytest
import torch

from encore_fast.models import ModelView
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.stats import (
    StatsCacheError,
    accumulate_second_moments,
    finalize,
    second_moments,
)

LAYERS = [1, 3]


def brute_force(view: ModelView, tokenizer, texts, max_length):
    """Kᵀ K / N over all non-padding tokens, one text at a time, float64, full forward."""
    keys = {l: [] for l in LAYERS}
    hooks = []
    for l in LAYERS:
        hooks.append(view.mlp_out(l).register_forward_pre_hook(
            lambda _m, a, l=l: keys[l].append(a[0][0].double())))
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=max_length)
            view.model(**ids)
    for h in hooks:
        h.remove()
    out = {}
    for l in LAYERS:
        k = torch.cat(keys[l])
        out[l] = k.T @ k / k.shape[0]
    return out


def test_c0_equals_brute_force(tiny, tokenizer, corpus):
    view = ModelView(tiny)
    texts = corpus[:12]
    got = second_moments(view, tokenizer, LAYERS, texts, n_samples=12, max_length=48,
                         fingerprint="x", cache=False, batch_size=5, progress=False)
    want = brute_force(view, tokenizer, texts, 48)
    for l in LAYERS:
        assert got[l].dtype == torch.float32
        assert torch.equal(got[l], got[l].T)
        err = (got[l].double() - want[l]).norm() / want[l].norm()
        assert err < 1e-5, (l, float(err))


def test_cache_hit_refusal_and_resume(tiny, tokenizer, corpus, tmp_path, monkeypatch):
    view = ModelView(tiny)
    fp = model_fingerprint(tiny)
    kw = dict(n_samples=20, max_length=32, fingerprint=fp, model_name="tiny", cache=tmp_path,
              batch_size=4, progress=False)
    first = second_moments(view, tokenizer, LAYERS, corpus, **kw)
    files = sorted(tmp_path.rglob("layer*.safetensors"))
    assert len(files) == len(LAYERS)

    # A second call reads the cache: computing again would fail.
    import encore_fast.stats as stats_mod

    def boom(*a, **k):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(stats_mod, "accumulate_second_moments", boom)
    again = second_moments(view, tokenizer, LAYERS, corpus, **kw)
    for l in LAYERS:
        assert torch.equal(first[l], again[l])
    monkeypatch.undo()

    # Another model of the same name gets its own entry; a file whose header names another
    # model is refused with a clear message.
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        ModelView(other).weight(0).mul_(1.5)
    second_moments(ModelView(other), tokenizer, LAYERS, corpus,
                   **{**kw, "fingerprint": model_fingerprint(other)})
    assert len(sorted(tmp_path.rglob("layer*.safetensors"))) == 2 * len(LAYERS)
    mine = [f for f in files if f"-{fp[:12]}." in f.name][0]
    theirs = [f for f in tmp_path.rglob(f"{mine.name.split('-')[0]}-*.safetensors")
              if model_fingerprint(other)[:12] in f.name][0]
    mine.write_bytes(theirs.read_bytes())
    with pytest.raises(StatsCacheError, match="another model"):
        second_moments(view, tokenizer, LAYERS, corpus, **kw)
    mine.unlink()

    # Interrupted after a checkpoint: resuming gives the uninterrupted result.
    fresh = tmp_path / "resume"
    calls = {"n": 0}
    real = stats_mod.accumulate_second_moments

    def interrupted(*a, **k):
        user_ckpt = k["checkpoint"]

        def ckpt(state):
            user_ckpt(state)
            calls["n"] += 1
            raise KeyboardInterrupt

        return real(*a, **{**k, "checkpoint": ckpt, "checkpoint_every": 2})

    monkeypatch.setattr(stats_mod, "accumulate_second_moments", interrupted)
    with pytest.raises(KeyboardInterrupt):
        second_moments(view, tokenizer, LAYERS, corpus, **{**kw, "cache": fresh})
    monkeypatch.undo()
    partial = list(fresh.rglob("partial-*.safetensors"))
    assert calls["n"] == 1 and len(partial) == 1
    resumed = second_moments(view, tokenizer, LAYERS, corpus, **{**kw, "cache": fresh})
    assert not list(fresh.rglob("partial-*.safetensors"))
    for l in LAYERS:
        assert torch.allclose(resumed[l], first[l], rtol=1e-5, atol=1e-7)


def test_padding_is_excluded(tiny, tokenizer, corpus):
    """Batched with padding equals one-text-at-a-time accumulation."""
    view = ModelView(tiny)
    texts = corpus[:6]
    a = finalize(accumulate_second_moments(view, tokenizer, LAYERS, texts, max_length=40,
                                           batch_size=6, progress=False))
    b = finalize(accumulate_second_moments(view, tokenizer, LAYERS, texts, max_length=40,
                                           batch_size=1, progress=False))
    for l in LAYERS:
        assert torch.allclose(a[l], b[l], rtol=1e-4, atol=1e-6)
