"""Model degradation under editing: WikiText-2 perplexity, known-fact accuracy, norm growth.

Sequential editing can hurt the model far from the edited facts (ENCORE's "model
degradation"). These checks are cheap on purpose so they can run every few batches:

* perplexity on the first ``num_tokens`` tokens of a WikiText-2 file, cut into fixed,
  non-overlapping windows of ``window`` tokens (no context carried between windows);
* top-1 accuracy on a prefix of ROME's known facts (``known_1000.json``);
* the growth of the edited matrices' Frobenius norms (read from the editor).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encore_fast.eval.datasets import DatasetError
from encore_fast.eval.metrics import next_token_is
from encore_fast.models.placement import input_device
from encore_fast.requests import encode


def first_tokens(tokenizer: Any, text: str, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` token ids of ``text`` (no special tokens).

    Tokenises a growing prefix of the text instead of the whole file; the prefix always runs
    well past the last kept token, so the ids equal those of the full text.
    """
    chars = max(1024, num_tokens * 8)
    while True:
        ids = list(tokenizer(text[:chars], add_special_tokens=False)["input_ids"])
        if len(ids) > num_tokens + 64 or chars >= len(text):
            return ids[:num_tokens]
        chars *= 2


def perplexity_windows(
    tokenizer: Any, text: str, num_tokens: int = 8192, window: int = 256
) -> torch.Tensor:
    """``[n_windows, prefix + window]`` ids: the text's first tokens in whole windows.

    Each window starts with the ids the tokenizer puts at the start of any text (BOS for
    Llama-style tokenizers, nothing for GPT-2), so every window token is predicted when there
    is a BOS, and all but the first otherwise.
    """
    ids = first_tokens(tokenizer, text, num_tokens)
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    prefix = encode(tokenizer, "")
    rows = [prefix + ids[i * window : (i + 1) * window] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over all predicted tokens of the windows."""
    return perplexity_of(window_nll(model, windows, batch_size))


@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: torch.Tensor,
               batch_size: int = 4) -> list[tuple[float, int]]:
    """Per window: the sum of its next-token NLLs and the number of tokens predicted (the
    items a perplexity is made of, and an interval resampled from)."""
    device = input_device(model)
    out: list[tuple[float, int]] = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
            reduction="none").view(ids.shape[0], -1)
        out += [(float(row.sum(dtype=torch.float64)), row.numel()) for row in nll]
    return out


def perplexity_of(windows: Sequence[tuple[float, int]]) -> float:
    """exp(total NLL / total tokens) of per-window ``(nll, tokens)``."""
    return math.exp(sum(n for n, _ in windows) / sum(t for _, t in windows))


def wikitext_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    path: str | os.PathLike[str],
    num_tokens: int = 8192,
    window: int = 256,
    batch_size: int = 4,
) -> float:
    """Perplexity on the first ``num_tokens`` tokens of a WikiText-2 file (used as is)."""
    text = Path(path).read_text(encoding="utf-8")
    return perplexity(model, perplexity_windows(tokenizer, text, num_tokens, window), batch_size)


@dataclass(frozen=True)
class KnownFact:
    """A fact the unedited model is expected to know: ``prompt`` -> ``attribute``."""

    prompt: str
    attribute: str
    subject: str = ""


def load_known_facts(path: str | os.PathLike[str], n: int | None = None) -> list[KnownFact]:
    """The first ``n`` (all when None) facts of a ``known_1000.json``-style file.

    Malformed records (no non-empty ``prompt``/``attribute`` strings) raise
    :class:`DatasetError` naming their indices.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read known facts from {path}: {exc}") from None
    if not isinstance(raw, list):
        raise DatasetError(f"{path}: expected a JSON list of facts")
    raw = raw if n is None else raw[:n]
    facts, bad = [], []
    for i, rec in enumerate(raw):
        ok = isinstance(rec, Mapping) and all(
            isinstance(rec.get(k), str) and rec[k].strip() for k in ("prompt", "attribute")
        )
        if not ok:
            bad.append(i)
            continue
        facts.append(KnownFact(rec["prompt"], rec["attribute"], str(rec.get("subject", ""))))
    if bad:
        raise DatasetError(f"{path}: records {bad[:50]} lack a non-empty prompt/attribute")
    return facts


def known_fact_hits(
    model: torch.nn.Module, tokenizer: Any, facts: Sequence[KnownFact], batch_size: int = 16
) -> list[bool]:
    """Per fact: is the top-1 next token after ``prompt`` the attribute's first token?"""
    return next_token_is(
        model, tokenizer, [f.prompt for f in facts], [f.attribute for f in facts], batch_size
    )


def norm_growth(original: Mapping[int, float], current: Mapping[int, float]) -> dict[int, float]:
    """Per layer ``||W_now||_F / ||W_original||_F``."""
    return {layer: current[layer] / original[layer] for layer in original if layer in current}
