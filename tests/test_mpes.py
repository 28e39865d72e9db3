"""MPES counts prompts (not token positions), never resets, and stops at count k+1."""

from __future__ import annotations

import pytest
import torch

from encore_fast.values.objective import MPES, prompts_correct


def first_stop(flags, extra):
    m = MPES(extra)
    for i, f in enumerate(flags):
        if m.update(f):
            return i
    return None


@pytest.mark.parametrize("flags,extra,expected", [
    ([False, True, False, True, True], 2, 4),   # count 1 at step 1, never reset, 3 at step 4
    ([False, True, False, True, True], 1, 3),
    ([True, True], 0, 0),
    ([False] * 10, 0, None),
    ([True] * 10, None, None),  # disabled
])
def test_mpes_scripted(flags, extra, expected):
    assert first_stop(flags, extra) == expected


def test_multi_token_targets_count_prompts():
    # 5 prompts, 2-token target: 5 correct positions in total, but spread so that only
    # prompts 0 and 1 are entirely correct. The public code's "count == 5" would stop here.
    targets = torch.tensor([[7, 9]] * 5)
    pred = torch.tensor([[7, 9], [7, 9], [7, 0], [0, 0], [0, 0]])
    mask = torch.ones(5, 2)
    correct = prompts_correct(pred, targets, mask)
    assert correct.tolist() == [True, True, False, False, False]
    assert int((pred == targets).sum()) == 5 and not bool(correct.all())
    # Masked positions are ignored.
    mask[2, 1] = 0
    assert prompts_correct(pred, targets, mask).tolist()[2] is True
