"""EMMET, EvoEdit and RLSEdit: each rule's ``V`` against its equation written out here in float64,
batch after batch with the state carried over; the identities that tie them to their neighbours;
and each method on a tiny model, with both engines: undo and save/load continue bit for bit."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from helpers import counterfact_requests, small_editor
from safetensors import safe_open

from encore_fast.config import make_config
from encore_fast.errors import ConfigError
from encore_fast.methods import LayerState, get_rule
from encore_fast.methods.solver import WoodburySolver

D_IN, D_OUT = 7, 5
F64 = torch.float64


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _c0(g: torch.Generator, d: int = D_IN, null: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``C0`` whose first ``null`` eigenvalues are below 10⁻³ (the rest 0.5-2.5), and its
    eigenvectors."""
    q, _ = torch.linalg.qr(_rand(g, d, d))
    ev = torch.cat([1e-4 * torch.rand(null, generator=g, dtype=F64),
                    0.5 + 2 * torch.rand(d - null, generator=g, dtype=F64)])
    return q @ torch.diag(ev) @ q.T, q


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


# ----------------------------------------------------------------------------- EMMET

def test_emmet_is_its_equation_batch_after_batch():
    g = torch.Generator().manual_seed(0)
    c0, _ = _c0(g)
    cfg = make_config("emmet", None, layers=[0], lambda_p=2.0, lambda_u=0.3, lambda_e=0.2)
    rule, state = get_rule("emmet"), LayerState(c0=c0.clone())
    s = torch.zeros(D_IN, D_IN, dtype=F64)
    for n in (3, 2, 1, 3):
        keys, resid = _rand(g, D_IN, n), _rand(g, D_OUT, n)
        c_inv = torch.linalg.inv(2.0 * c0 + 0.3 * _eye(D_IN) + s)
        lam_e = 0.2 if n > 1 else 0.0  # a single edit keeps the hard equality
        want = resid @ torch.linalg.inv(keys.T @ c_inv @ keys + lam_e * _eye(n)) @ keys.T @ c_inv
        assert _rel(resid @ rule.solve(keys, resid, state, cfg).T, want) < 1e-10
        rule.after_batch(keys, state, cfg)
        s = s + keys @ keys.T
        assert torch.allclose(state.seq(), s, rtol=0, atol=1e-12)


def test_emmet_with_lambda_e_one_is_memit_seq():
    """``R (Kᵀ C⁻¹ K + I)⁻¹ Kᵀ C⁻¹ = R Kᵀ (C + K Kᵀ)⁻¹``: at λ_e = 1, λ_u = 0 (the setting its
    SmolLM2 tuning chose) EMMET's update is MEMIT-seq's, batch after batch."""
    g = torch.Generator().manual_seed(3)
    c0, _ = _c0(g)
    rules = {m: (get_rule(m), LayerState(c0=c0.clone()),
                 make_config(m, None, layers=[0], lambda_p=2.0, **over))
             for m, over in (("emmet", {"lambda_e": 1.0}), ("memit-seq", {}))}
    for n in (3, 2, 4):
        keys, resid = _rand(g, D_IN, n), _rand(g, D_OUT, n)
        (ue, se, ce), (um, sm, cm) = rules.values()
        assert _rel(ue.solve(keys, resid, se, ce), um.solve(keys, resid, sm, cm)) < 1e-10
        ue.after_batch(keys, se, ce)
        um.after_batch(keys, sm, cm)


