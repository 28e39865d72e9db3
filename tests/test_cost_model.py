"""The roofline cost model (benchmarks/cost_model.py): counted FLOPs against the analytic ones,
and the engines' and stages' ordering on the Llama3-8B shape (meta device: nothing allocated)."""

from __future__ import annotations

import sys

import pytest
from helpers import load_benchmark
from transformers import LlamaConfig


@pytest.fixture(scope="module")
def cm():
    mod = load_benchmark("cost_model")
    yield mod
    sys.modules.pop("cost_model", None)


@pytest.fixture(scope="module")
def llama(cm):
    return cm.MetaModel(cm.llama3_8b_config())


def tiny(cm):
    return cm.MetaModel(LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    vocab_size=97, attn_implementation="eager"))


@pytest.mark.parametrize(("rows", "seq"), [(1, 7), (3, 16)])
def test_block_flops_match_linear_params(cm, rows, seq):
    m = tiny(cm)
    assert str(m.model.device) == "meta"
    tokens = rows * seq
    attention = rows * m.prefix_attention(seq, seq)  # QKᵀ and PV over the full seq × seq
    linear = 2.0 * tokens * m.linear_params
    assert m.linear_params == 64 * (64 + 2 * 32 + 64) + 3 * 64 * 176
    assert m.block_flops(rows, seq) - attention == pytest.approx(linear, rel=1e-9)
    # frozen weights: input gradients only (linear 1×), attention matmuls both operands (2×)
    assert m.block_flops(rows, seq, True) - 2 * attention == pytest.approx(linear, rel=1e-9)
    assert m.head_flops(tokens) == 2.0 * tokens * 64 * 97


def test_fast_values_cheaper_and_bounds(cm, llama):
    a = cm.Assumptions()
    assert a.batch == 100 and a.layers == [4, 5, 6, 7, 8]
    *_, ref = cm.values_reference(llama, a)
    *_, fast = cm.values_fast(llama, a)
    assert fast.flops < ref.flops / 4 and fast.bytes < ref.bytes / 10
    assert cm.Row("values", "fast", fast).bound == "compute"
    assert cm.Row("apply", "fast", cm.apply(llama, a), "fp32").bound == "memory"
    apply_gb = cm.apply(llama, a).bytes / 1e9
    assert apply_gb == pytest.approx(5 * 4096 * 14336 * 12 / 1e9)
    assert cm.solve(llama, a, True).flops < cm.solve(llama, a, False).flops / 10
    assert cm.keys(llama, a, True).flops < cm.keys(llama, a, False).flops


def test_report_and_files(cm, llama, tmp_path, monkeypatch):
    rows = cm.batch_rows(llama, cm.Assumptions())
    ref, fast = cm.per_edit(rows, "reference", 100), cm.per_edit(rows, "fast", 100)
    assert 0 < fast < ref
    # more value steps cost more, linearly in FLOPs
    more = cm.batch_rows(llama, cm.Assumptions(steps=25.0))
    assert cm.per_edit(more, "fast", 100) > fast
    monkeypatch.setattr(cm, "llama3_8b_config", lambda: llama.model.config)
    out = tmp_path / "cost.md"
    assert cm.main(["--out", str(out), "--csv"]) == 0
    text = out.read_text()
    assert text.startswith("# Cost model") and "python benchmarks/cost_model.py --out" in text
    assert "| apply | fast |" in text and "s/edit" in text
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0] == "stage,engine,gflop,gb,floor_ms,bound" and len(lines) == len(rows) + 1
