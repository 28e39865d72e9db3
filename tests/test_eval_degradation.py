"""Perplexity windows, known-fact accuracy and norm growth on scripted cases."""

from __future__ import annotations

import json
import math

import pytest
from helpers import need_data

from encore_fast.eval.datasets import DatasetError, default_data_dir
from encore_fast.eval.degradation import (
    first_tokens,
    known_fact_hits,
    load_known_facts,
    norm_growth,
    perplexity,
    perplexity_windows,
    wikitext_perplexity,
)
from encore_fast.eval.testing import LookupLM, WordTokenizer


def alternating(bos: bool):
    tok = WordTokenizer(["a", "b", "c"], bos=bos)
    lm = LookupLM(len(tok))
    a, b = tok.id("a"), tok.id("b")
    lm.set_next(a, {b: 0.5})
    lm.set_next(b, {a: 0.25})
    lm.set_next(1, {a: 0.5})  # after BOS
    return lm, tok


@pytest.mark.parametrize("bos", [True, False])
def test_windows_and_perplexity(bos):
    lm, tok = alternating(bos)
    text = " ".join(["a b"] * 20)  # 40 tokens
    windows = perplexity_windows(tok, text, num_tokens=20, window=8)
    assert windows.shape == (2, 8 + bos)  # 20 tokens -> two whole windows of 8
    assert windows[1, bos:].tolist() == [tok.id(w) for w in "a b a b a b a b".split()]
    # per predicted token: a->b 0.5, b->a 0.25; with BOS also BOS->a 0.5 for the first token
    probs = [0.5, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5]
    if bos:
        probs = [0.5] + probs
    expected = math.exp(-sum(math.log(p) for p in probs) / len(probs))
    assert perplexity(lm, windows, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert perplexity(lm, windows, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size(tmp_path):
    tok = WordTokenizer(["a", "b", "c"])
    path = tmp_path / "wiki.txt"
    path.write_text("a b c " * 50)
    ppl = wikitext_perplexity(LookupLM(len(tok)), tok, path, num_tokens=64, window=16)
    assert ppl == pytest.approx(len(tok), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        wikitext_perplexity(LookupLM(len(tok)), tok, path, num_tokens=8, window=16)


def test_first_tokens_match_full_tokenisation():
    tok = WordTokenizer(["a", "b", "c"])
    text = "a b c " * 3000
    full = tok(text, add_special_tokens=False)["input_ids"]
    assert first_tokens(tok, text, 500) == full[:500]
    assert first_tokens(tok, "a b", 500) == full[:2]


def test_known_facts(tmp_path):
    tok = WordTokenizer(["Paris", "France", "capital", "of", "is", "Rome"])
    lm = LookupLM(len(tok))
    lm.set_next(tok.id("is"), {tok.id("Paris"): 0.6})
    facts = [
        {"prompt": "The capital of France is", "attribute": "Paris", "subject": "France"},
        {"prompt": "The capital of Italy is", "attribute": "Rome", "subject": "Italy"},
        {"prompt": "France of", "attribute": "Paris"},
    ]
    path = tmp_path / "known.json"
    path.write_text(json.dumps(facts))
    loaded = load_known_facts(path)
    assert [f.attribute for f in loaded] == ["Paris", "Rome", "Paris"]
    assert known_fact_hits(lm, tok, loaded) == [True, False, False]
    assert len(load_known_facts(path, n=2)) == 2
    path.write_text(json.dumps([facts[0], {"prompt": "x"}, {"attribute": 3, "prompt": "y"}]))
    with pytest.raises(DatasetError, match=r"\[1, 2\]"):
        load_known_facts(path)


def test_norm_growth():
    assert norm_growth({4: 2.0, 5: 4.0}, {4: 3.0, 5: 4.0}) == {4: 1.5, 5: 1.0}


def test_shared_known_facts_load():
    base = default_data_dir()
    if base is None or not (base / "known_1000.json").exists():
        need_data("known_1000.json")
    facts = load_known_facts(base / "known_1000.json", n=50)
    assert len(facts) == 50 and facts[0].attribute == "Antarctica"
