"""Bounded history (``Editor(history=N)``): undo reaches the last N batches exactly and no
further; save/load of a bounded editor (its base state) continues bit-for-bit; a history=0
editor's file is one state, the same size after 2 batches as after 6."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from helpers import counterfact_requests, small_editor

from encore_fast.errors import ConfigError, HistoryError


def _state(ed) -> str:
    """Edited matrices (masters too), model weights, S, Woodbury inverses and counters."""
    h = hashlib.sha256()
    for layer in ed.hparams.layers:
        h.update(ed.view.weight(layer).detach().float().numpy().tobytes())
        h.update(ed.edited_weight(layer).detach().float().numpy().tobytes())
        h.update(ed.layer_states()[layer].seq().numpy().tobytes())
        solver = ed._solvers.get(layer)
        if solver is not None and hasattr(solver, "inv"):
            h.update(solver.inv.numpy().tobytes())
            h.update(repr((solver.batches, solver.refactorisations)).encode())
    h.update(repr(ed.requests).encode())
    return h.hexdigest()


def _batches(data_dir, n, size=2):
    return [counterfact_requests(data_dir, size * i, size) for i in range(n)]


@pytest.fixture
def llama(tiny_models):
    return lambda: copy.deepcopy(tiny_models["llama"])


def test_history_setting_is_checked(llama, tokenizer, corpus):
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigError, match="history"):
            small_editor(llama(), tokenizer, corpus, history=bad)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_undo_reaches_the_window_exactly_and_no_further(llama, tokenizer, corpus, data_dir,
                                                        engine):
    batches = _batches(data_dir, 5)
    full = small_editor(llama(), tokenizer, corpus, engine=engine, history=None)
    states = [_state(full)]
    for b in batches:
        full.edit(b)
        states.append(_state(full))

    ed = small_editor(llama(), tokenizer, corpus, engine=engine, history=2)
    for b in batches:
        ed.edit(b)
    kept = ed.edit_history
    assert ed.num_batches == 5 and len(kept.batches) == 2 and kept.base is not None
    assert _state(ed) == states[5]
    assert ed.undo() == batches[4]
    assert _state(ed) == states[4]
    ed.undo()
    assert _state(ed) == states[3]  # the base: batches 0-2 folded by the same operations
    before = _state(ed)
    with pytest.raises(HistoryError, match="keeps the last 2 batch"):
        ed.undo()
    assert _state(ed) == before and ed.num_batches == 3
    ed.edit(batches[3])  # editing on from the base equals the unbounded editor
    assert _state(ed) == states[4]


def test_history_zero_keeps_no_base_and_cannot_undo(llama, tokenizer, corpus, data_dir):
    ed = small_editor(llama(), tokenizer, corpus, history=0)
    for b in _batches(data_dir, 2):
        ed.edit(b)
    assert ed.edit_history.batches == [] and ed.edit_history.base is None and ed.num_edits == 4
    with pytest.raises(HistoryError):
        ed.undo()
    ed.reset()  # the original is always kept
    assert ed.num_batches == 0


@pytest.mark.parametrize("dtype,history", [(torch.float32, 0), (torch.float32, 2),
                                           (torch.bfloat16, 0)])
def test_bounded_save_load_continues_bit_exact(llama, tokenizer, corpus, data_dir, tmp_path,
                                               dtype, history):
    batches = _batches(data_dir, 6)

    def editor():
        return small_editor(llama().to(dtype), tokenizer, corpus, history=history)

    whole = editor()
    for b in batches:
        whole.edit(b)
    part = editor()
    for b in batches[:4]:
        part.edit(b)
    path = part.save_edits(tmp_path / "state.safetensors")
    rest = editor()
    assert rest.load_edits(path) == 4
    assert _state(rest) == _state(part) and rest.context_templates == part.context_templates
    for b in batches[4:]:
        rest.edit(b)
    assert _state(rest) == _state(whole)
    if history:  # the last two batches can be undone (one of them from the file), no more
        rest.undo()
        rest.undo()
        with pytest.raises(HistoryError):
            rest.undo()


def test_history_zero_file_does_not_grow(llama, tokenizer, corpus, data_dir, tmp_path):
    ed = small_editor(llama(), tokenizer, corpus, history=0)
    sizes = []
    for i, b in enumerate(_batches(data_dir, 6)):
        ed.edit(b)
        if i in (1, 5):
            sizes.append(ed.save_edits(tmp_path / f"s{i}.safetensors").stat().st_size)
    grow = sizes[1] - sizes[0]
    assert grow < 4096, sizes  # only the request list in the header grows


def test_lowering_history_folds_and_a_bounded_file_loads_unbounded(
        llama, tokenizer, corpus, data_dir, tmp_path):
    batches = _batches(data_dir, 4)
    ed = small_editor(llama(), tokenizer, corpus, history=None)
    for b in batches:
        ed.edit(b)
    target = _state(ed)
    ed.history = 1
    assert len(ed.edit_history.batches) == 1 and _state(ed) == target
    path = ed.save_edits(tmp_path / "e.safetensors")
    other = small_editor(llama(), tokenizer, corpus, engine="reference", history=None)
    other.load_edits(path)  # a fast editor's base, loaded by the reference engine
    for layer in ed.hparams.layers:
        assert torch.equal(other.view.weight(layer), ed.view.weight(layer))
    other.undo()
    with pytest.raises(HistoryError):
        other.undo()
