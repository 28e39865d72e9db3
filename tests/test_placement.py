"""Models split across devices by accelerate: edited layers offloaded to CPU (their parameters
on ``meta``, the values in the hooks' weights maps) are edited like the undispatched model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import counterfact_requests, small_editor

from encore_fast.models import ModelView
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.models.placement import PlacementError

accelerate = pytest.importorskip("accelerate")


def _offload(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """``model`` with blocks ``layers`` offloaded to CPU by accelerate's hooks."""
    for layer in layers:
        accelerate.cpu_offload(model.model.layers[layer], execution_device=torch.device("cpu"))
    return model


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_offloaded_layers_edit_like_the_undispatched_model(tiny_models, tokenizer, corpus,
                                                           data_dir, engine):
    plain = copy.deepcopy(tiny_models["llama"])
    split = _offload(copy.deepcopy(tiny_models["llama"]), [1, 2, 3])
    view = ModelView(split)
    assert split.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    assert view.weight(2).device.type == "cpu" and view.layer_device(2).type == "cpu"
    assert model_fingerprint(split) == model_fingerprint(plain)  # one C0 cache for both
    reqs = counterfact_requests(data_dir, 60, 6)
    reports = {}
    for name, model in (("plain", plain), ("split", split)):
        ed = small_editor(model, tokenizer, corpus, engine=engine)
        reports[name] = ed.edit(reqs, batch_size=3)
        ed.release()
    assert [r.steps for r in reports["split"]] == [r.steps for r in reports["plain"]]
    for layer in (2, 3):
        edited = view.weight(layer)
        original = ModelView(tiny_models["llama"]).weight(layer)
        assert not torch.equal(edited, original)
        torch.testing.assert_close(edited, ModelView(plain).weight(layer), rtol=0, atol=1e-6)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():  # the forward of the split model uses the edited weights
        torch.testing.assert_close(split(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_disk_offload_is_refused_with_a_clear_error(tiny_models, tmp_path):
    model = copy.deepcopy(tiny_models["llama"])
    accelerate.disk_offload(model.model.layers[2], str(tmp_path / "offload"),
                            execution_device=torch.device("cpu"))
    with pytest.raises(PlacementError, match="offloaded to disk"):
        ModelView(model).weight(2)


def test_state_device_is_checked_and_used(tiny_models, tokenizer, corpus, data_dir):
    from encore_fast.errors import ConfigError

    with pytest.raises(ConfigError, match=r"state_device\[3\] = 'gpu7'"):
        small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus,
                     state_device={3: "gpu7"})
    ed = small_editor(copy.deepcopy(tiny_models["llama"]), tokenizer, corpus,
                      state_device={2: "cpu"})
    ed.edit(counterfact_requests(data_dir, 60, 3))
    assert {l: st.c0.device.type for l, st in ed.layer_states().items()} == {2: "cpu", 3: "cpu"}
    assert all(st.s is not None and st.s.device.type == "cpu" for st in ed.layer_states().values())


@pytest.mark.parametrize(("method", "over"), [
    ("memit-seq+rect", {}), ("alphaedit+nas", {"nas.anchor": 1.0, "alpha": 1.0}),
    ("evoedit", {"alpha": 1.0}), ("emmet+sphere+prune", {}), ("rlsedit", {}),
    ("ultraedit", {"gate_layers": [1], "up_layers": [2], "lr": 0.01, "group_size": 3}),
])
def test_new_methods_on_offloaded_layers(tiny_models, tokenizer, corpus, data_dir, method, over):
    """Transforms, rule state and other edited modules go through accelerate's hooks too."""
    plain = copy.deepcopy(tiny_models["llama"])
    split = _offload(copy.deepcopy(tiny_models["llama"]), [1, 2, 3])
    reqs = counterfact_requests(data_dir, 60, 6)
    eds = {}
    for name, model in (("plain", plain), ("split", split)):
        if method == "ultraedit":
            ed = small_editor(model, tokenizer, corpus, method, layers=[2, 3], **over)
        else:
            ed = small_editor(model, tokenizer, corpus, method, **over)
        ed.edit(reqs, batch_size=3)
        eds[name] = ed
    for site in eds["plain"].sites:
        torch.testing.assert_close(ModelView(split).weight(site), ModelView(plain).weight(site),
                                   rtol=0, atol=1e-6)
        assert not torch.equal(ModelView(plain).weight(site),
                               ModelView(tiny_models["llama"]).weight(site))
