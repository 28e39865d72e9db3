"""Edit-quality metrics: CounterFact (ES, PS, NS, S, GE) and zsRE (top-1 token accuracy).

All scoring is teacher-forced and batched: each (prompt, target) pair becomes
``encode(prompt) + target_ids[:-1]`` (BOS included when the tokenizer adds one, the target
with the leading-space convention of :func:`encore_fast.requests.target_token_ids`), the batch
is padded on the right, one forward runs per batch, and only the rows at target positions are
turned into log-probabilities.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from encore_fast.eval.datasets import EvalRecord
from encore_fast.models.loading import pad_id
from encore_fast.models.placement import input_device
from encore_fast.requests import encode, prompt_ids, target_token_ids


@dataclass
class TargetScore:
    """Per-token results for one (prompt, target) pair."""

    log_probs: torch.Tensor  # [T] log P(target token t | prompt, target tokens < t)
    correct: torch.Tensor  # [T] bool, argmax of the next-token logits == target token

    @property
    def mean_prob(self) -> float:
        """Mean per-token probability of the target (the P the CounterFact metrics compare)."""
        return self.log_probs.exp().mean().item()

    @property
    def accuracy(self) -> float:
        """Share of target tokens predicted top-1 (zsRE's token accuracy)."""
        return self.correct.float().mean().item()


@torch.no_grad()
def score_token_ids(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad: int = 0,
    batch_size: int = 16,
) -> list[TargetScore]:
    """Score (prompt ids, target ids) pairs; one forward per batch of pairs.

    Pairs are grouped by length (less padding) and returned in input order.
    """
    for i, (prompt, target) in enumerate(pairs):
        if not prompt or not target:
            raise ValueError(f"pair #{i}: empty prompt or target token list")
    device = input_device(model)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    out: list[TargetScore | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1][:-1] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, tgts = [], [], []
        for b, (i, seq) in enumerate(zip(chunk, seqs, strict=True)):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            prompt, target = pairs[i]
            for j, tok in enumerate(target):
                rows.append(b)
                cols.append(len(prompt) + j - 1)  # logits here predict target token j
                tgts.append(tok)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        picked = picked.float()
        tgt = torch.tensor(tgts, device=device)
        log_probs = picked.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1).cpu()
        correct = (picked.argmax(-1) == tgt).cpu()
        pos = 0
        for i in chunk:
            n = len(pairs[i][1])
            out[i] = TargetScore(log_probs[pos : pos + n], correct[pos : pos + n])
            pos += n
    return out  # type: ignore[return-value]


def score_targets(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
    chat: bool = False,
) -> list[TargetScore]:
    """Teacher-forced per-token log-probs and top-1 hits of ``targets`` after ``prompts``
    (``chat``: each prompt asked as the user's turn of the chat template, each target the
    start of the assistant's answer)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pairs = [
        (prompt_ids(tokenizer, p, chat), target_token_ids(tokenizer, t, chat))
        for p, t in zip(prompts, targets, strict=True)
    ]
    return score_token_ids(model, pairs, pad_id(tokenizer), batch_size)


def next_token_is(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 16,
) -> list[bool]:
    """Whether the model's top-1 next token after each prompt is its target's first token."""
    pairs = [
        (encode(tokenizer, p), target_token_ids(tokenizer, t)[:1])
        for p, t in zip(prompts, targets, strict=True)
    ]
    scores = score_token_ids(model, pairs, pad_id(tokenizer), batch_size)
    return [bool(s.correct[0]) for s in scores]


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (ROME's score S)."""
    if not values:
        raise ValueError("harmonic mean of nothing")
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --- CounterFact ---------------------------------------------------------------------------


def counterfact_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    batch_size: int = 16,
    generation_tokens: int = 0,
    generation_source: Literal["dataset", "rewrite"] = "dataset",
    groups: tuple[str, ...] = ("es", "ps", "ns"),
) -> dict[str, float | int | None]:
    """ES, PS, NS (those in ``groups``), their harmonic mean S, and optionally GE, over
    ``records``.

    P(target) is the *mean per-token probability* of the target's tokens, teacher-forced (ROME
    compares mean per-token NLL instead; the two can disagree on multi-token targets).
    ES: share of rewrite prompts with P(new) > P(true); PS: the same on paraphrases;
    NS: share of neighbourhood prompts with P(true) > P(new). Ties count as failures for both.
    Each record's share is averaged over its prompts, then records are averaged (as ROME's
    summary does); S is the harmonic mean of those of ES, PS, NS that exist.
    GE (when ``generation_tokens`` > 0): see :func:`generation_entropy`; prompts come from the
    records' ``generation_prompts`` (records without them are skipped) or, with
    ``generation_source="rewrite"``, from each rewrite prompt (for data without them).
    """
    result, _ = counterfact_scores(model, tokenizer, records, batch_size, groups)
    if generation_tokens > 0:
        result["ge"] = records_generation_entropy(model, tokenizer, records, generation_tokens,
                                                  generation_source)
    return result


