"""Metrics on a scripted LM whose every probability is known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.metrics import (
    counterfact_metrics,
    evaluate_records,
    generation_entropy,
    greedy_generate,
    harmonic_mean,
    next_token_is,
    ngram_entropy,
    score_targets,
    zsre_metrics,
)
from encore_fast.eval.testing import LookupLM, WordTokenizer
from encore_fast.requests import EditRequest

WORDS = ["Tom", "lives", "in", "is", "speaks", "Paris", "Rome", "New", "York", "A", "B", "C", "x"]


def make(bos: bool = True) -> tuple[LookupLM, WordTokenizer]:
    tok = WordTokenizer(WORDS, bos=bos)
    lm = LookupLM(len(tok))
    t = tok.id
    lm.set_next(t("in"), {t("Paris"): 0.5, t("New"): 0.3, t("Rome"): 0.1})
    lm.set_next(t("New"), {t("York"): 0.9})
    lm.set_next(t("is"), {t("A"): 0.6, t("C"): 0.3})  # "A B": mean prob 0.325
    lm.set_next(t("A"), {t("B"): 0.05})
    lm.set_next(t("speaks"), {t("Paris"): 0.3, t("Rome"): 0.3})  # a tie
    return lm, tok


def record(prompt, new, true, para=(), neigh=(), answer=None, kind="counterfact"):
    req = EditRequest(prompt=prompt, subject="Tom", target_new=new, ground_truth=true)
    return EvalRecord(req, kind, list(para), list(neigh), answer)


@pytest.mark.parametrize("bos", [True, False])
def test_teacher_forced_multi_token_probabilities(bos):
    lm, tok = make(bos)
    prompts = ["Tom lives in", "Tom lives in", "Tom is", "x"]
    targets = ["New York", "Paris", "A B", "Rome"]
    scores = score_targets(lm, tok, prompts, targets, batch_size=3)
    assert scores[0].log_probs.exp().tolist() == pytest.approx([0.3, 0.9], rel=1e-5)
    assert scores[0].mean_prob == pytest.approx(0.6, rel=1e-5)
    assert scores[1].mean_prob == pytest.approx(0.5, rel=1e-5)
    assert scores[2].mean_prob == pytest.approx(0.325, rel=1e-5)
    assert scores[3].mean_prob == pytest.approx(1 / len(tok), rel=1e-5)  # uniform after "x"
    assert scores[0].correct.tolist() == [False, True]  # Paris is top-1 after "in"
    # padding and batching do not change anything
    single = score_targets(lm, tok, prompts, targets, batch_size=1)
    for a, b in zip(scores, single, strict=True):
        assert torch.allclose(a.log_probs, b.log_probs)


def test_one_forward_per_batch():
    lm, tok = make()
    score_targets(lm, tok, ["Tom lives in"] * 7, ["New York"] * 7, batch_size=3)
    assert lm.calls == 3


def test_efficacy_uses_mean_per_token_probability():
    lm, tok = make()
    # "A B": per-token probs 0.6, 0.05 -> mean 0.325 > 0.3 for "C"; mean NLL would say the
    # opposite (geometric mean 0.17 < 0.3), so this pins the definition the issue asks for.
    m = counterfact_metrics(lm, tok, [record("Tom is", "A B", "C")])
    assert m["es"] == 1.0
    m = counterfact_metrics(lm, tok, [record("Tom lives in", "New York", "Paris")])
    assert m["es"] == 1.0  # 0.6 > 0.5
    m = counterfact_metrics(lm, tok, [record("Tom lives in", "Rome", "Paris")])
    assert m["es"] == 0.0


def test_ties_fail_both_efficacy_and_neighbourhood():
    lm, tok = make()
    rec = record("Tom speaks", "Rome", "Paris", neigh=["x speaks"], answer="Paris")
    m = counterfact_metrics(lm, tok, [rec])
    assert m["es"] == 0.0
    assert m["ns"] == 0.0
    assert m["s"] == 0.0


def test_paraphrase_neighbourhood_and_score():
    lm, tok = make()
    recs = [
        # ES ok (0.5 > 0.1); paraphrases ok, tie -> 0.5; neighbourhood Rome 0.1 < 0.5 -> 0
        record(
            "Tom lives in",
            "Paris",
            "Rome",
            para=["x in", "x speaks"],
            neigh=["x in"],
            answer="Rome",
        ),
        # ES fails; paraphrase fails -> 0; neighbourhood ok, tie -> 0.5
        record(
            "Tom lives in",
            "Rome",
            "Paris",
            para=["x in"],
            neigh=["x in", "x speaks"],
            answer="Paris",
        ),
    ]
    m = counterfact_metrics(lm, tok, recs)
    assert m["es"] == pytest.approx(0.5)
    assert m["ps"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["ns"] == pytest.approx((0.0 + 0.5) / 2)
    assert m["s"] == pytest.approx(harmonic_mean([0.5, 0.25, 0.25]))
    assert m["n_records"] == 2


def test_neighbourhood_uses_its_own_answer():
    lm, tok = make()
    rec = record("Tom is", "Paris", "Rome", neigh=["x in"], answer="New York")
    assert counterfact_metrics(lm, tok, [rec])["ns"] == 1.0  # New York 0.6 > Paris 0.5


def test_harmonic_mean():
    assert harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert harmonic_mean([0.9, 0.0, 1.0]) == 0.0


def test_zsre_token_accuracy():
    lm, tok = make()
    recs = [
        record(
            "Tom is",
            "A B",
            None,
            para=["x lives in"],
            neigh=["x in"],
            answer="New York",
            kind="zsre",
        ),
    ]
    m = zsre_metrics(lm, tok, recs)
    assert m["rewrite_acc"] == pytest.approx(0.5)  # A is top-1 after "is", B is not after A
    assert m["paraphrase_acc"] == pytest.approx(0.0)  # after "in" top-1 is Paris, not A
    assert m["neighborhood_acc"] == pytest.approx(0.5)  # New: miss (Paris); York: hit
    assert evaluate_records(lm, tok, recs) == m


def test_next_token_is_checks_first_target_token():
    lm, tok = make()
    hits = next_token_is(
        lm, tok, ["Tom lives in", "Tom lives in", "Tom is"], ["Paris Rome", "New York", "A"]
    )
    assert hits == [True, False, True]


def test_ngram_entropy_known_strings():
    assert ngram_entropy("a a a a a") == 0.0
    # 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit); weights 2/3, 4/3, mean
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1) / 2)
    assert ngram_entropy("a") == 0.0
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * 1.0 + 4 / 3 * h3) / 2
    assert ngram_entropy("x y x y x") == pytest.approx(expected)
    assert generation_entropy(["a a a a", "a b c d"]) == pytest.approx(ngram_entropy("a b c d") / 2)


def test_greedy_generation_and_ge():
    lm, tok = make()
    lm.set_next(tok.id("A"), {tok.id("B"): 0.9})
    lm.set_next(tok.id("B"), {tok.id("A"): 0.9})
    text = greedy_generate(lm, tok, "A", max_new_tokens=4)
    assert text == "A B A B A"
    lm.set_next(tok.id("C"), {tok.eos_token_id: 0.9})
    assert greedy_generate(lm, tok, "B A C", max_new_tokens=4) == "B A C"  # stopped at EOS
    rec = EvalRecord(
        EditRequest("Tom is", "Tom", "B", "C"), "counterfact", generation_prompts=["A"]
    )
    m = counterfact_metrics(lm, tok, [rec], generation_tokens=4)
    assert m["ge"] == pytest.approx(ngram_entropy("A B A B A"))
    m = counterfact_metrics(lm, tok, [rec])
    assert "ge" not in m
