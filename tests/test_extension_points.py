"""Each extension point of the methods, proven by a toy defined in this file alone: a rule
with its own settings (defaults, a preset, a check), a rule with state that persists (saved,
undone, replayed), a value transform and an update transform (a masked one), composed by name
with the built-in rules; every toy goes through undo and save/load bit-exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FAST, counterfact_requests

from encore_fast.config import make_config
from encore_fast.editor import Editor
from encore_fast.errors import ConfigError
from encore_fast.methods import (
    LayerState,
    LowRankUpdate,
    MemitSequential,
    UpdateContext,
    UpdateTransform,
    ValueContext,
    ValueTransform,
    register,
    unregister,
)


class Shrunk(MemitSequential):
    """Own settings: ``Δ = shrink · R Kᵀ (λ_p C0 + S + K Kᵀ)⁻¹`` (V scaled by ``shrink``)."""

    name = "toy-shrunk"
    own = {"shrink": 0.5}
    presets = {"smollm2-135m": {"shrink": 0.25, "lambda_p": 7.0}}

    @staticmethod
    def check_settings(settings):
        if not 0 < settings["shrink"] <= 1:
            raise ConfigError(f"toy-shrunk.shrink must be in (0, 1], got {settings['shrink']}")

    def solve(self, keys, resid, state, cfg):
        return self.opts(cfg)["shrink"] * super().solve(keys, resid, state, cfg)

    woodbury = False


class Counted(MemitSequential):
    """Persistent state: the number of keys seen so far, ``t``; ``V`` scaled by 1/(1 + t/10)."""

    name = "toy-counted"
    woodbury = False

    def solve(self, keys, resid, state: LayerState, cfg):
        t = state.extra.get("t", torch.zeros((), dtype=torch.float64))
        return super().solve(keys, resid, state, cfg) / (1 + float(t) / 10)

    def after_batch(self, keys, state: LayerState, cfg=None) -> None:
        super().after_batch(keys, state, cfg)
        t = state.extra.get("t", torch.zeros((), dtype=torch.float64))
        state.extra["t"] = t + keys.shape[1]


class HalfShift(ValueTransform):
    """A value transform: ``z ← h0 + f · (z − h0)``."""

    name = "toy-half"
    own = {"f": 0.5}

    def apply(self, zs: torch.Tensor, ctx: ValueContext) -> torch.Tensor:
        h0 = torch.stack([v.h0 for v in ctx.values]).to(zs)
        return h0 + self.opts(ctx.cfg)["f"] * (zs - h0)


class Checkered(UpdateTransform):
    """An update transform: keep Δ on a checkerboard of the weight's entries."""

    name = "toy-checkered"

    def apply(self, update: LowRankUpdate, ctx: UpdateContext) -> LowRankUpdate:
        rows, cols = ctx.weight.shape
        idx = torch.arange(rows)[:, None] + torch.arange(cols)[None, :]
        return update.with_mask(idx % 2 == 0)


class UpNudge(MemitSequential):
    """Another edited module: the up projection of block 2 (``"mlp_up.2"``), its own update
    from the batch's size alone (a direct rule: no values, no C0)."""

    name = "toy-up"
    direct, uses_c0, sequential, woodbury = True, False, False, False

    def sites(self, cfg):
        return ["mlp_up.2"]

    def record_shape(self, n, d_in, d_out):
        return (1, 1)

    def updates(self, view, tokenizer, reqs, states, cfg):
        d_out, d_in = view.weight_out_in("mlp_up.2").shape
        u = torch.full((d_out, 1), 1e-3 * len(reqs))
        v = torch.linspace(-1, 1, d_in)[:, None]
        return {"mlp_up.2": (torch.zeros(1, 1), LowRankUpdate(u, v))}


@pytest.fixture
def toys():
    parts = (Shrunk, Counted, HalfShift, Checkered, UpNudge)
    for p in parts:
        register(p)
    yield
    for p in parts:
        unregister(p.name)


