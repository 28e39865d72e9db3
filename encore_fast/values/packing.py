"""Packing the prompts of a batch into rows of one forward pass: pure index arithmetic.

Every prompt of every request is a :class:`Segment` (a prefix computed once, a suffix computed
every step); :func:`pack` places segments into rows (first-fit decreasing) and :class:`Layout`
turns a packing into token ids, positions, gather indices and the block-diagonal additive
attention mask. Nothing here runs a model, so it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Segment:
    """One prompt of one request: ``pre`` (before the last subject token, computed once) and
    ``suf`` (from it on, computed every step, flat index ``suf_start`` on). Its prefix keys and
    values are ``kv`` in the flat prefix store: the first ``shared`` tokens (identical in every
    request's prompt of this template) are stored once for all requests, the rest from
    ``own_start`` on."""

    req: int
    pre: list[int]
    suf: list[int]
    suf_start: int
    shared: int
    own_start: int
    kv: list[int]


def pack(lengths: Sequence[int]) -> list[list[int]]:
    """First-fit decreasing: items into rows as wide as the longest; item indices per row."""
    width = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


class Layout:
    """Segments packed into rows for one forward pass.

    Each segment contributes query tokens (``query[k]``, flat indices from ``q_start[k]``, at
    positions ``q_pos0[k]`` on) and fixed tokens (flat indices ``kv[k]``, keys and values
    computed before). A query attends to its own segment's cached tokens and, causally, to its
    own segment's queries; padding queries attend only to themselves (no empty softmax rows).
    """

    def __init__(self, query: Sequence[Sequence[int]], q_start: Sequence[int],
                 q_pos0: Sequence[int], kv: Sequence[Sequence[int]], pad_id: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        rows = pack([len(q) for q in query])
        r_n, width = len(rows), max(len(q) for q in query)
        kv_w = max(sum(len(kv[k]) for k in row) for row in rows)
        self.kv_width = kv_w
        q_idx = torch.full((r_n, width), -1, dtype=torch.long)
        q_seg = torch.full((r_n, width), -1, dtype=torch.long)
        kv_idx = torch.full((r_n, kv_w), -1, dtype=torch.long)
        kv_seg = torch.full((r_n, kv_w), -2, dtype=torch.long)
        ids = torch.full((r_n, width), pad_id, dtype=torch.long)
        pos = torch.zeros((r_n, width), dtype=torch.long)
        self.seg_row = torch.zeros(len(query), dtype=torch.long)
        self.seg_col = torch.zeros(len(query), dtype=torch.long)
        for r, row in enumerate(rows):
            c = p = 0
            for k in row:
                n, m = len(query[k]), len(kv[k])
                kv_idx[r, p: p + m] = torch.tensor(list(kv[k]), dtype=torch.long)
                kv_seg[r, p: p + m] = k
                q_idx[r, c: c + n] = torch.arange(q_start[k], q_start[k] + n)
                q_seg[r, c: c + n] = k
                ids[r, c: c + n] = torch.tensor(list(query[k]))
                pos[r, c: c + n] = q_pos0[k] + torch.arange(n)
                self.seg_row[k], self.seg_col[k] = r, c
                c, p = c + n, p + m
        same_kv = kv_seg[:, None, :] == q_seg[:, :, None]  # [rows, width, kv_w]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_q = (q_seg[:, None, :] == q_seg[:, :, None]) & causal
        pad_q = (q_seg < 0)[:, :, None] & torch.eye(width, dtype=torch.bool)
        allowed = torch.cat([same_kv & (q_seg >= 0)[:, :, None],
                             (same_q & (q_seg >= 0)[:, :, None]) | pad_q], -1)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed,
                                                                    torch.finfo(dtype).min)
        self.mask = mask[:, None].to(device)
        self.q_idx, self.kv_idx = q_idx.to(device), kv_idx.to(device)
        self.ids, self.pos = ids.to(device), pos.to(device)
        self.q_valid = (q_idx >= 0).to(device)
        self.seg_row, self.seg_col = self.seg_row.to(device), self.seg_col.to(device)

    def gather(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``flat[index]`` with zeros where ``index`` is -1."""
        padded = torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])
        return padded[index]


