"""Realistic accuracy: the match rules (case, leading space, punctuation, word boundary,
multi-token targets), batched greedy generation equal to one prompt at a time, and the
neighbourhood rule (answers unchanged from the unedited model's)."""

from __future__ import annotations

import copy

import pytest
import torch

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.generation import (
    greedy_continuations,
    normalise,
    realistic_metrics,
    starts_with_target,
)
from encore_fast.requests import EditRequest


@pytest.mark.parametrize("continuation,target,ok", [
    (" Paris, the capital", "Paris", True),
    ("paris.", " Paris", True),
    (" PARIS", "Paris", True),
    (" Parisian cafés", "Paris", False),  # word boundary
    (" New York City", "New York", True),  # multi-token target
    (" New Jersey", "New York", False),
    (" the Boston Celtics", "Boston Celtics", False),  # must start with it
    ("\nLondon", "London", True),
    (" anything", "", False),
])
def test_match_rules(continuation, target, ok):
    assert starts_with_target(continuation, target) is ok


def test_normalise():
    assert normalise("  Hello,   World! ") == "hello world"
    assert normalise("U.S.") == "u s"


@pytest.fixture
def model(tiny_models):
    return copy.deepcopy(tiny_models["llama"]).eval()


def test_batched_generation_equals_one_at_a_time(model, tokenizer):
    prompts = ["The capital of France is", "Hi", "A much longer prompt about a city that is"]
    counts = [3, 5, 2]
    batched = greedy_continuations(model, tokenizer, prompts, counts, batch_size=3)
    for p, n, got in zip(prompts, counts, batched, strict=True):
        ids = torch.tensor([tokenizer.encode(p)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        assert got == tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_realistic_metrics_on_the_models_own_answers(model, tokenizer):
    prompt = "The capital of France is"
    said = greedy_continuations(model, tokenizer, [prompt], [4])[0]
    target = said.strip().split(" ")[0] or said.strip()
    rec = EvalRecord(EditRequest("{} is", "The capital of France", target, "x"), "counterfact",
                     paraphrase_prompts=[prompt], neighborhood_prompts=["Hi", "Hello there"],
                     neighborhood_answer="x")
    real, answers = realistic_metrics(model, tokenizer, [rec], None)
    assert real["real_ns"] is None and set(answers) == {"Hi", "Hello there"}
    real, _ = realistic_metrics(model, tokenizer, [rec], answers)
    assert normalise(target)  # (a word the model says: the rule has something to match)
    assert real["real_es"] == 1.0 and real["real_ps"] == 1.0
    assert real["real_ns"] == 1.0
    changed = {k: v + " changed" for k, v in answers.items()}
    real, _ = realistic_metrics(model, tokenizer, [rec], {**changed, "Hi": answers["Hi"]})
    assert real["real_ns"] == 0.5
