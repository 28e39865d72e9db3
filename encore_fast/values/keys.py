"""Keys and current values at the last subject token, batched over requests and templates.

Keys (docs/design.md §2, step 4): the input of the edited matrix at the last subject token, averaged
as ½·(raw prompt) + ½·(mean over the prefixed prompts). Current values: the output of the last
edited block at the raw prompt's last subject token. Each forward pass stops after the block it
needs; right padding keeps positions exact.

:class:`SubjectForwards` serves a whole batch's layer loop. With ``reuse_below=l_1`` (the fast
engine) the blocks below the first edited layer, whose weights do not change while a batch is
applied, run once per prompt chunk; later passes start from their recorded output, and
:meth:`SubjectForwards.freeze_below` moves that start up as the loop finishes layers. The fast
engine also drops the tokens after the last subject token (nothing read depends on them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from encore_fast.models.arch import ModelView, block_hidden, stand_ins
from encore_fast.models.hooks import StopForward, run_until
from encore_fast.models.loading import pad_id
from encore_fast.requests import EditRequest
from encore_fast.values.prompts import PromptTokens, pad_batch


def _subject_rows(
    tokens: PromptTokens, requests: Sequence[EditRequest], contexts: Sequence[str],
    trim: bool = False,
) -> tuple[list[list[int]], list[int]]:
    ids, lookup = [], []
    for req in requests:
        for ctx in contexts:
            row, lk = tokens.subject_prompt(req, ctx)
            ids.append(row[: lk + 1] if trim else list(row))
            lookup.append(lk)
    return ids, lookup


class _Chunks:
    """Prompts padded into fixed chunks (the same chunks on every pass)."""

    def __init__(self, view: ModelView, tokenizer: Any, ids: list[list[int]],
                 lookup: list[int], chunk: int) -> None:
        dev = view.device
        self.items = []
        for s in range(0, len(ids), chunk):
            x, m = pad_batch(ids[s : s + chunk], pad_id(tokenizer), dev)
            idx = torch.tensor(lookup[s : s + chunk], device=dev)
            self.items.append((x, m, idx))
        self.start: list[torch.Tensor | None] = [None] * len(self.items)
        self.start_layer = 0  # start[c] is the input of this block
        self.as_tuple = False


class SubjectForwards:
    """Forward passes over one batch's subject prompts: keys per layer, current block outputs."""

    def __init__(self, view: ModelView, tokenizer: Any, requests: Sequence[EditRequest],
                 contexts: Sequence[str], *, reuse_below: int | None = None,
                 chunk: int = 64, tokens: PromptTokens | None = None) -> None:
        self.view, self.n, self.n_ctx = view, len(requests), len(contexts)
        self.reuse_below = reuse_below if reuse_below else None  # block 0 has nothing below
        trim = self.reuse_below is not None
        tokens = tokens or PromptTokens(tokenizer)  # (the value prompts' ones, when given)
        self.keys_rows = _Chunks(
            view, tokenizer, *_subject_rows(tokens, requests, contexts, trim), chunk)
        self.raw_rows = _Chunks(
            view, tokenizer, *_subject_rows(tokens, requests, ["{}"], trim), chunk)

    def freeze_below(self, layer: int) -> None:
        """Blocks below ``layer`` will not change any more (in this batch): later passes may
        start at ``layer`` from recorded hidden states. No-op without ``reuse_below``."""
        if self.reuse_below is not None and layer > self.reuse_below:
            self.reuse_below = layer

    @torch.no_grad()
    def _run(self, rows: _Chunks, kind: str, layer: int) -> list[torch.Tensor]:
        """Run every chunk up to block ``layer`` and read, at the lookup positions, the input
        of its edited matrix (``kind="mlp_in"``), the edited matrix's output (``"mlp_out"``) or
        the block's output (``kind="block_out"``)."""
        view, out = self.view, []
        captured: dict[str, torch.Tensor] = {}
        reuse = self.reuse_below
        # Record the input of block `reuse` in this pass unless it is already where we start.
        record = reuse is not None and reuse - 1 <= layer and (
            rows.start[0] is None or rows.start_layer < reuse)
        begin = rows.start_layer
        for c, (x, m, idx) in enumerate(rows.items):
            handles = []
            if record:
                def keep_start(_mod: Any, _a: Any, output: Any, c: int = c) -> None:
                    rows.start[c] = block_hidden(output).detach()
                    rows.as_tuple = not isinstance(output, torch.Tensor)
                handles.append(view.blocks[reuse - 1].register_forward_hook(keep_start))
            if kind == "mlp_in":
                handles.append(view.mlp_out(layer).register_forward_pre_hook(
                    lambda _m, args: captured.__setitem__("h", args[0])))
            elif kind == "mlp_out":
                handles.append(view.mlp_out(layer).register_forward_hook(
                    lambda _m, _a, output: captured.__setitem__("h", output)))
            else:
                handles.append(view.blocks[layer].register_forward_hook(
                    lambda _m, _a, output: captured.__setitem__("h", block_hidden(output))))

            def stop(_m: Any, _a: Any, _o: Any) -> None:
                raise StopForward
            handles.append(view.blocks[layer].register_forward_hook(stop))
            start = rows.start[c]
            try:
                if start is not None:
                    with stand_ins(view, begin - 1, rows.as_tuple) as replaced:
                        replaced[-1].hidden = start
                        run_until(view.model, input_ids=x, attention_mask=m)
                else:
                    run_until(view.model, input_ids=x, attention_mask=m)
            finally:
                for h in handles:
                    h.remove()
            out.append(captured["h"][torch.arange(len(idx), device=idx.device), idx].float())
        if record and reuse is not None:
            rows.start_layer = reuse
        return out

    def keys(self, layer: int) -> torch.Tensor:
        """Keys ``[n, d_in]`` (fp32) of ``layer``'s edited matrix for each request."""
        k = torch.cat(self._run(self.keys_rows, "mlp_in", layer))
        k = k.view(self.n, self.n_ctx, -1)
        if self.n_ctx == 1:
            return k[:, 0]
        return 0.5 * k[:, 0] + 0.5 * k[:, 1:].mean(1)

    def block_outputs(self, layer: int) -> torch.Tensor:
        """Output ``[n, d_model]`` (fp32) of block ``layer`` at each raw prompt's subject."""
        return torch.cat(self._run(self.raw_rows, "block_out", layer))

    def mlp_outputs(self, layer: int) -> torch.Tensor:
        """Output ``[n, d_model]`` (fp32) of ``layer``'s edited matrix (the MLP's output) at
        each raw prompt's subject."""
        return torch.cat(self._run(self.raw_rows, "mlp_out", layer))


def compute_keys(view: ModelView, tokenizer: Any, requests: Sequence[EditRequest],
                 contexts: Sequence[str], layer: int, chunk: int = 64) -> torch.Tensor:
    """Keys ``[n, d_in]`` (fp32) of ``layer``'s edited matrix for each request."""
    return SubjectForwards(view, tokenizer, requests, contexts, chunk=chunk).keys(layer)


def compute_block_outputs(view: ModelView, tokenizer: Any, requests: Sequence[EditRequest],
                          layer: int, chunk: int = 64) -> torch.Tensor:
    """Output ``[n, d_model]`` (fp32) of block ``layer`` at each raw prompt's subject."""
    return SubjectForwards(view, tokenizer, requests, [], chunk=chunk).block_outputs(layer)
