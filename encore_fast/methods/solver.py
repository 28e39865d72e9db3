"""Woodbury solvers: the fast engine's per-layer linear algebra, O(d² n) per batch.

The reference solves a ``d_in × d_in`` system per layer and batch (O(d³)). Here each layer keeps
the inverse of the part of the system that changes only between batches, and folds each batch in
with a rank-``n`` Woodbury update (docs/design.md §4):

* MEMIT family: ``B = λ_p C0 + λ_n I + S``; ``A⁻¹K = B⁻¹K (I + Kᵀ B⁻¹ K)⁻¹`` and after the batch
  ``B⁻¹ ← B⁻¹ − G (I + Kᵀ G)⁻¹ Gᵀ`` with ``G = B⁻¹K``, applied as a SYRK down-date
  (``X = L⁻¹ Gᵀ``, ``LLᵀ = I + KᵀG``) through the covariance kernel.
* AlphaEdit: ``Q = P S + α I`` (not symmetric); ``M = Q + (PK) Kᵀ`` and the same identity gives
  ``M⁻¹ P K = G (I + Kᵀ G)⁻¹`` with ``G = Q⁻¹ P K``; after the batch
  ``Q⁻¹ ← Q⁻¹ − G (I + KᵀG)⁻¹ Kᵀ Q⁻¹``.

Drift is checked on a random probe every ``check_every`` batches (‖B·(B⁻¹v) − v‖ / ‖v‖); above
``tolerance`` the inverse is recomputed from ``C0`` and ``S``. Memory: one float64
``d_in × d_in`` matrix per layer (SmolLM2-135M: 19 MB; Llama3-8B, d_in 14336: 1.6 GB), on top of
``C0`` and ``S``.
"""

from __future__ import annotations

import warnings

import torch

from encore_fast.config import EditConfig
from encore_fast.kernels import covariance_update_
from encore_fast.methods.base import LayerState, UpdateRule