def test_emmet_equality_constraints():
    g = torch.Generator().manual_seed(1)
    c0, _ = _c0(g)
    state = LayerState(c0=c0)
    rule = get_rule("emmet")
    keys, resid = _rand(g, D_IN, 3), _rand(g, D_OUT, 3)

    def delta(k, r, **over):
        cfg = make_config("emmet", None, layers=[0], lambda_p=1.5, **over)
        return r @ rule.solve(k, r, state, cfg).T

    # λ_e -> 0: the batch's edits hold as equalities, (W + Δ) K = W K + R
    assert _rel(delta(keys, resid, lambda_e=1e-9) @ keys, resid) < 1e-6
    assert _rel(delta(keys, resid, lambda_e=0.5) @ keys, resid) > 1e-3  # (relaxed)
    # one edit: Δ = r kᵀC⁻¹ / (kᵀC⁻¹k), exactly, whatever λ_e
    k, r = keys[:, :1], resid[:, :1]
    c_inv_k = torch.linalg.solve(1.5 * c0, k)
    d = delta(k, r, lambda_e=0.5)
    assert _rel(d, r @ c_inv_k.T / (k.T @ c_inv_k)) < 1e-12
    assert _rel(d @ k, r) < 1e-12
    # ... unless single_equality is off: Δk = r kᵀC⁻¹k / (kᵀC⁻¹k + λ_e)
    kck = float(k.T @ c_inv_k)
    assert _rel(delta(k, r, lambda_e=0.5, single_equality=False) @ k,
                r * kck / (kck + 0.5)) < 1e-12


def test_emmet_woodbury_solver_equals_its_direct_solve():
    g = torch.Generator().manual_seed(2)
    c0, _ = _c0(g, 11)
    cfg = make_config("emmet", None, layers=[0], lambda_p=0.7, lambda_u=0.05, lambda_e=0.3)
    rule = get_rule("emmet")
    ref, fast = LayerState(c0=c0.clone()), LayerState(c0=c0.clone())
    solver = WoodburySolver(rule, fast, cfg, check_every=2)
    for n in (3, 1, 2, 4, 1, 3):
        keys, resid = _rand(g, 11, n), _rand(g, D_OUT, n)
        assert _rel(solver.solve(keys, resid), rule.solve(keys, resid, ref, cfg)) < 1e-9
        rule.after_batch(keys, ref, cfg)
        solver.commit(keys)
    assert torch.equal(ref.seq(), fast.seq()) and solver.drift() < 1e-10


def test_emmet_settings_and_preset():
    cfg = make_config("emmet", "llama3-8b")
    assert cfg.layers == [5] and cfg.lambda_p == 1e5 and cfg.mpes_extra_steps is None
    assert cfg.method_settings["emmet"] == {"lambda_u": 0.0, "lambda_e": 0.1,
                                            "single_equality": True}
    for bad in (dict(lambda_e=-0.1), dict(lambda_u="1"), dict(lambda_u=float("nan")),
                dict(single_equality=1)):
        with pytest.raises(ConfigError, match="emmet"):
            make_config("emmet", None, **bad)


# ----------------------------------------------------------------------------- EvoEdit

def _evo_cfg(method: str = "evoedit", alpha: float = 0.7):
    return make_config(method, None, layers=[0], alpha=alpha, null_space_threshold=1e-3)


def test_evoedit_is_its_equation_and_its_projector_deflates():
    g = torch.Generator().manual_seed(3)
    d = 10
    c0, q = _c0(g, d, null=7)
    cfg, rule, state = _evo_cfg(), get_rule("evoedit"), LayerState(c0=c0)
    p = q[:, :7] @ q[:, :7].T  # the null space of C0 (eigenvalues < 10⁻³)
    for n in (3, 2, 1):
        keys, resid = _rand(g, d, n), _rand(g, D_OUT, n)
        pk = p @ keys
        want = resid @ torch.linalg.inv(keys.T @ pk + 0.7 * _eye(n)) @ pk.T
        assert _rel(resid @ rule.solve(keys, resid, state, cfg).T, want) < 1e-10
        rank = round(float(torch.trace(p)))
        rule.after_batch(keys, state, cfg)
        basis, _ = torch.linalg.qr(pk)  # (P K has full column rank here)
        p = p - basis @ basis.T
        got = state.extra["P"]
        assert torch.allclose(got, p, rtol=0, atol=1e-12)
        assert torch.trace(got).item() == pytest.approx(rank - n, abs=1e-9)
        assert torch.allclose(got @ got, got, atol=1e-12)
        assert torch.allclose(got, got.T, rtol=0, atol=1e-14)
        assert (got @ keys).norm() < 1e-12  # the batch's directions have left it
    assert state.s is None  # (no S)


