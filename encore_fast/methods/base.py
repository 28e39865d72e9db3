"""What an update rule is: a map from keys ``K`` and residuals ``R`` to ``Δ = R Vᵀ``.

Every method in the MEMIT family produces an update of rank ``n`` (the batch size) whose left
factor is the residual matrix ``R``; a rule only has to return the right factor ``V``. The
per-layer state (``C0``, the sequential sum ``S`` of earlier keys, AlphaEdit's projector) lives in
:class:`LayerState`. The reference solves in float64, as docs/design.md §2 says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from encore_fast.config import EditConfig


@dataclass
class LayerState:
    """Everything an update rule knows about one edited layer (float64, on the solve device)."""

    c0: torch.Tensor  # [d_in, d_in] E[k kᵀ] of the original model
    s: torch.Tensor | None = None  # [d_in, d_in] Σ K Kᵀ of earlier batches
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # derived, e.g. the projector
    # state a method changes after every batch (EvoEdit's projector): saved with the edits,
    # restored by undo and reset, and advanced by ``after_batch`` from the batch's keys alone
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return self.c0.shape[0]

    def seq(self) -> torch.Tensor:
        """``S`` (zeros before the first batch)."""
        if self.s is None:
            self.s = torch.zeros_like(self.c0)
        return self.s


class Part:
    """What every registered method part declares: ``name``; ``own``, its own settings and
    their defaults (read with :meth:`opts`; set as ``name.setting=value``); ``presets``, per
    model preset, values of its own settings and of :class:`EditConfig` fields."""

    name = "base"
    own: ClassVar[dict[str, Any]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @staticmethod
    def check_settings(settings: dict[str, Any]) -> None:
        """Raise :class:`ConfigError` naming a bad value among the part's own settings."""

    def opts(self, cfg: EditConfig) -> dict[str, Any]:
        """This part's own settings in ``cfg`` (defaults filled in by ``make_config``)."""
        return {**self.own, **cfg.method_settings.get(self.name, {})}


class UpdateRule(Part):
    """Base class: a rule states its linear system once; both engines solve it.

    The system of a batch with keys ``K`` is ``(base_matrix + rhs(K) Kᵀ) V = rhs(K)``, with
    ``Δ = R Vᵀ``. ``base_matrix`` is the part that changes only between batches (the fast
    engine keeps its inverse and folds each batch in with a Woodbury update); ``symmetric``
    rules have an SPD base matrix and ``rhs(K) = K`` (Cholesky inverse, SYRK down-date);
    others get a general inverse. ``after_batch`` folds the keys into ``S``.

    Class attributes describe the method for the registry: ``name``, ``preset`` (the preset
    family whose settings it starts from: ``"memit"``, ``"encore"`` or ``"alphaedit"``),
    ``mpes`` (whether MPES is on by default), ``sequential`` (whether ``S`` accumulates).
    A rule that is no such system overrides :meth:`solve` and sets ``woodbury = False`` (both
    engines then call its solve); ``small_shift`` is the diagonal of the batch's ``n × n``
    system (``I`` for MEMIT; EMMET's ``λ_e``).
    """

    preset = "memit"
    mpes = False
    sequential = True
    symmetric = True
    woodbury = True
    direct = False  # (True: no value optimisation; the rule's ``updates`` give every site's Δ)
    uses_c0 = True

    def sites(self, cfg: EditConfig) -> list[Any]:
        """The matrices it edits (``models.arch.Site``): the MLP outputs of ``cfg.layers``."""
        return list(cfg.layers)

    def record_shape(self, n: int, d_in: int, d_out: int) -> tuple[int, int]:
        """The shape of what a batch leaves per site for ``after_batch``: its keys."""
        return (n, d_in)

    def small_shift(self, n: int, cfg: EditConfig) -> float:
        """``c`` in ``V = G (c I + Kᵀ G)⁻¹``, ``G = base⁻¹ rhs(K)`` (1: the batch's own keys
        enter the system like the earlier ones)."""
        return 1.0

    def base_matrix(self, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """The matrix of the system without this batch's keys (float64, ``[d_in, d_in]``)."""
        raise NotImplementedError

    def rhs(self, keys: torch.Tensor, state: LayerState, cfg: EditConfig) -> torch.Tensor:
        """How the batch's keys ``[d_in, n]`` enter the system (``K`` unless overridden)."""
        return keys

    def solve(
        self, keys: torch.Tensor, resid: torch.Tensor, state: LayerState, cfg: EditConfig
    ) -> torch.Tensor:
        """``V`` by a direct float64 solve of the full system (the reference engine); the
        residuals ``resid`` only scale ``Δ = R Vᵀ`` and are not needed here."""
        rhs = self.rhs(keys, state, cfg)
        return torch.linalg.solve(self.base_matrix(state, cfg) + rhs @ keys.T, rhs)

    def after_batch(self, keys: torch.Tensor, state: LayerState,
                    cfg: EditConfig | None = None) -> None:
        """Fold this batch's keys into ``S`` (sequential methods); a rule with state of its
        own (``state.extra``) advances it here, from the keys and the settings ``cfg`` alone
        (the solvers pass them), so replay can redo it."""
        if self.sequential:
            state.seq().addmm_(keys, keys.T)


def eye_like(a: torch.Tensor) -> torch.Tensor:
    return torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
