"""Keys and current values at the last subject token, batched over requests and templates.

Keys (DESIGN.md §2.4): the input of the edited matrix at the last subject token, averaged as
½·(raw prompt) + ½·(mean over the prefixed prompts). Current values: the output of the last
edited block at the raw prompt's last subject token. Each forward pass stops after the block it
needs; right padding keeps positions exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from encore_fast.models.arch import ModelView, block_hidden
from encore_fast.requests import EditRequest, encode, subject_last_index
from encore_fast.stats import StopForward, capture_mlp_inputs, run_until
from encore_fast.values.prompts import pad_batch, pad_id_of
from encore_fast.values.templates import fill


def _subject_rows(
    tokenizer: Any, requests: Sequence[EditRequest], contexts: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    ids, lookup = [], []
    for req in requests:
        for ctx in contexts:
            template = fill(ctx, req.template)
            ids.append(encode(tokenizer, template.replace("{}", req.subject, 1)))
            lookup.append(subject_last_index(tokenizer, template, req.subject))
    return ids, lookup


@torch.no_grad()
def compute_keys(
    view: ModelView,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layer: int,
    chunk: int = 64,
) -> torch.Tensor:
    """Keys ``[n, d_in]`` (fp32) of ``layer``'s edited matrix for each request."""
    ids, lookup = _subject_rows(tokenizer, requests, contexts)
    rows = []
    pad = pad_id_of(tokenizer)
    with capture_mlp_inputs(view, [layer], stop_after=layer) as cap:
        for s in range(0, len(ids), chunk):
            x, m = pad_batch(ids[s : s + chunk], pad, view.device)
            run_until(view.model, input_ids=x, attention_mask=m)
            idx = torch.tensor(lookup[s : s + chunk], device=view.device)
            rows.append(cap[layer][torch.arange(len(idx), device=view.device), idx].float())
    k = torch.cat(rows).view(len(requests), len(contexts), -1)
    if len(contexts) == 1:
        return k[:, 0]
    return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)


@torch.no_grad()
def compute_block_outputs(
    view: ModelView,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    layer: int,
    chunk: int = 64,
) -> torch.Tensor:
    """Output ``[n, d_model]`` (fp32) of block ``layer`` at each raw prompt's last subject token."""
    ids, lookup = _subject_rows(tokenizer, requests, ["{}"])
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod: Any, _args: Any, output: Any) -> None:
        captured["h"] = block_hidden(output)
        raise StopForward

    rows = []
    handle = view.blocks[layer].register_forward_hook(hook)
    try:
        for s in range(0, len(ids), chunk):
            x, m = pad_batch(ids[s : s + chunk], pad_id_of(tokenizer), view.device)
            run_until(view.model, input_ids=x, attention_mask=m)
            idx = torch.tensor(lookup[s : s + chunk], device=view.device)
            rows.append(captured["h"][torch.arange(len(idx), device=view.device), idx].float())
    finally:
        handle.remove()
    return torch.cat(rows)