Shares = dict[str, dict[int, float]]  # group -> {record's position in the list: its share}


def efficacy_shares(model: torch.nn.Module, tokenizer: Any, records: Sequence[EvalRecord],
                    batch_size: int = 16, chat: bool = False) -> Shares:
    """Per record (0/1), its rewrite prompt asked plain or (``chat``) in the chat template:
    ``top1`` (every token of the new target is the top-1 prediction, teacher-forced) and, for
    records with a true answer, ``es`` (P(new) > P(true))."""
    prompts = [rec.request.text for rec in records]
    new = score_targets(model, tokenizer, prompts, [r.request.target_new for r in records],
                        batch_size, chat)
    shares: Shares = {"top1": {i: float(bool(s.correct.all())) for i, s in enumerate(new)}}
    known = [i for i, rec in enumerate(records) if rec.request.ground_truth is not None]
    if known:
        true = score_targets(model, tokenizer, [prompts[i] for i in known],
                             [records[i].request.ground_truth or "" for i in known],
                             batch_size, chat)
        shares["es"] = {i: float(new[i].mean_prob > t.mean_prob)
                        for i, t in zip(known, true, strict=True)}
    return shares


def counterfact_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    batch_size: int = 16,
    groups: tuple[str, ...] = ("es", "ps", "ns"),
) -> tuple[dict[str, float | int | None], Shares]:
    """:func:`counterfact_metrics` (GE aside) and what they average: each record's share of
    successful prompts, per group (a record without prompts of a group has none there)."""
    pairs, slots = _counterfact_pairs(records, groups)
    scores = score_targets(
        model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], batch_size
    )
    hits: dict[str, dict[int, list[bool]]] = {g: {} for g in groups}
    for k, (r, group) in enumerate(slots):
        p_new, p_true = scores[2 * k].mean_prob, scores[2 * k + 1].mean_prob
        ok = p_new > p_true if group in ("es", "ps") else p_true > p_new
        hits[group].setdefault(r, []).append(ok)
    shares = record_shares(hits)
    result = group_means(shares, len(records))
    present = [v for v in (result.get(g) for g in ("es", "ps", "ns")) if v is not None]
    result["s"] = harmonic_mean(present) if present else None  # type: ignore[arg-type]
    return result, shares


def record_shares(hits: dict[str, dict[int, list[Any]]]) -> Shares:
    """Per group, each record's mean over its prompts (the values records are averaged from)."""
    return {g: {r: sum(h) / len(h) for r, h in per.items()} for g, per in hits.items()}


def group_means(shares: Shares, n_records: int) -> dict[str, float | int | None]:
    """``n_records``, then each group's mean over the records that have it (None: none)."""
    result: dict[str, float | int | None] = {"n_records": n_records}
    for group, per_record in shares.items():
        result[group] = _mean(list(per_record.values()))
    return result


def group_counts(shares: Shares, prefix: str = "") -> dict[str, int]:
    """``n_<prefix><group>``: the records each group's score is averaged over."""
    return {f"n_{prefix}{g}": len(per) for g, per in shares.items()}


def _counterfact_pairs(records: Sequence[EvalRecord], groups: tuple[str, ...]) -> tuple[
        list[tuple[str, str]], list[tuple[int, str]]]:
    """The (prompt, target) pairs to score -- new target, then true one, per prompt -- and the
    (record, group) of each prompt."""
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str]] = []  # (record, group) for each scored prompt
    for r, rec in enumerate(records):
        new, true = rec.request.target_new, rec.request.ground_truth
        if true is None:
            raise ValueError(f"record #{rec.index}: CounterFact metrics need ground_truth")
        neigh_true = rec.neighborhood_answer or true
        kinds = (
            ("es", [rec.request.text], true),
            ("ps", rec.paraphrase_prompts, true),
            ("ns", rec.neighborhood_prompts, neigh_true),
        )
        for group, prompts, truth in kinds:
            if group not in groups:
                continue
            for prompt in prompts:
                pairs += [(prompt, new), (prompt, truth)]
                slots.append((r, group))
    return pairs, slots


def records_generation_entropy(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    generation_tokens: int,
    generation_source: Literal["dataset", "rewrite"] = "dataset",
) -> float | None:
    """GE of ``records``: greedy generations of ``generation_tokens`` tokens from their
    ``generation_prompts`` (or, with ``generation_source="rewrite"``, their rewrite prompts);
    None when no record has a prompt."""
    texts = []
    for rec in records:
        prompts = rec.generation_prompts
        if generation_source == "rewrite":
            prompts = [rec.request.text]
        texts += [greedy_generate(model, tokenizer, p, generation_tokens) for p in prompts]
    return generation_entropy(texts) if texts else None


