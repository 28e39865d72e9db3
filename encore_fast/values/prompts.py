"""Token-level layout of the prompts used to optimise one request's value vector.

Per request: the rewrite prompts (each context template filled with the request's prompt, then
the target tokens but the last one) and the KL prompt ``"{subject} is a"``. For each prompt we
record where the last subject token is (where δ is added) and, for rewrite prompts, which
positions predict which target token.

A chat request (``EditRequest.chat``) puts each of these inside the tokenizer's chat template:
the context prefix and the prompt together are the user's turn, the target the start of the
assistant's (no leading space), and the KL prompt is a user turn of its own; the subject is
located in the templated tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from encore_fast.requests import (
    EditRequest,
    chat_template,
    encode,
    subject_last_index,
    target_token_ids,
)
from encore_fast.values.templates import fill

KL_PROMPTS = ("{} is a",)


@dataclass
class ValuePrompts:
    """The prompts of one request: ``n_rewrite`` rewrite prompts followed by the KL prompts."""

    input_ids: list[list[int]]
    lookup: list[int]  # last-subject-token index per prompt
    target_ids: list[int]
    target_start: list[int]  # per rewrite prompt: the position whose logits predict target[0]
    n_rewrite: int

    @property
    def n_prompts(self) -> int:
        return len(self.input_ids)


class PromptTokens:
    """Each request's prompt in each context template, filled, tokenised and with its last
    subject token located once: the value prompts and the key passes of a batch share them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._made: dict[tuple[str, str, str], tuple[list[int], int]] = {}

    def subject_prompt(self, request: EditRequest, context: str) -> tuple[list[int], int]:
        """Token ids of ``context`` filled with the request's prompt, and the index of its
        last subject token."""
        key = (context, request.template, request.subject, request.chat)
        if key not in self._made:
            self._made[key] = located(self.tokenizer, fill(context, request.template),
                                      request.subject, request.chat)
        return self._made[key]


def located(tokenizer: Any, template: str, subject: str, chat: bool) -> tuple[list[int], int]:
    """Token ids of ``template`` filled with ``subject`` (in the chat template when ``chat``)
    and the index of its last subject token."""
    if chat:
        template = chat_template(tokenizer, template)
    ids = encode(tokenizer, template.replace("{}", subject, 1), chat)
    return ids, subject_last_index(tokenizer, template, subject, chat)


def build_value_prompts(
    tokenizer: Any, request: EditRequest, contexts: Sequence[str],
    tokens: PromptTokens | None = None,
) -> ValuePrompts:
    """Tokenise the rewrite and KL prompts of ``request`` for the given context templates
    (through ``tokens``, shared with the batch's key passes, when given).

    The target tokens are appended as ids (not decoded and re-tokenised), so the positions the
    loss reads hold exactly the target's tokens.
    """
    tokens = tokens or PromptTokens(tokenizer)
    target_ids = target_token_ids(tokenizer, request.target_new, request.chat)
    input_ids, lookup, starts = [], [], []
    for ctx in contexts:
        prompt_ids, lk = tokens.subject_prompt(request, ctx)
        lookup.append(lk)
        starts.append(len(prompt_ids) - 1)
        input_ids.append(prompt_ids + target_ids[:-1])
    for kl in KL_PROMPTS:
        ids, lk = located(tokenizer, kl, request.subject, request.chat)
        input_ids.append(ids)
        lookup.append(lk)
    return ValuePrompts(input_ids, lookup, target_ids, starts, len(contexts))


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)

