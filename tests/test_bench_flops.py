"""The method benchmark's pieces (benchmarks/bench_methods.py, value_flops.py): the value step's
FLOPs against a hand count and torch's counter, the request's tokens, ``--methods all`` from the
registry, namespaced ``--set`` keys, and a failing method reported in its row while the others
run. No model is edited here."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

from encore_fast.methods import RULES, TRANSFORMS, register, unregister
from encore_fast.values.prompts import ValuePrompts

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SIBLINGS = ("value_flops", "bench_methods", "bench_engines", "compare_methods", "csv_rows",
            "tuned")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # (the benchmarks import each other)
    flops, methods = load_benchmark("value_flops"), load_benchmark("bench_methods")
    yield flops, methods
    for name in SIBLINGS:
        sys.modules.pop(name, None)


TINY = dict(hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_step_flops_hand_count(bench):
    flops, _ = bench
    shape = flops.Shape(**TINY)
    work = flops.StepWork(tokens=5, reads=2, own_pairs=9, prefix_pairs=4)
    # per token: q 2·8·8 + k 2·8·4 + v 2·8·4 + o 2·8·8 + gate, up, down 3·2·8·16 = 1152
    # per pair: QKᵀ and PV, 2·4 each per head, 2 heads = 32; head: 2·8·10 per read = 160
    fwd = 3 * (5 * 1152 + 32 * (9 + 4)) + 2 * 160
    bwd = 3 * (5 * 1152 + 32 * (2 * 9 + 4)) + 2 * 160  # dX only; own pairs 2×, prefix 1×
    assert flops.step_flops(shape, 3, work) == (fwd, bwd) == (18848.0, 19712.0)
    two = flops.Shape(**TINY, gated=False)  # GPT-2-style MLP: 2 matrices
    assert flops.step_flops(two, 1, flops.StepWork(1, 0, 0, 0)) == (1152 - 256,) * 2


def test_step_flops_match_torch_counter_on_a_frozen_block(bench):
    """One Llama block, eager attention over a whole (causal, unmasked-computed) sequence of
    ``s`` tokens: torch's counter sees ``s²`` score pairs; weights frozen, input with grad."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    flops, _ = bench
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).requires_grad_(False)
    s = 6
    x = torch.randn(1, s, 32, requires_grad=True)
    pos = torch.arange(s)[None]
    rope = model.model.rotary_emb(x, pos)
    with FlopCounterMode(display=False) as fwd:
        y = model.model.layers[0](x, position_ids=pos, position_embeddings=rope)
    y = y[0] if isinstance(y, tuple) else y
    with FlopCounterMode(display=False) as bwd:
        y.backward(torch.ones_like(y))
    work = flops.StepWork(tokens=s, reads=0, own_pairs=s * s, prefix_pairs=0)
    expect = flops.step_flops(flops.Shape.of(cfg), 1, work)
    assert (fwd.get_total_flops(), bwd.get_total_flops()) == expect


def test_shape_from_configs(bench):
    from transformers import GPT2Config, LlamaConfig

    flops, _ = bench
    llama = flops.Shape.of(LlamaConfig(hidden_size=64, intermediate_size=96,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       vocab_size=100))
    assert llama == flops.Shape(64, 96, 4, 2, 16, 100, True)
    gpt2 = flops.Shape.of(GPT2Config(n_embd=32, n_head=4, vocab_size=70))
    assert gpt2 == flops.Shape(32, 128, 4, 4, 8, 70, False)


def test_request_work_counts_suffixes_pairs_and_reads(bench):
    flops, _ = bench
    # two rewrite prompts (lookup 3 of 6 tokens, 5 of 7) and one KL prompt (lookup 2), 2 targets
    p = ValuePrompts(input_ids=[[0] * 6, [0] * 7, [0] * 4], lookup=[3, 5, 2],
                     target_ids=[7, 8], target_start=[4, 6], n_rewrite=2)
    work = flops.request_work(p)
    assert work.tokens == 3 + 2 + 1
    assert work.own_pairs == 6 + 3 + 1 and work.prefix_pairs == 3 * 3 + 2 * 5 + 1 * 2
    assert work.reads == 2 * 2 + 1
    per, total = flops.value_flops(flops.Shape(**TINY), 2, [work, work], [3, 0])
    f, b = flops.step_flops(flops.Shape(**TINY), 2, work)
    assert per == f + b and total == 3 * (f + b) + f + f  # a forward more per request


