"""Value optimisation: MPES stops where the rule says; prompts and keys are laid out right."""

from __future__ import annotations

import pytest
import torch

from encore_fast.config import make_config
from encore_fast.models import ModelView
from encore_fast.requests import EditRequest, subject_last_index
from encore_fast.values.keys import compute_keys
from encore_fast.values.objective import MPES
from encore_fast.values.prompts import build_value_prompts
from encore_fast.values.reference import optimize_value

CONTEXTS = ["{}", "Once upon a time. {}", "I think. {}"]
REQ = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English Spanish",
                  case_id=0)


def test_subject_index_points_at_subject_end(tokenizer):
    template = "Once upon a time. The mother tongue of {} is"
    idx = subject_last_index(tokenizer, template, "Danielle Darrieux")
    ids = tokenizer(template.format("Danielle Darrieux"))["input_ids"]
    assert tokenizer.decode(ids[: idx + 1]).endswith("Darrieux")
    assert not tokenizer.decode(ids[:idx]).endswith("Darrieux")


def test_prompt_layout(tokenizer):
    p = build_value_prompts(tokenizer, REQ, CONTEXTS)
    assert p.n_rewrite == 3 and p.n_prompts == 4 and len(p.target_ids) >= 2
    for i in range(p.n_rewrite):
        ids = p.input_ids[i]
        # positions target_start.. predict the target; the prompt holds all but its last token
        assert ids[p.target_start[i] + 1 :] == p.target_ids[:-1]
        assert tokenizer.decode(ids[: p.lookup[i] + 1]).endswith("Darrieux")
    assert tokenizer.decode(p.input_ids[-1]).endswith("Darrieux is a")


def test_mpes_stops_where_the_rule_says(tiny_models, tokenizer):
    """Run once without MPES, recording per-step correctness; with MPES +k the run must stop
    at the step where the k+1-th all-correct step happens (same trajectory until then)."""
    view = ModelView(tiny_models["llama"])
    base = dict(layers=[3], v_num_grad_steps=12, v_lr=0.3, clamp_norm_factor=100.0,
                kl_factor=0.0, v_weight_decay=0.0, loss_cutoff=0.0)
    # Subject at the end of the prompt: δ acts directly on the position predicting the target.
    req = EditRequest("The mother tongue is {}", "Danielle Darrieux", "English")
    prompts = build_value_prompts(tokenizer, req, CONTEXTS)
    free = optimize_value(view, tokenizer, prompts, 3,
                          make_config("encore", None, mpes_extra_steps=None, **base))
    hist = free.correct_history
    assert any(hist), "the tiny model never reached the target; test setup is too weak"
    for k in (0, 1, 2):
        expected = next((i for i in range(len(hist)) if MPES_count(hist, i) >= k + 1), None)
        res = optimize_value(view, tokenizer, prompts, 3,
                             make_config("encore", None, mpes_extra_steps=k, **base))
        if expected is None:
            assert not res.mpes_stopped
        else:
            assert res.mpes_stopped and res.steps == expected + 1 and res.updates == expected
            assert res.loss_history == pytest.approx(free.loss_history[: expected + 1])


def MPES_count(hist, i):
    return sum(hist[: i + 1])


def test_mpes_class_matches_helper():
    m = MPES(1)
    assert [m.update(f) for f in (False, True, False, True)] == [False, False, False, True]


def test_keys_average_raw_and_prefixed(tiny_models, tokenizer):
    view = ModelView(tiny_models["gpt2"])
    both = compute_keys(view, tokenizer, [REQ], CONTEXTS, 2)
    single = [compute_keys(view, tokenizer, [REQ], [c], 2) for c in CONTEXTS]
    expected = 0.5 * single[0] + 0.25 * (single[1] + single[2])
    assert torch.allclose(both, expected, atol=1e-5)


def test_reused_lower_blocks_give_the_same_keys(tiny_models, tokenizer):
    """Fast-engine key passes start from the recorded input of the first edited layer; after an
    edit of that layer they must equal a full recomputation."""
    import copy

    from encore_fast.values.keys import SubjectForwards

    model = copy.deepcopy(tiny_models["llama"])
    view = ModelView(model)
    reqs = [REQ, EditRequest("{} plays for", "LeBron James", "Arsenal")]
    fwd = SubjectForwards(view, tokenizer, reqs, CONTEXTS, reuse_below=2, chunk=4)
    first = fwd.keys(3)
    assert all(s is not None for s in fwd.keys_rows.start)
    with torch.no_grad():
        view.weight(2).mul_(1.7)  # an edit of the first edited layer
        view.weight(1).mul_(1.0)
    again = fwd.keys(3)
    full = compute_keys(view, tokenizer, reqs, CONTEXTS, 3)
    assert not torch.allclose(first, full)
    assert torch.allclose(again, full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fwd.block_outputs(4), SubjectForwards(
        view, tokenizer, reqs, CONTEXTS).block_outputs(4), rtol=1e-5, atol=1e-6)
