"""Inputs and output gradients of edited modules at the answer tokens: the value source of
methods with no per-fact optimisation (UltraEdit).

Each request becomes ``prompt + target``; the answer positions are those whose next-token
prediction is a target token (the prompt's last token and the target's tokens but the last).
One forward and one backward pass per group of requests: the loss is the mean cross-entropy
of the target tokens over the group, and every site gives, per answer position, its input
``k`` and the gradient ``g`` of the loss with respect to its output. Weights get no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from encore_fast.models.arch import ModelView, Site
from encore_fast.models.loading import pad_id
from encore_fast.requests import EditRequest, prompt_ids, target_token_ids
from encore_fast.values.prompts import pad_batch


def answer_rows(view: ModelView, tokenizer: Any, requests: Sequence[EditRequest],
                sites: Sequence[Site], group_size: int) -> dict[Site, tuple[torch.Tensor,
                                                                             torch.Tensor]]:
    """Per site: ``K`` ``[N, d_in]`` and ``G`` ``[N, d_out]`` (fp32, on the CPU) over the ``N``
    answer positions of all requests, groups of ``group_size`` requests in order."""
    rows: dict[Site, list[tuple[torch.Tensor, torch.Tensor]]] = {s: [] for s in sites}
    for start in range(0, len(requests), group_size):
        for site, kg in _group_rows(view, tokenizer, requests[start : start + group_size],
                                    sites).items():
            rows[site].append(kg)
    return {s: (torch.cat([k for k, _ in r]), torch.cat([g for _, g in r]))
            for s, r in rows.items()}


def _sequences(tokenizer: Any, requests: Sequence[EditRequest]) -> tuple[
        list[list[int]], list[tuple[int, list[int]]]]:
    """Token ids of ``prompt + target`` and, per request, (first answer position, targets)."""
    seqs, answers = [], []
    for req in requests:
        prompt = prompt_ids(tokenizer, req.text, req.chat)
        target = target_token_ids(tokenizer, req.target_new, req.chat)
        seqs.append(prompt + target)
        answers.append((len(prompt) - 1, target))
    return seqs, answers


@torch.enable_grad()
def _group_rows(view: ModelView, tokenizer: Any, requests: Sequence[EditRequest],
                sites: Sequence[Site]) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
    """One forward and backward pass of a group: each site's ``(K, G)`` at its answer rows."""
    seqs, answers = _sequences(tokenizer, requests)
    ids, mask = pad_batch(seqs, pad_id(tokenizer), view.device)
    row = torch.tensor([i for i, (_, t) in enumerate(answers) for _ in t])
    col = torch.tensor([p + j for p, t in answers for j in range(len(t))])
    labels = torch.tensor([x for _, t in answers for x in t])
    inputs: dict[Site, torch.Tensor] = {}
    outputs: dict[Site, torch.Tensor] = {}

    def hook(site: Site) -> Any:
        def record(_m: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            inputs[site] = args[0].detach()
            outputs[site] = output if output.requires_grad else output.detach().requires_grad_()
            return outputs[site]
        return record

    handles = [view.linear(s).register_forward_hook(hook(s)) for s in sites]
    try:
        logits = view.model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
    picked = logits[row.to(logits.device), col.to(logits.device)].float()
    loss = F.cross_entropy(picked, labels.to(picked.device))
    grads = torch.autograd.grad(loss, [outputs[s] for s in sites])
    return {s: (inputs[s][row.to(g.device), col.to(g.device)].float().cpu(),
                g[row.to(g.device), col.to(g.device)].float().cpu())
            for s, g in zip(sites, grads, strict=True)}