def test_evoedit_first_batch_is_alphaedits():
    """``P K (KᵀPK + αI)⁻¹ = (P K Kᵀ + αI)⁻¹ P K`` (push-through): with no earlier edits, EvoEdit's
    first batch is AlphaEdit's (``S = 0``), to rounding."""
    g = torch.Generator().manual_seed(4)
    c0, _ = _c0(g, 9, null=5)
    keys, resid = _rand(g, 9, 3), _rand(g, D_OUT, 3)
    evo = get_rule("evoedit").solve(keys, resid, LayerState(c0=c0), _evo_cfg())
    alpha = get_rule("alphaedit").solve(keys, resid, LayerState(c0=c0), _evo_cfg("alphaedit"))
    assert _rel(evo, alpha) < 1e-12
    # ... and a second batch differs: AlphaEdit keeps P, adds S; EvoEdit deflates P, no S
    state_e, state_a = LayerState(c0=c0), LayerState(c0=c0)
    get_rule("evoedit").after_batch(keys, state_e, _evo_cfg())
    get_rule("alphaedit").after_batch(keys, state_a)
    k2 = _rand(g, 9, 2)
    assert _rel(get_rule("evoedit").solve(k2, resid[:, :2], state_e, _evo_cfg()),
                get_rule("alphaedit").solve(k2, resid[:, :2], state_a, _evo_cfg("alphaedit"))) \
        > 1e-3


def test_evoedit_rank_deficient_batches_and_skips():
    g = torch.Generator().manual_seed(5)
    c0, _ = _c0(g, 10, null=6)
    cfg, rule, state = _evo_cfg(), get_rule("evoedit"), LayerState(c0=c0)
    k1 = _rand(g, 10, 2)
    rule.after_batch(k1, state, cfg)
    assert torch.trace(state.extra["P"]).item() == pytest.approx(4, abs=1e-9)
    # a key already edited adds no direction: rank(P K) = 2 of 3, the rank drops by 2
    k2 = torch.cat([k1[:, :1], _rand(g, 10, 2)], dim=1)
    rule.after_batch(k2, state, cfg)
    p = state.extra["P"]
    assert torch.trace(p).item() == pytest.approx(2, abs=1e-9)
    assert torch.allclose(p @ p, p, atol=1e-12) and torch.allclose(p, p.T, atol=1e-14)
    # ‖P K‖_F < 10⁻³: no edit, the projector kept as it is (the same decision on replay)
    for skipped in (k1, 1e-5 * _rand(g, 10, 3)):
        v = rule.solve(skipped, _rand(g, D_OUT, skipped.shape[1]), state, cfg)
        assert torch.equal(v, torch.zeros_like(v))
        rule.after_batch(skipped, state, cfg)
        assert state.extra["P"] is p


def test_evoedit_preset():
    cfg = make_config("evoedit", "llama3-8b")
    assert (cfg.alpha, cfg.null_space_threshold, cfg.mpes_extra_steps) == (4.0, 2e-2, None)
    assert cfg.v_lr == make_config("alphaedit", "llama3-8b").v_lr


# ----------------------------------------------------------------------------- RLSEdit

def test_rlsedit_is_recursive_least_squares():
    """``P_t = P_{t-1} − P_{t-1}K (I + KᵀP_{t-1}K)⁻¹ KᵀP_{t-1}`` from ``P_0 = (λ_p C0 + λ_n I)⁻¹``,
    ``W_t = W_{t-1} + (V_t − W_{t-1}K_t) K_tᵀ P_t``; the rule gets ``R = V_t − W_{t-1}K_t``."""
    g = torch.Generator().manual_seed(6)
    c0, _ = _c0(g)
    cfg = make_config("rlsedit", None, layers=[0], lambda_p=2.0, lambda_n=0.5)
    rule = get_rule("rlsedit")
    ref, fast = LayerState(c0=c0.clone()), LayerState(c0=c0.clone())
    solver = WoodburySolver(rule, fast, cfg)
    w0 = _rand(g, D_OUT, D_IN)
    w_rls, w_ref, w_fast = w0.clone(), w0.clone(), w0.clone()
    p = torch.linalg.inv(2.0 * c0 + 0.5 * _eye(D_IN))
    for n in (3, 1, 2, 3):
        keys, values = _rand(g, D_IN, n), _rand(g, D_OUT, n)
        pk = p @ keys
        p = p - pk @ torch.linalg.inv(_eye(n) + keys.T @ pk) @ pk.T
        w_rls = w_rls + (values - w_rls @ keys) @ keys.T @ p
        r_ref, r_fast = values - w_ref @ keys, values - w_fast @ keys
        w_ref = w_ref + r_ref @ rule.solve(keys, r_ref, ref, cfg).T
        w_fast = w_fast + r_fast @ solver.solve(keys, r_fast).T
        rule.after_batch(keys, ref, cfg)
        solver.commit(keys)
        assert _rel(w_ref - w0, w_rls - w0) < 1e-10 and _rel(w_fast - w0, w_rls - w0) < 1e-10