class DirectSolver:
    """The reference engine's solver: the rule's own float64 solve of the full system."""

    def __init__(self, rule: UpdateRule, state: LayerState, cfg: EditConfig) -> None:
        self.rule, self.state, self.cfg = rule, state, cfg

    def solve(self, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return self.rule.solve(keys, resid, self.state, self.cfg)

    def after_batch(self) -> None:
        """Nothing derived to update: the next solve reads ``S`` directly."""

    def commit(self, keys: torch.Tensor) -> None:
        """The batch with ``keys`` is applied: fold them into ``S`` (one call per layer)."""
        self.rule.after_batch(keys, self.state, self.cfg)

    def fold(self, keys: torch.Tensor) -> None:
        """Replaying history: the same as :meth:`commit`."""
        self.commit(keys)

    def discard(self) -> None:
        """Nothing kept between solve and after_batch."""

    def copy(self, state: LayerState) -> DirectSolver:
        """The same solver over ``state`` (it keeps nothing of its own)."""
        return DirectSolver(self.rule, state, self.cfg)


class WoodburySolver:
    """Per-layer solver state for any update rule; same ``V`` as ``rule.solve``. It keeps the
    inverse of ``rule.base_matrix`` (Cholesky for symmetric rules, a general inverse else)."""

    def __init__(self, rule: UpdateRule, state: LayerState, cfg: EditConfig,
                 check_every: int = 10, tolerance: float = 1e-8, *,
                 inv: torch.Tensor | None = None, batches: int = 0,
                 refactorisations: int = 0) -> None:
        """``inv``, ``batches``, ``refactorisations``: a saved inverse and its counters (no
        factorisation), so that the next batches run the very operations of an uninterrupted
        run; without ``inv`` the inverse is computed from ``C0`` and ``S``."""
        self.rule, self.state, self.cfg = rule, state, cfg
        self.general = not rule.symmetric
        self.check_every, self.tolerance = check_every, tolerance
        self.batches = batches
        self.refactorisations = refactorisations
        self.inv = inv if inv is not None else self._fresh_inverse()
        self._pending: tuple[torch.Tensor, ...] | None = None

    def copy(self, state: LayerState) -> WoodburySolver:
        """This solver's inverse and counters, over ``state`` (which must hold the same
        ``C0`` and ``S``): the base of a bounded history, and restoring from it."""
        return WoodburySolver(self.rule, state, self.cfg, self.check_every, self.tolerance,
                              inv=self.inv.clone(), batches=self.batches,
                              refactorisations=self.refactorisations)

    def base_matrix(self) -> torch.Tensor:
        """The matrix whose inverse is kept, as the rule states it."""
        return self.rule.base_matrix(self.state, self.cfg)

    def _fresh_inverse(self) -> torch.Tensor:
        b = self.base_matrix()
        if self.general:
            return torch.linalg.inv(b)
        return torch.cholesky_inverse(torch.linalg.cholesky(b))

    def solve(self, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """``V`` with ``Δ = R Vᵀ`` for keys ``[d_in, n]`` (float64). Changes nothing: the batch
        is folded in by :meth:`after_batch` (or dropped by :meth:`discard`)."""
        g, small = self._prepare(keys)
        shift = self.rule.small_shift(keys.shape[1], self.cfg)
        if shift != 1.0:  # (EMMET: λ_e I + KᵀG; the fold keeps I + KᵀG)
            small = shift * torch.eye(keys.shape[1], dtype=keys.dtype,
                                      device=keys.device) + keys.T @ g
        return torch.linalg.solve(small.T, g.T).T  # G small⁻¹

    def commit(self, keys: torch.Tensor) -> None:
        """The solved batch with ``keys`` is applied: fold them into ``S``, then into the kept
        inverse (one call per layer; the drift check reads the new ``S``)."""
        self.rule.after_batch(keys, self.state, self.cfg)
        self.after_batch()

    def fold(self, keys: torch.Tensor) -> None:
        """Replaying history: :meth:`commit` a batch without solving for it (the same
        operations on the same inputs as :meth:`solve` + :meth:`commit`)."""
        self._prepare(keys)
        self.commit(keys)

    def _prepare(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``G = B⁻¹ rhs(K)`` (AlphaEdit: ``Q⁻¹PK``) and ``I + KᵀG``, and everything the fold needs
        that can fail (its factorisation), so that :meth:`after_batch` cannot fail halfway."""
        rhs = self.rule.rhs(keys, self.state, self.cfg)
        g = self.inv @ rhs
        small = torch.eye(keys.shape[1], dtype=keys.dtype, device=keys.device) + keys.T @ g
        self._pending = None
        if self.rule.sequential:
            if self.general:
                self._pending = (g, torch.linalg.solve(small, keys.T @ self.inv))
            else:
                chol = torch.linalg.cholesky(0.5 * (small + small.T))
                self._pending = (torch.linalg.solve_triangular(chol, g.T, upper=False),)
        return g, small

    def discard(self) -> None:
        """Forget a solved batch that was not applied."""
        self._pending = None

    def after_batch(self) -> None:
        """Fold the last solved batch into the kept inverse (sequential methods)."""
        if not self.rule.sequential:
            return
        if self._pending is None:
            raise RuntimeError("after_batch() without a solve()")
        pending, self._pending = self._pending, None
        if self.general:
            g, small_inv_kt_inv = pending
            self.inv.addmm_(g, small_inv_kt_inv, alpha=-1.0)
        else:
            (x,) = pending  # L⁻¹ Gᵀ, [n, d_in]
            covariance_update_(self.inv, x, alpha=-1.0, beta=1.0)
        self.batches += 1
        if self.check_every and self.batches % self.check_every == 0:
            self.check_drift()

    def drift(self) -> float:
        """‖B (B⁻¹ v) − v‖ / ‖v‖ on a fixed random probe."""
        gen = torch.Generator().manual_seed(self.batches)
        v = torch.randn(self.inv.shape[0], 1, generator=gen, dtype=torch.float64).to(
            self.inv.device)
        return float((self.base_matrix() @ (self.inv @ v) - v).norm() / v.norm())

    def check_drift(self) -> bool:
        """Recompute the inverse if it drifted; returns whether it did."""
        if self.drift() > self.tolerance:
            try:
                self.inv = self._fresh_inverse()
            except torch.linalg.LinAlgError as exc:  # keep the drifted inverse, say so
                warnings.warn(f"Woodbury solver: the inverse drifted and could not be "
                              f"recomputed ({exc}); keeping the updated one", stacklevel=2)
                return False
            self.refactorisations += 1
            return True
        return False
