"""The Editor on tiny random Llama and GPT-2 models: reports, undo/reset, save/load, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAST
from helpers import counterfact_requests as _requests
from helpers import small_editor as _editor

from encore_fast.editor import Editor
from encore_fast.requests import EditRequest, RequestError


def _weights(ed: Editor) -> dict[int, torch.Tensor]:
    return {l: ed.view.weight(l).detach().clone() for l in ed.hparams.layers}


@pytest.mark.parametrize("method", ["encore", "memit", "alphaedit"])
def test_edit_report_undo_reset(tiny, tokenizer, corpus, data_dir, method):
    ed = _editor(tiny, tokenizer, corpus, method, null_space_threshold=0.5,
                 null_space_relative=True)
    w0 = _weights(ed)
    (r1,) = ed.edit(_requests(data_dir, 0, 3))
    w1 = _weights(ed)
    s1 = {l: st.seq().clone() for l, st in ed.layer_states().items()}
    assert r1.n_requests == 3 and len(r1.steps) == 3
    assert all(0 <= s <= FAST["v_num_grad_steps"] - 1 for s in r1.steps)
    for l in ed.hparams.layers:
        assert not torch.equal(w1[l], w0[l])
        assert r1.weight_norms[l] == pytest.approx(float(w1[l].norm()), rel=1e-5)
        assert r1.delta_norms[l] == pytest.approx(float((w1[l] - w0[l]).norm()), rel=1e-3)

    second = _requests(data_dir, 3, 2)
    ed.edit(second)
    assert ed.num_batches == 2 and ed.num_edits == 5
    undone = ed.undo()
    assert undone == second and ed.num_batches == 1
    for l, st in ed.layer_states().items():
        assert torch.equal(ed.view.weight(l), w1[l])
        assert torch.allclose(st.seq(), s1[l], atol=1e-12)
    ed.reset()
    assert ed.num_batches == 0
    for l, st in ed.layer_states().items():
        assert torch.equal(ed.view.weight(l), w0[l])
        assert st.seq().abs().max() == 0
    with pytest.raises(RuntimeError, match="nothing to undo"):
        ed.undo()


def test_save_load_roundtrip(tiny, tokenizer, corpus, data_dir, tmp_path):
    original = copy.deepcopy(tiny)
    ed = _editor(tiny, tokenizer, corpus)
    ed.edit(_requests(data_dir, 10, 4), batch_size=2)
    path = ed.save_edits(tmp_path / "edits.safetensors")
    assert not list(tmp_path.glob("*.tmp*"))

    fresh = _editor(copy.deepcopy(original), tokenizer, corpus)
    assert fresh.load_edits(path) == 2
    assert fresh.num_edits == 4
    assert [r.case_id for r in fresh.requests] == [r.case_id for r in ed.requests]
    for l in ed.hparams.layers:
        assert torch.equal(fresh.view.weight(l), ed.view.weight(l))
        assert torch.allclose(fresh.layer_states()[l].seq(), ed.layer_states()[l].seq())
    with pytest.raises(RuntimeError, match="reset"):
        fresh.load_edits(path)

    other = copy.deepcopy(original)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="another model"):
        _editor(other, tokenizer, corpus).load_edits(path)
    with pytest.raises(ValueError, match="layers"):
        _editor(copy.deepcopy(original), tokenizer, corpus, layers=[1, 2]).load_edits(path)


@pytest.mark.parametrize("bad,problem", [
    (EditRequest("The capital of Spain is", "France", "Paris", case_id=7), "not in the prompt"),
    (EditRequest("The capital of France is", "France", "  ", case_id=7), "target is empty"),
    (EditRequest("The capital of France is", "", "Rome", case_id=7), "subject is empty"),
    (EditRequest("The capital of France is" + " very" * 400, "France", "Rome", case_id=7),
     "longer than"),
])
def test_bad_requests_change_nothing(tiny, tokenizer, corpus, data_dir, bad, problem):
    ed = _editor(tiny, tokenizer, corpus)
    w0 = _weights(ed)
    good = _requests(data_dir, 0, 2)
    with pytest.raises(RequestError, match=problem) as info:
        ed.edit([*good, bad])
    assert "case 7" in str(info.value) and "#2" in str(info.value)
    assert ed.num_batches == 0
    for l in ed.hparams.layers:
        assert torch.equal(ed.view.weight(l), w0[l])


def test_bad_settings(tiny, tokenizer):
    with pytest.raises(TypeError, match="unknown setting"):
        Editor(tiny, tokenizer, "encore", preset=None, lambda_q=1.0)
    with pytest.raises(ValueError, match="do not exist"):
        Editor(tiny, tokenizer, "encore", preset=None, layers=[5, 6, 7])
    with pytest.raises(ValueError, match="unknown method"):
        Editor(tiny, tokenizer, "rome")