def test_matmul_ceiling_is_a_rate(bench):
    flops, _ = bench
    rate = flops.matmul_ceiling(32, torch.float32, warmup=1, repeats=2)
    assert 0 < rate < float("inf")


def test_all_is_built_from_the_registry(bench):
    _, bm = bench
    names = bm.expand_methods("all")
    assert names[: len(RULES)] == list(RULES)
    parts = {*RULES, *TRANSFORMS}
    for comp in bm.PUBLISHED:
        assert (comp in names) == set(comp.split("+")).issubset(parts)
    assert "alphaedit+sphere" in names and "alphaedit+nas" in names
    assert "nas" not in names  # the alias of alphaedit+nas: one run per method
    assert len({bm.method_key(n) for n in names}) == len(names)
    rect = TRANSFORMS["rect"]
    unregister("rect")  # a part that is not registered: its compositions are left out
    try:
        assert "memit-seq+rect" not in bm.expand_methods("all")
    finally:
        register(rect)
    assert bm.expand_methods("encore, nas,alphaedit+nas,,bogus,encore") == [
        "encore", "nas", "bogus"]


def test_set_takes_namespaced_keys_and_any_name_of_a_method(bench):
    _, bm = bench
    _, methods, over = bm.parse_args(["--methods", "encore,nas", "--set",
                                      "alphaedit+nas:nas.anchor=3.2", "--set", "encore:lambda_p=5"])
    assert methods == ["encore", "nas"]
    assert over == {"alphaedit+nas": {"nas.anchor": 3.2}, "encore": {"lambda_p": 5}}
    with pytest.raises(SystemExit):
        bm.parse_args(["--methods", "encore", "--set", "memit:lambda_p=5"])


def test_a_failing_method_gets_a_failed_row_and_the_others_run(bench, monkeypatch, tmp_path,
                                                               capsys):
    _, bm = bench
    ran = []

    def fake(model, tok, method, requests, batch_size, overrides, ceiling):
        ran.append(method)
        if method == "memit":
            raise RuntimeError("solve diverged\nat layer 4")
        s = {"encore": 0.5, "alphaedit+nas": 1.0}[method]
        return dict(method=method, s_per_edit=s, values=s / 2, update=s / 2, steps=3.0,
                    status="ok", flops_per_step=1e9, value_flops_per_s=2e9,
                    fraction_of_matmul=2e9 / ceiling)

    monkeypatch.setattr(bm, "time_method", fake)
    methods = ["encore", "memit", "not-a-method", "alphaedit+nas"]
    rows = bm.run_methods(None, None, methods, [], 1, {"alphaedit+nas": {"nas.anchor": 3.2}},
                          4e9)
    assert ran == ["encore", "memit", "alphaedit+nas"]  # unknown: failed before any copy
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert rows[1]["error"] == "RuntimeError: solve diverged at layer 4"
    assert "not-a-method" in rows[2]["error"] and rows[3]["settings"] == "nas.anchor=3.2"
    first = bm.compare_with_first(rows)
    assert first is rows[0] and rows[3]["time_vs_first"] == 2.0
    bm.print_table(rows)
    out = capsys.readouterr().out
    assert "failed" in out and "50.0%" in out
    path = tmp_path / "m.csv"
    bm.append_rows(path, list(bm.COLUMNS), [[r.get(c) for c in bm.COLUMNS] for r in rows],
                   command="bench_methods.py")
    written = list(csv.DictReader(path.open(newline="")))
    assert [r["status"] for r in written] == ["ok", "failed", "failed", "ok"]
    assert written[1]["flops_per_step"] == "" and written[0]["matmul_flops_per_s"] == "4000000000.0"
