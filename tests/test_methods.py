"""Each update rule's Δ = R Vᵀ satisfies its least-squares objective (gradient ≈ 0)."""

from __future__ import annotations

import pytest
import torch

from encore_fast.config import make_config
from encore_fast.methods import LayerState, get_rule, null_space_projector

D_IN, D_OUT, N = 23, 11, 5


def _problem(seed: int = 0, with_s: bool = True):
    g = torch.Generator().manual_seed(seed)
    k0 = torch.randn(D_IN, 200, generator=g, dtype=torch.float64)
    c0 = k0 @ k0.T / 200
    kp = torch.randn(D_IN, 7, generator=g, dtype=torch.float64)
    s = kp @ kp.T if with_s else None
    keys = torch.randn(D_IN, N, generator=g, dtype=torch.float64)
    resid = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    return c0, s, keys, resid


def _solve(method: str, c0, s, keys, resid, **over):
    cfg = make_config(method, None, **{"layers": [0], **over})
    state = LayerState(c0=c0.clone(), s=None if s is None else s.clone())
    v = get_rule(method).solve(keys, resid, state, cfg)
    return resid @ v.T, cfg, state


@pytest.mark.parametrize("method", ["memit", "memit-seq", "encore"])
def test_memit_family_gradient_is_zero(method):
    c0, s, keys, resid = _problem()
    delta, cfg, _ = _solve(method, c0, s, keys, resid, lambda_p=3.0, lambda_n=0.7)
    s_term = s if method != "memit" else torch.zeros_like(s)
    lam_n = 0.7 if method == "encore" else 0.0
    # f(Δ) = λp tr(Δ C0 Δᵀ) + tr(Δ S Δᵀ) + ‖ΔK − R‖² + λn ‖Δ‖²
    eye = torch.eye(D_IN, dtype=torch.float64)
    grad = 2 * delta @ (cfg.lambda_p * c0 + s_term + lam_n * eye) + 2 * (
        delta @ keys - resid) @ keys.T
    assert grad.norm() / (resid @ keys.T).norm() < 1e-10
    # ... and it is a minimum, not any point: a perturbation increases f.
    def f(d):
        return (cfg.lambda_p * torch.trace(d @ c0 @ d.T) + torch.trace(d @ s_term @ d.T)
                + (d @ keys - resid).pow(2).sum() + lam_n * d.pow(2).sum())
    assert f(delta + 1e-3 * torch.randn_like(delta)) > f(delta)


def test_encore_lambda_n_shrinks_update():
    c0, s, keys, resid = _problem(1)
    norms = [_solve("encore", c0, s, keys, resid, lambda_p=1.0, lambda_n=lam)[0].norm()
             for lam in (0.0, 0.5, 5.0, 50.0)]
    assert all(a > b for a, b in zip(norms, norms[1:], strict=False)), norms
    memit = _solve("memit-seq", c0, s, keys, resid, lambda_p=1.0)[0]
    assert torch.allclose(memit, _solve("encore", c0, s, keys, resid, lambda_p=1.0,
                                        lambda_n=0.0)[0])


def test_alphaedit_projected_objective():
    c0, s, keys, resid = _problem(2)
    ev = torch.linalg.eigvalsh(c0)
    tau = float(ev[D_IN // 2] + ev[D_IN // 2 + 1]) / 2  # between two eigenvalues
    delta, cfg, state = _solve("alphaedit", c0, s, keys, resid, alpha=0.3,
                               null_space_threshold=tau)
    p = null_space_projector(c0, tau)
    assert 0 < torch.trace(p).round() < D_IN
    # The update lives in the null space of the preserved keys: Δ P = Δ.
    assert torch.allclose(delta @ p, delta, atol=1e-10)
    # Stationarity of ‖ΔPK − R‖² + tr(ΔP S PΔᵀ) + α‖ΔP‖² over Δ.
    eye = torch.eye(D_IN, dtype=torch.float64)
    grad = (delta @ p @ (keys @ keys.T + s + 0.3 * eye) - resid @ keys.T) @ p
    assert grad.norm() / (resid @ keys.T).norm() < 1e-10
    # The relative threshold option picks the same subspace for the equivalent fraction.
    top = float(torch.linalg.eigvalsh(c0)[-1])
    assert torch.allclose(null_space_projector(c0, tau / top, relative=True), p)


@pytest.mark.parametrize("method,sequential", [("memit", False), ("memit-seq", True),
                                               ("encore", True), ("alphaedit", True)])
def test_sequential_state(method, sequential):
    c0, _, keys, _ = _problem(3)
    state = LayerState(c0=c0)
    rule = get_rule(method)
    rule.after_batch(keys, state)
    expected = keys @ keys.T if sequential else torch.zeros_like(c0)
    assert torch.allclose(state.seq(), expected)
    rule.after_batch(2 * keys, state)
    assert torch.allclose(state.seq(), 5 * expected)
