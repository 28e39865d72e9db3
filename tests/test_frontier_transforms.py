"""SPHERE and RECT, the update transforms: each against a direct float64 implementation of its
equation, their identities, their settings, and every composition run on a tiny model with both
engines (undo, save/load and the masks in the edits file bit-exact, bf16 without error)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAST, counterfact_requests, small_editor

from encore_fast.config import make_config
from encore_fast.errors import ConfigError
from encore_fast.methods import (
    ALIASES,
    LayerState,
    LowRankUpdate,
    MemitSequential,
    Rect,
    Sphere,
    build_method,
    register,
)
from encore_fast.methods.transforms import UpdateContext

# ---------------------------------------------------------------- the equations, directly


def direct_sphere(delta: torch.Tensor, w: torch.Tensor, eta: float, a: float) -> torch.Tensor:
    """``Δ (I − a U Uᵀ)``, U from the full ``d_in × d_in`` eigendecomposition of Ŵᵀ Ŵ / d_out."""
    w_hat = w / w.norm(dim=1, keepdim=True)
    lam, vecs = torch.linalg.eigh(w_hat.T @ w_hat / w.shape[0])
    order = lam.argsort(descending=True)
    lam, vecs = lam[order], vecs[:, order]
    share = lam.cumsum(0) / lam.sum()
    r = next(i + 1 for i in range(len(lam)) if share[i] > eta)
    u = vecs[:, :r]
    return delta @ (torch.eye(w.shape[1], dtype=w.dtype) - a * u @ u.T)


def direct_rect(delta: torch.Tensor, w: torch.Tensor, keep: float) -> torch.Tensor:
    """The mask of the ``round(keep · numel)`` largest ``|Δ / W|`` (W = 0: infinite)."""
    rel = (delta.abs() / w.abs()).flatten()
    mask = torch.zeros(rel.numel(), dtype=torch.bool)
    mask[rel.argsort(descending=True)[: round(keep * rel.numel())]] = True
    return mask.view_as(delta)


def _context(method: str, w: torch.Tensor, w0: torch.Tensor, **own) -> UpdateContext:
    cfg = make_config(method, None, **own)
    state = LayerState(c0=torch.eye(w.shape[1], dtype=torch.float64))
    return UpdateContext(0, w, w0, state, cfg, torch.randn(3, w.shape[1]))


def _factors(d_out: int, d_in: int, dtype=torch.float64) -> LowRankUpdate:
    return LowRankUpdate(torch.randn(d_out, 3, dtype=dtype), torch.randn(d_in, 3, dtype=dtype))


@pytest.mark.parametrize("shape", [(5, 9), (9, 5)])  # (the d_out × d_out Gram, then d_in × d_in)
@pytest.mark.parametrize("weights", ["pretrained", "current"])
def test_sphere_is_its_equation(shape, weights):
    torch.manual_seed(1)
    w0, w = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    for eta, a in ((0.3, 0.5), (0.5, 0.5), (0.9, 1.0), (0.6, 0.2)):
        ctx = _context("alphaedit+sphere", w, w0, **{"sphere.eta": eta, "sphere.a": a,
                                                     "sphere.weights": weights})
        upd = _factors(*shape)
        out = Sphere().apply(upd, ctx)
        assert out.mask is None and torch.equal(out.u, upd.u)  # (still low-rank)
        want = direct_sphere(upd.u @ upd.v.T, w if weights == "current" else w0, eta, a)
        torch.testing.assert_close(out.u @ out.v.T, want, rtol=0, atol=1e-10)


def test_sphere_eta_one_removes_the_rows_span_and_pretrained_is_cached():
    torch.manual_seed(2)
    w0 = torch.randn(5, 9, dtype=torch.float64)
    ctx = _context("alphaedit+sphere", w0.clone(), w0, **{"sphere.eta": 1.0, "sphere.a": 1.0})
    upd = _factors(5, 9)
    out = Sphere().apply(upd, ctx)
    w_hat = w0 / w0.norm(dim=1, keepdim=True)
    want = upd.u @ upd.v.T @ (torch.eye(9, dtype=torch.float64) - torch.linalg.pinv(w_hat) @ w_hat)
    torch.testing.assert_close(out.u @ out.v.T, want, rtol=0, atol=1e-10)
    assert list(ctx.state.cache) == ["sphere:U:1.0"]
    ctx.original = torch.zeros_like(w0)  # (W0 never changes: its directions are not remade)
    assert torch.equal(Sphere().apply(upd, ctx).v, out.v)


def test_sphere_with_a_zero_is_the_identity_and_refuses_a_masked_update():
    torch.manual_seed(3)
    w = torch.randn(5, 9)
    upd = _factors(5, 9, torch.float32)
    out = Sphere().apply(upd, _context("alphaedit+sphere", w, w, **{"sphere.a": 0}))
    assert torch.equal(out.u @ out.v.T, upd.u @ upd.v.T) and out.mask is None
    masked = upd.with_mask(torch.rand(5, 9) > 0.5)
    with pytest.raises(ConfigError, match="before rect"):
        Sphere().apply(masked, _context("alphaedit+sphere", w, w))


@pytest.mark.parametrize("keep", [0.2, 0.4, 0.5, 0.9])
def test_rect_keeps_exactly_the_largest_relative_changes(keep):
    torch.manual_seed(4)
    w = torch.randn(5, 9)
    w[1, 2] = w[3, 7] = 0.0  # (an infinite relative change: kept)
    upd = _factors(5, 9, torch.float32)
    out = Rect().apply(upd, _context("memit-seq+rect", w, w, **{"rect.keep": keep}))
    want = direct_rect(upd.u.double() @ upd.v.double().T, w.double(), keep)
    assert torch.equal(out.mask, want) and int(out.mask.sum()) == round(keep * 45)
    assert out.mask[1, 2] and out.mask[3, 7] and out.u is upd.u and out.v is upd.v
    delta = upd.dense()
    assert torch.equal(out.dense(), torch.where(want, delta, torch.zeros_like(delta)))


def test_rect_kthvalue_is_the_baseline_code_and_keep_one_is_the_identity():
    torch.manual_seed(5)
    w, upd = torch.randn(5, 9), _factors(5, 9, torch.float32)
    out = Rect().apply(upd, _context("memit-seq+rect", w, w, **{"rect.select": "kthvalue"}))
    rel = ((upd.u @ upd.v.T) / (w + 1e-8)).abs()  # (NAS memit_rect_main.py:81-84, 40 %)
    assert torch.equal(out.mask, rel >= rel.flatten().kthvalue(int(45 * 60 / 100)).values)
    assert int(out.mask.sum()) == 45 - 27 + 1  # (one more than the paper's 40 %)
    same = Rect().apply(upd, _context("memit-seq+rect", w, w, **{"rect.keep": 1.0}))
    assert same is upd


def test_settings_overrides_and_bad_values_name_the_setting():
    cfg = make_config("memit-seq+rect", None, **{"rect.keep": 0.2})
    assert cfg.method_settings["rect"] == {"keep": 0.2, "select": "top"}
    cfg = make_config("alphaedit+sphere", None, eta=0.3, **{"sphere.weights": "current"})
    assert cfg.method_settings["sphere"] == {"eta": 0.3, "a": 0.5, "weights": "current"}
    assert make_config("encore+rect", None).method_settings["rect"]["keep"] == 0.4
    for method, key, bad in (("memit-seq+rect", "rect.keep", 0), ("encore+rect", "rect.keep", 1.5),
                             ("memit-seq+rect", "rect.select", "all"),
                             ("alphaedit+sphere", "sphere.eta", 0), ("alphaedit+sphere",
                              "sphere.eta", 1.2), ("alphaedit+sphere", "sphere.a", -0.5),
                             ("alphaedit+sphere", "sphere.weights", "edited")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            make_config(method, None, **{key: bad})


def test_aliases_expand_and_only_clash_with_other_parts():
    assert build_method("sphere").name == "alphaedit+sphere"
    assert build_method("rect").name == "memit-seq+rect"
    assert register(Sphere) is Sphere  # (again: its alias is a composition of it, no clash)

    class Shadow(MemitSequential):
        name = "shadow"

    ALIASES["shadow"] = "memit-seq+rect"
    try:
        with pytest.raises(ConfigError, match="already registered"):
            register(Shadow)
    finally:
        del ALIASES["shadow"]


# ---------------------------------------------------------------- on a tiny model


def _snapshot(ed) -> list[torch.Tensor]:
    """Weights (and masters), S and the Woodbury inverses: what must be bit-exact."""
    out = []
    for layer in ed.hparams.layers:
        out += [ed.view.weight(layer).detach().clone(), ed.edited_weight(layer).detach().clone(),
                ed.layer_states()[layer].seq().clone()]
        solver = ed._solvers.get(layer)
        if solver is not None and hasattr(solver, "inv"):
            out.append(solver.inv.clone())
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def c0(tiny_models, tokenizer, corpus):
    """``C0`` of the tiny Llama, computed once for every editor here."""
    ed = small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus)
    return {l: s.c0.clone() for l, s in ed.layer_states().items()}


CASES = [(m, {}, e) for m in ("alphaedit+sphere", "memit-seq+rect", "encore+rect")
         for e in ("reference", "fast")] + [("alphaedit+sphere", {"sphere.weights": "current"},
                                             "fast")]


@pytest.mark.parametrize("method,own,engine", CASES)
def test_compositions_undo_and_save_load_bit_exact(tiny_models, tokenizer, corpus, data_dir,
                                                   tmp_path, c0, method, own, engine):
    size = 1 if engine == "reference" else 2  # (the reference optimises one request at a time)
    batches = [counterfact_requests(data_dir, size * i, size) for i in range(3)]

    def editor():
        return small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, method,
                            engine=engine, stats=c0, history=None, **own)

    full = editor()
    states = []
    for b in batches:
        full.edit(b)
        states.append(_snapshot(full))
    part = editor()
    part.edit(batches[0])
    part.edit(batches[1])
    assert _same(_snapshot(part), states[1])
    part.undo()
    assert _same(_snapshot(part), states[0])
    part.edit(batches[1])
    path = part.save_edits(tmp_path / "e.safetensors")
    rest = editor()
    assert rest.load_edits(path) == 2 and _same(_snapshot(rest), states[1])
    masked = "rect" in method
    for mine, theirs in zip(rest.edit_history.batches, part.edit_history.batches, strict=True):
        assert sorted(mine.masks) == (sorted(FAST["layers"]) if masked else [])
        assert all(torch.equal(m, theirs.masks[l]) for l, m in mine.masks.items())
    rest.edit(batches[2])
    assert _same(_snapshot(rest), states[2])


@pytest.mark.parametrize("rule,transform", [("memit-seq", "rect"), ("alphaedit", "sphere")])
def test_first_layer_update_is_the_rules_transformed(tiny_models, tokenizer, corpus, data_dir,
                                                      c0, rule, transform):
    """Layer 2 sees the same keys and residuals with or without the transform, so its update is
    the rule's transformed: ``M ⊙ Δ`` (the applied ΔW exactly zero off M), ``Δ (I − a U Uᵀ)``."""
    reqs = counterfact_requests(data_dir, 0, 3)
    eds = [small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, method,
                        engine="reference", stats=c0) for method in (rule, f"{rule}+{transform}")]
    for ed in eds:
        ed.edit(reqs)
    layer = FAST["layers"][0]
    (u, v, _), (u_t, v_t, _) = (ed.edit_history.batches[0].factors[layer] for ed in eds)
    delta, w0 = u.double() @ v.double().T, eds[1].matrices.out_in(layer, original=True)
    if transform == "rect":
        mask = eds[1].edit_history.batches[0].masks[layer]
        assert torch.equal(u_t, u) and torch.equal(v_t, v)
        assert torch.equal(mask, direct_rect(delta, w0.double(), 0.4))
        applied = eds[1].matrices.out_in(layer) - w0
        assert torch.all(applied[~mask] == 0) and torch.all(applied[mask] != 0)
    else:
        want = direct_sphere(delta, w0.double(), 0.5, 0.5)
        got = u_t.double() @ v_t.double().T
        assert float((got - want).norm() / want.norm()) < 1e-5 < float((got - delta).norm())


@pytest.mark.parametrize("method", ["alphaedit+sphere", "memit-seq+rect", "encore+rect"])
def test_bf16_runs(tiny_models, tokenizer, corpus, data_dir, c0, method):
    ed = small_editor(copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16), tokenizer, corpus,
                      method, stats=c0)
    reports = ed.edit(counterfact_requests(data_dir, 0, 4), batch_size=2)
    assert len(reports) == 2 and all(torch.isfinite(ed.view.weight(l)).all()
                                     for l in ed.hparams.layers)
    ed.undo()
    assert ed.num_batches == 1