def test_own_settings_defaults_presets_namespacing_and_checks(toys):
    assert make_config("toy-shrunk", None).method_settings == {"toy-shrunk": {"shrink": 0.5}}
    cfg = make_config("toy-shrunk", "smollm2-135m")
    assert cfg.method_settings["toy-shrunk"]["shrink"] == 0.25 and cfg.lambda_p == 7.0
    assert make_config("toy-shrunk", None, shrink=0.75).method_settings["toy-shrunk"] == {
        "shrink": 0.75}
    cfg = make_config("toy-shrunk+toy-half", None, **{"toy-half.f": 0.1, "shrink": 1.0})
    assert cfg.method_settings == {"toy-shrunk": {"shrink": 1.0}, "toy-half": {"f": 0.1}}
    with pytest.raises(ConfigError, match="toy-shrunk.shrink must be in"):
        make_config("toy-shrunk", None, shrink=2.0)
    with pytest.raises(ConfigError, match="unknown setting"):
        make_config("encore", None, shrink=0.5)  # (encore has no such setting)


def _run(tiny_models, tokenizer, corpus, method, engine, reqs, **over):
    ed = Editor(copy.deepcopy(tiny_models["llama"]), tokenizer, method, preset=None,
                engine=engine, corpus=corpus, stats_cache=False, progress=False,
                **{**FAST, **over})
    ed.edit(reqs, batch_size=2)
    return ed


def _weights(ed):
    return {l: ed.edited_weight(l).detach().clone() for l in ed.hparams.layers}


def _same(a, b):
    return all(torch.equal(a[l], b[l]) for l in a)


@pytest.mark.parametrize("method", ["toy-shrunk", "toy-counted", "memit-seq+toy-half",
                                    "memit-seq+toy-checkered", "toy-counted+toy-half",
                                    "toy-up"])
@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_each_toy_undoes_saves_and_loads_bit_exactly(toys, tiny_models, tokenizer, corpus,
                                                     data_dir, method, engine, tmp_path):
    reqs = counterfact_requests(data_dir, 0, 6)
    ed = _run(tiny_models, tokenizer, corpus, method, engine, reqs[:2])
    one = _weights(ed)
    ed.edit(reqs[2:4], batch_size=2)
    ed.undo()
    assert _same(one, _weights(ed))
    ed.edit(reqs[2:4], batch_size=2)
    ed.history = 1  # the first batch folded into the base: its state saved as a state
    ed.save_edits(tmp_path / "e.safetensors")
    ed.edit(reqs[4:], batch_size=2)
    loaded = _run(tiny_models, tokenizer, corpus, method, engine, [])
    loaded.load_edits(tmp_path / "e.safetensors")
    loaded.edit(reqs[4:], batch_size=2)
    assert _same(_weights(ed), _weights(loaded))
    plain = _run(tiny_models, tokenizer, corpus, "memit-seq", engine, reqs)
    mine = _weights(ed)
    theirs = _weights(plain) if set(mine) == set(plain.sites) else {
        s: ed.matrices.original[s] for s in mine}  # (another module: its original)
    assert not _same(theirs, mine)  # (the toy changed the edits)


def test_persistent_state_is_saved_and_restored(toys, tiny_models, tokenizer, corpus, data_dir,
                                                tmp_path):
    reqs = counterfact_requests(data_dir, 0, 4)
    ed = _run(tiny_models, tokenizer, corpus, "toy-counted", "fast", reqs, history=0)
    assert all(float(st.extra["t"]) == 4 for st in ed.layer_states().values())
    ed.save_edits(tmp_path / "e.safetensors")
    loaded = _run(tiny_models, tokenizer, corpus, "toy-counted", "fast", [])
    loaded.load_edits(tmp_path / "e.safetensors")
    assert all(float(st.extra["t"]) == 4 for st in loaded.layer_states().values())
    loaded.reset()
    assert all(not st.extra for st in loaded.layer_states().values())


def test_a_masked_update_changes_only_its_entries(toys, tiny_models, tokenizer, corpus,
                                                  data_dir):
    ed = _run(tiny_models, tokenizer, corpus, "memit-seq+toy-checkered", "fast",
              counterfact_requests(data_dir, 0, 2))
    for layer in ed.hparams.layers:
        delta = ed.edited_weight(layer).detach() - ed.matrices.original[layer]
        rows, cols = delta.shape
        odd = (torch.arange(rows)[:, None] + torch.arange(cols)[None, :]) % 2 == 1
        assert bool((delta[odd] == 0).all()) and bool((delta[~odd] != 0).any())


def test_another_module_is_edited_and_nothing_else(toys, tiny_models, tokenizer, corpus,
                                                   data_dir):
    reqs = counterfact_requests(data_dir, 0, 2)
    ed = _run(tiny_models, tokenizer, corpus, "toy-up", "fast", reqs)
    before = dict(tiny_models["llama"].named_parameters())
    changed = [n for n, p in ed.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["model.layers.2.mlp.up_proj.weight"]
