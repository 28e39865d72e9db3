"""Downstream tasks: F1/MCC on known confusion matrices, label-word scoring (the lower mean
NLL wins; the shared-context, left-padded batch equals scoring each full text alone), and the
task files' prompts and labels."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from encore_fast.eval.downstream import (
    TASKS,
    DownstreamError,
    accuracy,
    confusion,
    f1_weighted,
    label_nll,
    load_task,
    mcc,
    predict,
)
from encore_fast.requests import encode


def test_binary_f1_mcc_accuracy_by_hand():
    gold, pred = [0, 0, 1, 1], [0, 1, 1, 1]
    assert confusion(gold, pred, 2) == [[1, 1], [0, 2]]
    assert f1_weighted(gold, pred, 2) == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.8)
    assert mcc(gold, pred, 2) == pytest.approx(2 / math.sqrt(12))  # (TP·TN − FP·FN)/√…
    assert accuracy(gold, pred) == 0.75


def test_multiclass_mcc_and_degenerate_cases():
    gold, pred = [0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 2]
    assert mcc(gold, pred, 3) == pytest.approx(6 / (math.sqrt(22) * math.sqrt(24)))
    # class 0: P=2/3 R=1 -> 0.8; class 1: 0; class 2: P=1/2 R=1/2 -> 0.5; weights 1/3 each
    assert f1_weighted(gold, pred, 3) == pytest.approx((0.8 + 0.0 + 0.5) / 3)
    assert mcc([1, 1, 0], [1, 1, 1], 2) == 0.0  # one predicted class: undefined -> 0
    assert mcc([0, 1], [0, 1], 2) == pytest.approx(1.0)
    assert mcc([0, 1], [1, 0], 2) == pytest.approx(-1.0)


def test_predict_takes_the_lowest_nll():
    assert predict(torch.tensor([[1.0, 0.5], [0.2, 0.9], [3.0, 2.0]])) == [1, 0, 1]


def _full_nll(model, tokenizer, text, label):
    """Mean NLL of `label` (leading space) after `text`, one full forward, no cache."""
    ids = encode(tokenizer, text)
    lab = tokenizer.encode(" " + label, add_special_tokens=False)
    x = torch.tensor([ids + lab])
    logp = model(input_ids=x).logits.detach().float().log_softmax(-1)[0]
    return -sum(float(logp[len(ids) - 1 + t, tok]) for t, tok in enumerate(lab)) / len(lab)


@pytest.mark.parametrize("labels", [("positive", "negative"), ("Yes", "No, not at all")])
def test_label_nll_equals_scoring_each_text_alone(tiny_models, tokenizer, labels):
    model = copy.deepcopy(tiny_models["llama"]).eval()
    context = "Review : fine\nSentiment : positive\n\n"
    prompts = ["Review : a dull film\nSentiment :", "Review : great\nSentiment :",
               "Review : it is long and it is slow and it never ends\nSentiment :"]
    got = label_nll(model, tokenizer, context, prompts, labels, batch_size=2)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            want = _full_nll(model, tokenizer, context + p, lab)
            assert float(got[i, j]) == pytest.approx(want, abs=1e-4)


def test_task_files_prompts_labels_and_shots(data_dir):
    folder = data_dir / "downstream"
    rte = load_task("rte", folder, shots=2, n=5)
    assert rte.context.count("\n\n") == 2 and len(rte.prompts) == 5
    assert rte.prompts[0].endswith("True or False?\nanswer:")
    assert TASKS["rte"].labels[1] == "False"  # GLUE RTE: 1 = not entailed
    nli = load_task("nli", folder, shots=0, n=None)
    assert set(nli.gold) == {0, 1} and len(nli.prompts) == 2489 and nli.context == ""
    mmlu = load_task("mmlu", folder, shots=1, n=3)
    assert "(D) " in mmlu.prompts[0] and set(mmlu.gold) <= {0, 1, 2, 3}
    with pytest.raises(DownstreamError, match="unknown downstream task"):
        load_task("glue", folder)
    with pytest.raises(DownstreamError, match="no file"):
        load_task("sst2", folder / "missing")
