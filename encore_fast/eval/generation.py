"""Realistic accuracy: does the edited model *say* the new target, without teacher forcing?

Teacher-forced scores (ES/PS) only compare two probabilities; QAEdit/WILD (arXiv 2502.11177)
showed they overstate what a user sees. Here the model continues each prompt greedily (batched,
left-padded, with the KV cache of ``generate``), and:

* **rewrite / paraphrase** (``real_es`` / ``real_ps``): a match when the continuation starts with
  the new target. Both are normalised first (:func:`normalise`: lower case, punctuation removed,
  whitespace collapsed, so the leading space does not matter), and the target must end at a word
  boundary: target "Paris" matches "Paris, the" and "paris." but not "Parisian".
* **neighbourhood** (``real_ns``): the share of neighbourhood prompts whose continuation (as many
  tokens as the true answer has, plus one; normalised) is the same as the unedited model's.

A record's share is averaged over its prompts, then records are averaged (as for ES/PS/NS).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch

from encore_fast.eval.datasets import EvalRecord
from encore_fast.eval.metrics import Shares, group_means, record_shares
from encore_fast.models.loading import pad_id
from encore_fast.models.placement import input_device
from encore_fast.requests import encode, target_token_ids

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower case, punctuation (Unicode category P*) dropped, whitespace collapsed/stripped."""
    kept = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return _SPACE.sub(" ", kept).strip()


def starts_with_target(continuation: str, target: str) -> bool:
    """The normalised continuation begins with the normalised target, ending at a word
    boundary (an empty target never matches)."""
    c, t = normalise(continuation), normalise(target)
    return bool(t) and (c == t or c.startswith(t + " "))


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str],
                         new_tokens: Sequence[int], batch_size: int = 16) -> list[str]:
    """The greedy continuation (decoded, prompt excluded) of each prompt, ``new_tokens[i]``
    tokens long (fewer at EOS). Batches of similar length, left-padded."""
    if len(new_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(new_tokens)} token counts")
    device = input_device(model)
    pad = pad_id(tokenizer)
    ids = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), new_tokens[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, i in enumerate(chunk):
            x[b, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[b, width - len(ids[i]) :] = 1
        steps = max(new_tokens[i] for i in chunk)
        gen = model.generate(input_ids=x.to(device), attention_mask=mask.to(device),
                             max_new_tokens=steps, do_sample=False, pad_token_id=pad)
        for b, i in enumerate(chunk):
            toks = gen[b, width : width + new_tokens[i]].tolist()
            out[i] = tokenizer.decode(toks, skip_special_tokens=True)
    return out


def realistic_metrics(model: torch.nn.Module, tokenizer: Any, records: Sequence[EvalRecord],
                      baseline: dict[str, str] | None = None, neighbours: int = 2,
                      batch_size: int = 16, groups: Sequence[str] = ("es", "ps", "ns"),
                      ) -> tuple[dict[str, float | None], dict[str, str]]:
    """``real_es``, ``real_ps``, ``real_ns`` over ``records`` (the first ``neighbours``
    neighbourhood prompts of each), and the neighbourhood answers keyed by prompt. Without a
    ``baseline`` (the unedited model's answers) ``real_ns`` is not computed."""
    result, answers, _ = realistic_scores(model, tokenizer, records, baseline, neighbours,
                                          batch_size, groups)
    return result, answers


def realistic_scores(model: torch.nn.Module, tokenizer: Any, records: Sequence[EvalRecord],
                     baseline: dict[str, str] | None = None, neighbours: int = 2,
                     batch_size: int = 16, groups: Sequence[str] = ("es", "ps", "ns"),
                     ) -> tuple[dict[str, float | None], dict[str, str], Shares]:
    """:func:`realistic_metrics`, and what they average: each record's share per group
    (``real_es``, ...; a record without prompts of a group has none there)."""
    jobs: list[tuple[int, str, str, str]] = []  # (record, group, prompt, target)
    for r, rec in enumerate(records):
        new = rec.request.target_new
        if "es" in groups:
            jobs.append((r, "es", rec.request.text, new))
        if "ps" in groups:
            jobs += [(r, "ps", p, new) for p in rec.paraphrase_prompts]
        truth = rec.neighborhood_answer or rec.request.ground_truth or ""
        if "ns" in groups:
            jobs += [(r, "ns", p, truth) for p in rec.neighborhood_prompts[:neighbours]]
    counts = [len(target_token_ids(tokenizer, t)) + 1 if t else 2 for _, _, _, t in jobs]
    texts = greedy_continuations(model, tokenizer, [j[2] for j in jobs], counts, batch_size)
    answers = {prompt: normalise(text) for (_, g, prompt, _), text in zip(jobs, texts,
                                                                          strict=True)
               if g == "ns"}
    hits: dict[str, dict[int, list[bool]]] = {f"real_{g}": {} for g in groups}
    for (r, group, prompt, target), text in zip(jobs, texts, strict=True):
        if group == "ns":
            if baseline is None or prompt not in baseline:
                continue
            ok = answers[prompt] == baseline[prompt]
        else:
            ok = starts_with_target(text, target)
        hits[f"real_{group}"].setdefault(r, []).append(ok)
    shares = record_shares(hits)
    result = {k: v for k, v in group_means(shares, len(records)).items() if k != "n_records"}
    return result, answers, shares  # type: ignore[return-value]
