"""An editor's record of what it applied: the batches undo can reach, the requests of the
batches before them, and the base state those were folded into.

A bounded history (``Editor(history=N)``) keeps the last ``N`` batches with their factors;
older ones are folded into a :class:`Base` (the edited matrices, ``S`` and the solvers after
them) by the very operations that applied them, so that undo down to the base, and save/load
from it, stay bit-exact. ``history=0`` keeps no base: the live state is all there is.

The live state (the model's weights, the fp32 masters, each layer's ``S`` and solver) is the
editor's; this module resets it to the base or to the original weights, and the editor replays
the kept batches on top.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from encore_fast.edits_file import Base, Batch, SavedEdits, pack_edits
from encore_fast.engines import SavedInverse, Solver
from encore_fast.errors import ConfigError, HistoryError
from encore_fast.matrices import EditedMatrices, apply_update_
from encore_fast.methods import LayerState
from encore_fast.requests import EditRequest

States = Callable[[], Mapping[int, LayerState]]  # the live states (C0 computed on first call)
MakeSolver = Callable[[int, LayerState, SavedInverse | None], Solver]


def check_history(history: Any) -> None:
    """``history`` is None or an integer >= 0 (a :class:`ConfigError` else)."""
    if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                or history < 0):
        raise ConfigError(f"history must be None or an integer >= 0, got {history!r}")


class History:
    """The kept batches, the dropped batches' requests and the base state after them.

    ``matrices`` are the editor's edited matrices, which restoring writes.
    """

    def __init__(self, limit: int | None, matrices: EditedMatrices) -> None:
        check_history(limit)
        self.limit = limit
        self.matrices = matrices
        self.batches: list[Batch] = []  # the batches undo can reach (the last ones)
        self.dropped: list[list[EditRequest]] = []  # requests of the batches before them
        self.base: Base | None = None  # the state after those (None: original, or limit 0)

    @property
    def num_batches(self) -> int:
        """Batches applied (also those no longer kept)."""
        return len(self.dropped) + len(self.batches)

    @property
    def num_edits(self) -> int:
        """Requests applied (also those of the batches no longer kept)."""
        return sum(map(len, self.dropped)) + sum(len(b.requests) for b in self.batches)

    @property
    def requests(self) -> list[EditRequest]:
        """All requests applied, in order."""
        return [r for b in self.dropped for r in b] + [r for b in self.batches for r in b.requests]

    # ------------------------------------------------------------------ recording

    def set_limit(self, limit: int | None, states: States, make_solver: MakeSolver) -> None:
        """A new window; a smaller one drops the older batches now."""
        check_history(limit)
        self.limit = limit
        self.trim(states, make_solver)

    def append(self, batch: Batch, states: States, make_solver: MakeSolver) -> None:
        """Record an applied batch (its ``S`` and solvers updated), then trim the window."""
        self.batches.append(batch)
        self.trim(states, make_solver)

    def trim(self, states: States, make_solver: MakeSolver) -> None:
        """Drop the batches past the window, folding them into the base."""
        limit = self.limit
        if limit is None:
            return
        while len(self.batches) > limit:
            batch = self.batches.pop(0)
            self.dropped.append(batch.requests)
            if limit > 0:
                self._fold_into_base(batch, states, make_solver)
        if limit == 0:
            self.base = None  # nothing to go back to: the live state is all there is

    def _fold_into_base(self, batch: Batch, states: States, make_solver: MakeSolver) -> None:
        """Advance the base by one batch: the same operations as when it was applied."""
        if self.base is None:
            fresh = {l: LayerState(c0=st.c0) for l, st in states().items()}
            mats = self.matrices
            self.base = Base(
                weights={l: (w0.float() if l in mats.masters else w0.clone())
                         for l, w0 in mats.original.items()},
                states=fresh,
                solvers={l: make_solver(l, st, None) for l, st in fresh.items()})
        base = self.base
        with torch.no_grad():
            for layer, (u, v, k) in batch.factors.items():
                apply_update_(base.weights[layer], u, v, batch.masks.get(layer),
                              self.matrices.view.arch.transposed)
                base.solvers[layer].fold(k.to(base.states[layer].c0.device).double())

    def clear(self) -> None:
        """Forget every batch and the base."""
        self.batches.clear()
        self.dropped.clear()
        self.base = None

    def before_last(self) -> tuple[list[Batch], Batch]:
        """The kept batches but the last, and the last (what undo replays and returns)."""
        if not self.batches:
            if self.dropped:
                raise HistoryError(
                    f"cannot undo batch {self.num_batches - 1}: this editor keeps the last "
                    f"{self.limit} batch(es) (history={self.limit}) and has "
                    "already taken back those; the earlier batches are folded into its state "
                    "(reset() goes back to the original model)")
            raise RuntimeError("nothing to undo: no batch has been applied")
        return self.batches[:-1], self.batches[-1]

    # ------------------------------------------------------------------ restoring

    def restore(self, states: Mapping[int, LayerState] | None) -> dict[int, Solver]:
        """Weights and ``S`` := the base (the original model when there is none), no batch
        kept; returns the solvers that go with them. ``states``: the live ones, if made."""
        base = self.base
        if base is None:
            if self.dropped:
                raise HistoryError("the batches before the kept history were not kept "
                                   "(history=0): there is no state to go back to")
            solvers = self.restore_original(states)
        else:
            assert states is not None  # (a base is made from them)
            solvers = {}
            for layer, w in base.weights.items():
                self.matrices.put(layer, w)  # (the model's weight: a master rounded)
                st = base.states[layer]
                states[layer].s = None if st.s is None else st.s.clone()
                states[layer].extra = {k: t.clone() for k, t in st.extra.items()}
                solvers[layer] = base.solvers[layer].copy(states[layer])
        self.batches = []
        return solvers

    def restore_original(self, states: Mapping[int, LayerState] | None) -> dict[int, Solver]:
        """Weights := the original ones, ``S`` := None; returns the (no) solvers."""
        for layer, w0 in self.matrices.original.items():
            self.matrices.put(layer, w0)
        if states is not None:
            for st in states.values():
                st.s = None
                st.extra = {}
        return {}

    # ------------------------------------------------------------------ save / load

    def pack(self, meta: dict[str, str], states: States,
             solvers: Mapping[int, Solver]) -> dict[str, torch.Tensor]:
        """The tensors of an edits file of every batch (``meta``: its header, completed in
        place); ``states`` and ``solvers``: the live ones, which history=0 saves as its base."""
        return pack_edits(meta, self.batches, self.dropped, self.saved_base(states, solvers))

    def saved_base(self, states: States, solvers: Mapping[int, Solver]) -> Base | None:
        """The state save_edits writes for the dropped batches (history=0: the live one)."""
        if not self.dropped:
            return None
        if self.base is not None:
            return self.base
        return Base(weights={l: self.matrices.edited(l) for l in self.matrices.original},
                    states=dict(states()), solvers=dict(solvers))

    def load(self, saved: SavedEdits, states: Mapping[int, LayerState],
             make_solver: MakeSolver) -> None:
        """Take a loaded file's base and dropped requests (when it has any), on this editor's
        devices and dtypes: its solvers as saved, or made from its ``S`` when the file has no
        inverse (e.g. reference runs)."""
        if not saved.dropped:
            return
        weights, bstates, solvers = {}, {}, {}
        for layer, entry in saved.base.items():
            edited = self.matrices.edited(layer)
            weights[layer] = entry["W"].to(edited.device, edited.dtype).clone()
            sdev = states[layer].c0.device
            st = LayerState(c0=states[layer].c0)
            if "S" in entry:
                st.s = entry["S"].to(sdev, torch.float64).clone()
            st.extra = {k[2:]: t.to(sdev).clone() for k, t in entry.items() if k[:2] == "x."}
            bstates[layer] = st
            inv = entry.get("inv")
            kept = inv is not None and layer in saved.counters
            solvers[layer] = make_solver(layer, st, (inv, saved.counters[layer]) if kept else None)
        self.base = Base(weights=weights, states=bstates, solvers=solvers)
        self.dropped = list(saved.dropped)