def test_rlsedit_preset_is_encore_without_mpes():
    cfg = make_config("rlsedit", "llama3-8b")
    encore = make_config("encore", "llama3-8b")
    assert cfg.mpes_extra_steps is None and encore.mpes_extra_steps is not None
    assert (cfg.lambda_p, cfg.lambda_n, cfg.v_lr, cfg.layers) == (15000.0, 0.0, 0.1,
                                                                  encore.layers)


# ----------------------------------------------------------------------------- on a model

METHODS = {"emmet": {}, "evoedit": dict(alpha=0.05, null_space_threshold=0.3,
                                        null_space_relative=True), "rlsedit": {}}


def _state(ed) -> str:
    """Edited matrices and model weights, S, the rule's own state, Woodbury inverses."""
    h = hashlib.sha256()
    for layer in ed.hparams.layers:
        h.update(ed.view.weight(layer).detach().float().numpy().tobytes())
        h.update(ed.edited_weight(layer).detach().float().numpy().tobytes())
        st = ed.layer_states()[layer]
        h.update(st.seq().numpy().tobytes())
        for name in sorted(st.extra):
            h.update(name.encode() + st.extra[name].numpy().tobytes())
        solver = ed._solvers.get(layer)
        if solver is not None and hasattr(solver, "inv"):
            h.update(solver.inv.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def batches(data_dir):
    return [counterfact_requests(data_dir, 2 * i, 2) for i in range(3)]


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_on_a_model_undo_and_save_load_are_bit_exact(tiny_models, tokenizer, corpus, batches,
                                                     tmp_path, method, engine):
    def editor(history):
        return small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, method,
                            engine=engine, history=history, **METHODS[method])

    whole = editor(None)
    states = [_state(whole)]
    for b in batches:
        whole.edit(b)
        states.append(_state(whole))
    assert len(set(states)) == 4  # (every batch changed something)
    for back in (2, 1):  # undo replays from the original (EvoEdit: P_0 again)
        whole.undo()
        assert _state(whole) == states[back]

    part = editor(1)  # its file holds the state after batch 0 (EvoEdit: its P) and batch 1
    for b in batches[:2]:
        part.edit(b)
    path = part.save_edits(tmp_path / "e.safetensors")
    with safe_open(str(path), "pt") as f:
        saved_p = [k for k in f.keys() if k.endswith(".x.P")]
    assert len(saved_p) == (2 if method == "evoedit" else 0)
    rest = editor(1)
    assert rest.load_edits(path) == 2
    assert _state(rest) == states[2]
    rest.edit(batches[2])
    assert _state(rest) == states[3]
    rest.undo()  # from the loaded base
    assert _state(rest) == states[2]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_on_a_bf16_model(tiny_models, tokenizer, corpus, batches, method):
    model = copy.deepcopy(tiny_models["llama"]).to(torch.bfloat16)
    ed = small_editor(model, tokenizer, corpus, method, **METHODS[method])
    w0 = {layer: ed.edited_weight(layer).detach().clone() for layer in ed.hparams.layers}
    for b in batches[:2]:
        ed.edit(b)
    for layer, w in w0.items():
        now = ed.edited_weight(layer).detach()
        assert torch.isfinite(now).all() and not torch.equal(now, w)
    ed.undo()
    ed.undo()
    assert all(torch.equal(ed.edited_weight(layer).detach(), w) for layer, w in w0.items())