# --- zsRE ----------------------------------------------------------------------------------


def zsre_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    batch_size: int = 16,
) -> dict[str, float | int | None]:
    """Teacher-forced top-1 token accuracy on rewrite, paraphrase and neighbourhood prompts
    (:func:`zsre_scores` without the records' own values)."""
    return zsre_scores(model, tokenizer, records, batch_size)[0]


def zsre_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    batch_size: int = 16,
) -> tuple[dict[str, float | int | None], Shares]:
    """Teacher-forced top-1 token accuracy on rewrite, paraphrase and neighbourhood prompts.

    As in MEND/MEMIT: for each target token, is the argmax of the next-token logits that token?
    Rewrite and paraphrase prompts are scored against ``target_new``; neighbourhood prompts
    against ``neighborhood_answer`` (zsRE's ``loc_ans``). Per record: mean over its prompts'
    token accuracies; reported: mean over records (returned too: each record's mean).
    """
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str]] = []
    for r, rec in enumerate(records):
        groups = (
            ("rewrite_acc", [rec.request.text], rec.request.target_new),
            ("paraphrase_acc", rec.paraphrase_prompts, rec.request.target_new),
            ("neighborhood_acc", rec.neighborhood_prompts, rec.neighborhood_answer),
        )
        for group, prompts, target in groups:
            if target is None:
                continue
            for prompt in prompts:
                pairs.append((prompt, target))
                slots.append((r, group))
    scores = score_targets(
        model, tokenizer, [p for p, _ in pairs], [t for _, t in pairs], batch_size
    )
    acc: dict[str, dict[int, list[float]]] = {
        "rewrite_acc": {},
        "paraphrase_acc": {},
        "neighborhood_acc": {},
    }
    for (r, group), score in zip(slots, scores, strict=True):
        acc[group].setdefault(r, []).append(score.accuracy)
    shares = record_shares(acc)
    return group_means(shares, len(records)), shares


def evaluate_records(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[EvalRecord],
    batch_size: int = 16,
    generation_tokens: int = 0,
    generation_source: Literal["dataset", "rewrite"] = "dataset",
) -> dict[str, float | int | None]:
    """The metrics for ``records``' kind (all records must be of one kind)."""
    kind = records_kind(records)
    if not records:
        return {"n_records": 0}
    if kind == "zsre":
        return zsre_metrics(model, tokenizer, records, batch_size)
    return counterfact_metrics(
        model, tokenizer, records, batch_size, generation_tokens, generation_source
    )


def records_kind(records: Sequence[EvalRecord]) -> str | None:
    """The one kind of ``records`` (None for none); records of several kinds are an error."""
    kinds = {rec.kind for rec in records}
    if len(kinds) > 1:
        raise ValueError(f"records mix kinds {sorted(kinds)}; evaluate them separately")
    return next(iter(kinds), None)


# --- generation entropy --------------------------------------------------------------------

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)  # ROME's n_gram_entropy: mean of w_n * H_n over n = 2, 3
_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str) -> float:
    """ROME's generation entropy of one text: mean over n in (2, 3) of ``w_n * H_n``.

    ``H_n`` is the entropy (bits) of the text's n-gram frequency distribution; weights
    (2/3, 4/3) so the result is ``H_2/3 + 2*H_3/3``. Words are split by the regex
    ``\\w+|[^\\w\\s]`` (ROME uses NLTK's word_tokenize; they differ on contractions and such).
    A text too short for any n-gram of an order contributes 0 for that order.
    """
    words = _WORD.findall(text)
    total = 0.0
    for n, weight in zip(NGRAM_ORDERS, NGRAM_WEIGHTS, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        size = sum(counts.values())
        h = -sum(c / size * math.log2(c / size) for c in counts.values()) if size else 0.0
        total += weight * h
    return total / len(NGRAM_ORDERS)


def generation_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`ngram_entropy` over texts (ROME's GE)."""
    if not texts:
        raise ValueError("generation entropy of no texts")
    return sum(ngram_entropy(t) for t in texts) / len(texts)


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 100
) -> str:
    """Greedy continuation of ``prompt``; returns prompt + continuation, decoded.

    HF models use their own ``generate`` (KV cache, stops at EOS); other modules get a plain
    loop that re-runs the whole sequence. ROME samples top-5 for GE; greedy makes runs
    reproducible, and is what this project reports.
    """
    device = input_device(model)
    ids = torch.tensor([encode(tokenizer, prompt)], device=device)
    if hasattr(model, "generate"):
        ids = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
        )
    else:
        eos = getattr(tokenizer, "eos_token_id", None)
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
            ids = torch.cat([ids, nxt.argmax(-1, keepdim=True)], dim=1)
            if eos is not None and int(ids[0, -1]) == eos:
                break
    return tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
