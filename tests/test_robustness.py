"""Nothing half-done, nothing silently wrong: atomic batches, checked inputs, exact load.

Every rejected call is checked to leave the model as it was: the edited matrices, ``S`` and the
history are hashed before and after.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import warnings

import pytest
import torch
from helpers import FAST
from helpers import counterfact_requests as _requests
from helpers import small_editor as _editor

from encore_fast.editor import Editor
from encore_fast.errors import (
    ConfigError,
    EditError,
    EditorConflictError,
    EditsFileError,
    StatsError,
)
from encore_fast.requests import EditRequest, RequestError
from encore_fast.stats import StatsCacheError


def _state_hash(ed: Editor) -> str:
    """Edited weights, S, the Woodbury inverses and the history, as one hash."""
    h = hashlib.sha256()
    for layer in ed.hparams.layers:
        h.update(ed.view.weight(layer).detach().float().numpy().tobytes())
        if ed._states is not None:  # S = None and S = 0 are the same state
            h.update(ed._states[layer].seq().numpy().tobytes())
        solver = ed._solvers.get(layer)
        if solver is not None and hasattr(solver, "inv"):
            h.update(solver.inv.numpy().tobytes())
    h.update(repr([b.requests for b in ed.edit_history.batches]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- transactions

@pytest.mark.parametrize("failure", ["nan", "linalg", "interrupt"])
def test_failing_layer_rolls_the_whole_batch_back(tiny_models, tokenizer, corpus, data_dir,
                                                  failure):
    ed = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus)
    ed.edit(_requests(data_dir, 0, 3))  # one good batch first: S and the solver are non-trivial
    before = _state_hash(ed)
    solver = ed._solver(3)
    real = solver.solve

    def broken(keys, resid):
        if failure == "linalg":
            raise torch.linalg.LinAlgError("linalg.solve: the system is singular")
        if failure == "interrupt":
            raise KeyboardInterrupt
        return real(keys, resid) * float("nan")

    solver.solve = broken  # layer 2 is solved and applied first, then layer 3 fails
    expected = KeyboardInterrupt if failure == "interrupt" else EditError
    with pytest.raises(expected) as info:
        ed.edit(_requests(data_dir, 3, 2))
    if failure != "interrupt":
        assert "layer 3" in str(info.value) and "rolled back" in str(info.value)
    assert _state_hash(ed) == before
    assert ed.num_batches == 1
    solver.solve = real

    # The solver state really is as before: the next batch equals a clean editor's.
    clean = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus)
    clean.edit(_requests(data_dir, 0, 3))
    for e in (ed, clean):
        e.edit(_requests(data_dir, 5, 2))
    assert _state_hash(ed) == _state_hash(clean)
    assert ed.undo()[0].case_id == _requests(data_dir, 5, 1)[0].case_id


def test_first_batch_failure_leaves_nothing_to_undo(tiny, tokenizer, corpus, data_dir,
                                                    monkeypatch):
    ed = _editor(tiny, tokenizer, corpus)
    ed.layer_states()
    before = _state_hash(ed)
    from encore_fast.matrices import EditedMatrices

    real = EditedMatrices.apply
    calls = {"n": 0}

    def apply_then_overflow(self, layer, u, v, mask=None):
        calls["n"] += 1
        w, d = real(self, layer, u, v, mask)
        return (float("inf"), d) if calls["n"] == 2 else (w, d)

    monkeypatch.setattr(EditedMatrices, "apply", apply_then_overflow)
    with pytest.raises(EditError, match="layer 3: the edited weights are not finite"):
        ed.edit(_requests(data_dir, 0, 2))
    assert _state_hash(ed) == before and ed.num_batches == 0
    with pytest.raises(RuntimeError, match="nothing to undo"):
        ed.undo()


# ----------------------------------------------------------------------------- statistics

def _c0(ed: Editor, layer: int) -> torch.Tensor:
    d = ed.view.d_in(layer)
    gen = torch.Generator().manual_seed(layer)
    x = torch.randn(4 * d, d, generator=gen)
    return x.T @ x / (4 * d)


@pytest.mark.parametrize("damage,problem", [
    ("nan", "non-finite"), ("inf", "non-finite"), ("asym", "not symmetric"),
    ("shape", "has shape"), ("neg", "negative diagonal"),
])
def test_bad_given_statistics_are_refused(tiny, tokenizer, damage, problem):
    probe = Editor(copy.deepcopy(tiny), tokenizer, preset=None, layers=[2, 3], progress=False)
    stats = {l: _c0(probe, l) for l in (2, 3)}
    c = stats[3]
    if damage == "nan":
        c[1, 1] = float("nan")
    elif damage == "inf":
        c[0, 2] = c[2, 0] = float("inf")
    elif damage == "asym":
        c[0, 1] += 1.0
    elif damage == "shape":
        stats[3] = c[:-1, :-1]
    else:
        c[4, 4] = -1.0
    probe.release()
    with pytest.raises(StatsError, match=problem) as info:
        Editor(tiny, tokenizer, preset=None, layers=[2, 3], stats=stats, progress=False)
    assert "layer 3" in str(info.value)


def test_failed_cholesky_is_not_reported_as_memory(tiny, tokenizer, data_dir):
    probe = Editor(copy.deepcopy(tiny), tokenizer, preset=None, layers=[2, 3], progress=False)
    d = probe.view.d_in(2)
    probe.release()
    # Symmetric, finite, non-negative diagonal, but indefinite: B = λ_p C0 + λ_n I is too.
    indefinite = torch.eye(d) + 2.0 * (torch.ones(d, d) - torch.eye(d)) * torch.tensor(
        [(-1.0) ** (i + j) for i in range(d) for j in range(d)]).view(d, d)
    ed = Editor(tiny, tokenizer, preset=None, stats={2: indefinite, 3: indefinite},
                progress=False, **{**FAST, "lambda_n": 0.0})
    ed.layer_states()
    before = _state_hash(ed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "does not fit in memory" fallback
        with pytest.raises(EditError, match="layer 2: the update's linear system could not"):
            ed.edit(_requests(data_dir, 0, 2))
    assert _state_hash(ed) == before


def test_damaged_stats_cache_is_refused_with_its_path(tiny, tokenizer, corpus, tmp_path):
    kw = dict(preset=None, corpus=corpus, stats_cache=tmp_path, progress=False, **FAST)
    ed = Editor(copy.deepcopy(tiny), tokenizer, **kw)
    ed.layer_states()
    ed.release()
    path = sorted(tmp_path.rglob("layer3-*.safetensors"))[0]
    raw = bytearray(path.read_bytes())
    raw[-16:-12] = b"\xff\xff\xff\x7f"  # NaN bytes inside the data; the header stays valid
    path.write_bytes(bytes(raw))
    fresh = Editor(tiny, tokenizer, **kw)
    before = _state_hash(fresh)
    with pytest.raises(StatsCacheError, match="damaged") as info:
        fresh.edit([EditRequest("The capital of {} is", "France", "Rome")])
    assert str(path) in str(info.value)
    assert _state_hash(fresh) == before


def test_stats_cache_keyed_by_fingerprint_and_dtype(tiny, tokenizer, corpus, tmp_path,
                                                    monkeypatch):
    import encore_fast.stats as stats_mod

    kw = dict(preset=None, corpus=corpus, stats_cache=tmp_path, progress=False, **FAST)
    other = copy.deepcopy(tiny)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(1.5)
    for m in (tiny, other):  # both named the same: two entries, neither refused
        m.config.name_or_path = ""
    c_a = Editor(copy.deepcopy(tiny), tokenizer, **kw).layer_states()[3].c0
    c_b = Editor(other, tokenizer, **kw).layer_states()[3].c0
    assert len(list(tmp_path.rglob("layer3-float32-*.safetensors"))) == 2
    assert torch.equal(c_a, Editor(copy.deepcopy(tiny), tokenizer, **kw).layer_states()[3].c0)
    assert c_b.shape == c_a.shape

    # A bf16 copy of the same weights reuses the fp32 statistics (no pass over the corpus).
    def boom(*a, **k):
        raise AssertionError("recomputed despite fp32 statistics of the same weights")

    monkeypatch.setattr(stats_mod, "accumulate_second_moments", boom)
    half = copy.deepcopy(tiny).to(torch.bfloat16)
    assert torch.equal(Editor(half, tokenizer, **kw).layer_states()[3].c0, c_a)
    monkeypatch.undo()
    # ... but an fp32 model does not take bf16 statistics: those are computed in bf16.
    half_only = tmp_path / "bf16"
    Editor(copy.deepcopy(tiny).to(torch.bfloat16), tokenizer,
           **{**kw, "stats_cache": half_only}).layer_states()
    assert list(half_only.rglob("layer3-bfloat16-*.safetensors"))
    calls = {"n": 0}
    real = stats_mod.accumulate_second_moments

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(stats_mod, "accumulate_second_moments", counted)
    Editor(copy.deepcopy(tiny), tokenizer, **{**kw, "stats_cache": half_only}).layer_states()
    assert calls["n"] == 1


# ----------------------------------------------------------------------------- requests

@pytest.mark.parametrize("bad,problem", [
    ({"prompt": "The capital of {} is", "subject": None, "target_new": "Rome"}, "string"),
    ({"prompt": "The capital of {} is", "subject": ["France"], "target_new": "Rome"}, "string"),
    ({"prompt": "The capital of {} is", "subject": "France", "target_new": 5}, "string"),
    ({"prompt": "Parisians love their city", "subject": "Paris", "target_new": "Rome"},
     "inside a longer word"),
])
def test_bad_request_fields(tiny, tokenizer, corpus, bad, problem):
    ed = _editor(tiny, tokenizer, corpus)
    before = _state_hash(ed)
    with pytest.raises(RequestError, match=problem):
        ed.edit([{"prompt": "The capital of {} is", "subject": "France", "target_new": "Rome"},
                 bad])
    assert _state_hash(ed) == before and ed.num_batches == 0


def test_subject_as_a_whole_word_is_found_after_a_longer_one():
    req = EditRequest("Parisians love Paris", "Paris", "Rome")
    assert req.template == "Parisians love {}"


@pytest.mark.parametrize("second,problem", [
    (EditRequest("The capital of {} is", "France", "Rome"), "repeats request #0"),
    (EditRequest("The capital of {} is", "France", "Madrid"), "gives another target"),
])
def test_duplicates_and_conflicts_in_one_batch(tiny, tokenizer, corpus, second, problem):
    ed = _editor(tiny, tokenizer, corpus)
    first = EditRequest("The capital of {} is", "France", "Rome")
    other = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    before = _state_hash(ed)
    with pytest.raises(RequestError, match=problem):
        ed.edit([first, other, second], batch_size=3)
    assert _state_hash(ed) == before


def test_batch_size_must_be_positive(tiny, tokenizer, corpus, data_dir):
    ed = _editor(tiny, tokenizer, corpus)
    before = _state_hash(ed)
    for bs in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            ed.edit(_requests(data_dir, 0, 2), batch_size=bs)
    with pytest.raises(ConfigError, match="batch_size"):
        _editor(copy.deepcopy(tiny), tokenizer, corpus, batch_size=0)
    assert _state_hash(ed) == before


def test_known_target_warns(tiny_models, tokenizer, corpus):
    from encore_fast.requests import target_token_ids

    model = copy.deepcopy(tiny_models["gpt2"])
    emb = model.get_output_embeddings().weight  # tied to the input embeddings
    for k in range(emb.shape[1]):  # a constant final hidden state e_k: one token always wins
        top = int(emb[:, k].argmax())
        text = tokenizer.decode([top])
        if text.startswith(" ") and target_token_ids(tokenizer, text) == [top]:
            break
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[k] = 1.0
    ed = _editor(model, tokenizer, corpus)
    with pytest.warns(UserWarning, match="1 request.s. already predict their target"):
        ed.edit([EditRequest("The capital of {} is", "France", text)])


# ----------------------------------------------------------------------------- modes

def test_edit_runs_in_eval_mode_and_restores_train_mode(tiny, tokenizer, corpus, data_dir):
    ed = _editor(tiny, tokenizer, corpus)
    tiny.train()
    seen = []
    handle = ed.view.blocks[1].register_forward_pre_hook(
        lambda mod, args: seen.append(mod.training))
    try:
        ed.edit(_requests(data_dir, 0, 2))
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert tiny.training and all(m.training for m in tiny.modules())
    assert all(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_zero_gradients_warn(tiny_models, tokenizer, corpus, data_dir, engine):
    model = copy.deepcopy(tiny_models["llama"])
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # constant logits: δ's gradient is 0
    ed = _editor(model, tokenizer, corpus, engine=engine, kl_factor=0.0)
    with pytest.warns(UserWarning, match="gradient of δ was exactly zero"):
        ed.edit(_requests(data_dir, 0, 2))


def test_one_editor_per_model(tiny, tokenizer, corpus, data_dir):
    first = _editor(tiny, tokenizer, corpus)
    with pytest.raises(EditorConflictError, match="another live Editor"):
        _editor(tiny, tokenizer, corpus)
    first.edit(_requests(data_dir, 0, 2))
    first.release()
    with pytest.raises(EditorConflictError, match="released"):
        first.edit(_requests(data_dir, 2, 2))
    second = _editor(tiny, tokenizer, corpus)  # takes over the model as it is
    del second
    gc.collect()
    third = _editor(tiny, tokenizer, corpus)  # a dropped editor frees the model
    assert third.num_batches == 0
    other = _editor(copy.deepcopy(tiny), tokenizer, corpus)  # a copy is another model
    assert other.model is not tiny


# ----------------------------------------------------------------------------- exact load

@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_load_then_edit_equals_one_editor(tiny_models, tokenizer, corpus, data_dir, tmp_path,
                                          engine):
    batches = [_requests(data_dir, 3 * i, 3) for i in range(4)]
    whole = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine=engine)
    for b in batches:
        whole.edit(b)

    part = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine=engine)
    for b in batches[:2]:
        part.edit(b)
    path = part.save_edits(tmp_path / "half.safetensors")
    rest = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus, engine=engine)
    rest.load_edits(path)
    assert rest.context_templates == whole.context_templates
    for b in batches[2:]:
        rest.edit(b)
    assert _state_hash(rest) == _state_hash(whole)  # bit-exact: weights, S, inverses

    # undo is exact too: back to the state of the editor that saved the file
    rest.undo()
    rest.undo()
    assert _state_hash(rest) == _state_hash(part)


@pytest.mark.parametrize("damage,problem", [
    ("bytes", "damaged"), ("truncate", "not a readable"), ("meta", "another model"),
])
def test_damaged_edits_file_is_refused(tiny_models, tokenizer, corpus, data_dir, tmp_path,
                                       damage, problem):
    ed = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus)
    ed.edit(_requests(data_dir, 0, 2))
    path = ed.save_edits(tmp_path / "e.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "bytes":
        raw[-8:-4] = b"\x00\x00\xc0\x7f"
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = raw.replace(ed.fingerprint[:8].encode(), b"00000000", 1)
    path.write_bytes(bytes(raw))
    fresh = _editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus)
    fresh.layer_states()
    before = _state_hash(fresh)
    with pytest.raises(EditsFileError, match=problem) as info:
        fresh.load_edits(path)
    assert str(path) in str(info.value)
    assert _state_hash(fresh) == before and fresh.num_batches == 0
