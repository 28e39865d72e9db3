"""Fast value optimisation: every request of a batch at once, and only the work δ can change.

Computes the same ``z`` as :mod:`encore_fast.values.reference` (DESIGN.md §3):

* **Batched**: δ is ``[n, d_model]``; each request's loss depends only on its own row, and the
  per-row Adam, clamp, loss cut-off, step limit and MPES reproduce each request's own trajectory.
  A request that stops leaves the batch (its tokens are no longer computed).
* **Prefix reuse**: tokens before the last subject token are not affected by δ (causal
  attention). Their keys and values are computed once (the context text that every request's
  prompt of a template starts with, once for the whole batch); each step runs only the suffix
  (from the last subject token on), attending to them through :func:`packed_attention`, which
  computes no gradient for them.
* **Layer skip**: blocks up to the edited block ``l_m`` are not affected by δ either. Their
  output for the suffix tokens is computed once; during the steps those blocks are replaced by
  stand-ins that return it (plus δ at the subject position).
* **Packed rows**: every prompt (a *segment*: prefix + suffix) of every request is packed with
  others into rows of one forward pass, with a block-diagonal attention mask, so a step is one
  forward and one backward over (almost) only real tokens, whatever the prompts' lengths. A KL
  prompt is read only at the subject position, so its suffix is that one token.
* **Logits only where read**: the LM head runs only at the target positions (each once) and at
  the KL positions, never over the whole ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from encore_fast.config import EditConfig
from encore_fast.models.arch import ModelView, StandIn, block_hidden, stand_ins
from encore_fast.values.objective import MPES, clamp_, prompts_correct, value_loss
from encore_fast.values.prompts import ValuePrompts, pad_id_of
from encore_fast.values.reference import ValueResult

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ATTENTION = "encore_fast_packed"
MAX_TOKENS = 8192  # default suffix tokens per packed forward (see optimize_values)


class _Fixed:
    """What :func:`packed_attention` reads and writes besides its arguments, per attention
    module: keys/values to ``record`` (the prefix pass), and the fixed ``prefix`` keys/values
    that this pass's queries also attend to (the steps), ``[b, h_kv, p, hd]`` each."""

    def __init__(self) -> None:
        self.record: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.prefix: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}


_FIXED: _Fixed | None = None


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over packed rows (registered as a transformers attention function).

    ``query`` ``[b, h, q, hd]`` and ``key``/``value`` ``[b, h_kv, q, hd]`` are this pass's
    tokens; they also attend to the module's fixed prefix keys/values (``p`` of them, no
    gradient: they are constants). ``attention_mask`` is additive ``[b, 1, q, p + q]``. Query
    heads are grouped by their key/value head instead of repeating the keys.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("the fast engine does not support attention sinks; "
                                  "use engine='reference'")
    fixed = _FIXED
    if fixed is not None and fixed.record is not None:
        fixed.record[module] = (key.detach(), value.detach())
    b, h, q, hd = query.shape
    h_kv = key.shape[1]
    g = h // h_kv
    qg = query.reshape(b, h_kv, g * q, hd)
    scores = qg @ key.transpose(-1, -2)
    pre = fixed.prefix.get(module) if fixed is not None else None
    if pre is not None:
        pre = (pre[0].detach(), pre[1].detach())
        scores = torch.cat([qg @ pre[0].transpose(-1, -2), scores], -1)
    k = scores.shape[-1]
    scores = scores.view(b, h_kv, g, q, k) * (scaling if scaling is not None else hd**-0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, -k:]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs.view(b, h_kv, g * q, k)
    out = probs[..., k - q:] @ value
    if pre is not None:
        out = out + probs[..., : k - q] @ pre[1]
    return out.view(b, h, q, hd).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, packed_attention)


@contextlib.contextmanager
def _packed_attention(view: ModelView, fixed: _Fixed) -> Iterator[None]:
    """Route the model's attention through :func:`packed_attention`, reading ``fixed``
    (restored on exit)."""
    global _FIXED
    before_fixed, _FIXED = _FIXED, fixed
    try:
        with view.attention_implementation(ATTENTION):
            yield
    finally:
        _FIXED = before_fixed


class _Captured(Exception):
    """Raised by the capture hook: nothing after block ``l_m`` is needed in that pass."""


@dataclass
class _Segment:
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


def _pack(lengths: Sequence[int]) -> list[list[int]]:
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


class _Layout:
    """Segments packed into rows for one forward pass.

    Each segment contributes query tokens (``query[k]``, flat indices from ``q_start[k]``, at
    positions ``q_pos0[k]`` on) and fixed tokens (flat indices ``kv[k]``, keys and values
    computed before). A query attends to its own segment's cached tokens and, causally, to its
    own segment's queries; padding queries attend only to themselves (no empty softmax rows).
    """

    def __init__(self, query: Sequence[Sequence[int]], q_start: Sequence[int],
                 q_pos0: Sequence[int], kv: Sequence[Sequence[int]], pad_id: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        rows = _pack([len(q) for q in query])
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


class _Prompts:
    """The segments of a batch (each request's rewrite prompts, then its KL prompts), the once-
    per-batch work (prefix keys/values, block ``l_m``'s output) and the packed step forward."""

    def __init__(self, prompts: Sequence[ValuePrompts], view: ModelView, layer: int,
                 pad_id: int, fixed: _Fixed) -> None:
        self.view, self.layer, self.pad_id = view, layer, pad_id
        self.base = view.backbone
        self.device = view.device
        self.dtype = view.dtype
        self.segs: list[_Segment] = []
        self.rewrite_seg: list[list[int]] = []  # per request: its rewrite segments
        self.kl_seg: list[int] = []  # per request: its (first) KL segment
        n_prompts = prompts[0].n_prompts
        # Per template: the prefix tokens every request's prompt starts with (the context).
        self.shared: list[list[int]] = []
        for j in range(n_prompts):
            pres = [p.input_ids[j][: p.lookup[j]] for p in prompts]
            c = min(len(x) for x in pres) if len(prompts) > 1 else 0
            while c and any(x[:c] != pres[0][:c] for x in pres):
                c -= 1
            self.shared.append(pres[0][:c])
        self.shared_start = [sum(len(x) for x in self.shared[:j]) for j in range(n_prompts)]
        n_shared = sum(len(x) for x in self.shared)
        own_n = suf_n = 0
        for i, p in enumerate(prompts):
            self.rewrite_seg.append([])
            for j in range(p.n_prompts):
                lk, c = p.lookup[j], len(self.shared[j])
                rewrite = j < p.n_rewrite
                # A KL prompt is read only at the subject position: nothing after it matters.
                suf = p.input_ids[j][lk:] if rewrite else p.input_ids[j][lk: lk + 1]
                if rewrite:
                    self.rewrite_seg[i].append(len(self.segs))
                elif j == p.n_rewrite:
                    self.kl_seg.append(len(self.segs))
                kv = [*range(self.shared_start[j], self.shared_start[j] + c),
                      *range(n_shared + own_n, n_shared + own_n + lk - c)]
                self.segs.append(_Segment(i, p.input_ids[j][:lk], suf, suf_n, c, own_n, kv))
                own_n, suf_n = own_n + lk - c, suf_n + len(suf)
        self.n_shared, self.n_own, self.n_suf = n_shared, own_n, suf_n
        self.fixed = fixed  # what packed_attention reads: set by select()
        # Per attention module: every prefix token's key and value, [n_pre, h_kv, hd] each.
        self.prefix_kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hidden = torch.empty(0)  # block l_m's output at every suffix token: [n_suf, d]
        self.as_tuple = False
        self.layout: _Layout | None = None

    # -- once per batch ---------------------------------------------------------------------
    def _prefix_pass(self, query: list[list[int]], q_start: list[int], q_pos0: list[int],
                     kv: list[list[int]], n_out: int
                     ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``[n_out, h_kv, hd]`` (flat) of the query tokens at every layer,
        attending to ``kv`` in :attr:`prefix_kv`."""
        lay = _Layout(query, q_start, q_pos0, kv, self.pad_id, self.device, self.dtype)
        self._set_fixed(lay)
        self.fixed.record = recorded = {}
        try:
            self.base(input_ids=lay.ids, attention_mask=lay.mask, position_ids=lay.pos,
                      use_cache=False)
        finally:
            self.fixed.record = None
        valid, where = lay.q_valid, lay.q_idx[lay.q_valid]

        def flat(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(n_out, t.shape[1], t.shape[3])
            out[where] = t.transpose(1, 2)[valid]
            return out

        return {m: (flat(k), flat(v)) for m, (k, v) in recorded.items()}

    def prepare(self) -> None:
        """Without gradients: the keys and values of every prefix (the shared contexts once,
        then each prompt's own part), then block ``l_m``'s output over every suffix (one
        packed pass, stopped after that block)."""
        with torch.no_grad():
            shared = [j for j, x in enumerate(self.shared) if x]
            if shared:
                self.prefix_kv = self._prefix_pass(
                    [self.shared[j] for j in shared], [self.shared_start[j] for j in shared],
                    [0] * len(shared), [[] for _ in shared], self.n_shared)
            own = [s for s in self.segs if len(s.pre) > s.shared]
            if own:
                kv_own = self._prefix_pass(
                    [s.pre[s.shared:] for s in own], [s.own_start for s in own],
                    [s.shared for s in own], [s.kv[: s.shared] for s in own], self.n_own)
                self.prefix_kv = {
                    m: tuple(torch.cat([self.prefix_kv[m][i], kv[i]]) if self.prefix_kv
                             else kv[i] for i in range(2))
                    for m, kv in kv_own.items()}

            def grab(_m: Any, _a: Any, output: Any) -> None:
                self.hidden = block_hidden(output).detach()
                self.as_tuple = not isinstance(output, torch.Tensor)
                raise _Captured

            self.select(list(range(len(self.segs))))
            handle = self.view.blocks[self.layer].register_forward_hook(grab)
            try:
                self._forward()
            except _Captured:
                pass
            finally:
                handle.remove()
            lay = self.layout
            assert lay is not None
            flat_h = self.hidden.new_empty(self.n_suf, self.hidden.shape[-1])
            flat_h[lay.q_idx[lay.q_valid]] = self.hidden[lay.q_valid]
            self.hidden = flat_h
        # The steps run stand-ins up to l_m: their prefixes are no longer needed.
        below = {m for block in self.view.blocks[: self.layer + 1] for m in block.modules()}
        self.prefix_kv = {m: kv for m, kv in self.prefix_kv.items() if m not in below}
        self.fixed.prefix = {m: kv for m, kv in self.fixed.prefix.items() if m not in below}

    # -- every step -------------------------------------------------------------------------
    def _set_fixed(self, lay: _Layout) -> None:
        """Point :func:`packed_attention` at the prefix keys/values of ``lay``'s rows."""
        self.fixed.prefix = {
            m: tuple(lay.gather(t, lay.kv_idx).transpose(1, 2).contiguous() for t in kv)
            for m, kv in self.prefix_kv.items()} if lay.kv_width else {}

    def select(self, seg_ids: list[int]) -> None:
        """Pack the given segments (the active requests') for the next steps."""
        segs = [self.segs[k] for k in seg_ids]
        self.layout = lay = _Layout(
            [s.suf for s in segs], [s.suf_start for s in segs], [len(s.pre) for s in segs],
            [s.kv for s in segs], self.pad_id, self.device, self.dtype)
        self.local_seg = torch.full((len(self.segs),), -1, dtype=torch.long)
        self.local_seg[torch.tensor(seg_ids)] = torch.arange(len(seg_ids))
        self.seg_req = torch.tensor([s.req for s in segs], device=self.device)
        self._set_fixed(lay)

    def _forward(self) -> torch.Tensor:
        lay = self.layout
        assert lay is not None
        out = self.base(input_ids=lay.ids, attention_mask=lay.mask, position_ids=lay.pos,
                        use_cache=False)
        return out.last_hidden_state

    def step(self, stand_in: StandIn, delta: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[rows, width, d]`` of the packed active segments with δ
        (``delta[local[request]]``) added after block ``l_m`` at each subject position."""
        lay = self.layout
        assert lay is not None
        hidden = lay.gather(self.hidden, lay.q_idx)
        add = delta[local[self.seg_req]].to(hidden.dtype)
        stand_in.hidden = hidden.index_put((lay.seg_row, lay.seg_col), add, accumulate=True)
        return self._forward()

    def slots(self, seg: Sequence[int], offset: Sequence[int]) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
        """Row and column, in the current packing, of token ``offset`` of each segment."""
        lay = self.layout
        assert lay is not None
        k = self.local_seg[torch.tensor(list(seg), dtype=torch.long)].to(self.device)
        return lay.seg_row[k], lay.seg_col[k] + torch.tensor(list(offset), device=self.device)


class _Targets:
    """Where the loss reads: each target token of each rewrite prompt once, in the
    ``[request, rewrite prompt, target position]`` layout (unused slots masked), and each
    request's KL position."""

    def __init__(self, prompts: Sequence[ValuePrompts], ps: _Prompts,
                 device: torch.device) -> None:
        self.ps, self.device, self.n = ps, device, len(prompts)
        self.n_rw = n_rw = prompts[0].n_rewrite
        self.t_max = t_max = max(len(p.target_ids) for p in prompts)
        self.per_req = n_rw * t_max
        self.seg: list[int] = []
        self.offset: list[int] = []
        slots = []
        for i, p in enumerate(prompts):
            for j, k in enumerate(ps.rewrite_seg[i]):
                for q in range(len(p.target_ids)):
                    self.seg.append(k)
                    self.offset.append(p.target_start[j] - p.lookup[j] + q)
                    slots.append((i * n_rw + j) * t_max + q)
        self.req = [ps.segs[k].req for k in self.seg]
        self.slot = torch.tensor(slots, device=device)
        targets = torch.zeros(self.n, n_rw, t_max, dtype=torch.long)
        mask = torch.zeros(self.n, n_rw, t_max)
        for i, p in enumerate(prompts):
            targets[i, :, : len(p.target_ids)] = torch.tensor(p.target_ids)
            mask[i, :, : len(p.target_ids)] = 1.0
        self.targets, self.mask = targets.to(device), mask.to(device)
        self.n_target = torch.tensor([float(len(p.target_ids)) for p in prompts], device=device)

    def positions(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor]:
        """For the active requests, in the current packing: rows and columns of the reads,
        their slots in the ``[n_active, n_rewrite, t_max]`` layout, and the KL positions."""
        act = set(active.tolist())
        sel = [q for q, r in enumerate(self.req) if r in act]
        local = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
        local[active] = torch.arange(len(active), device=self.device)
        slot = self.slot[sel]
        slot = local[slot // self.per_req] * self.per_req + slot % self.per_req
        rr, rc = self.ps.slots([self.seg[q] for q in sel], [self.offset[q] for q in sel])
        kr, kc = self.ps.slots([self.ps.kl_seg[i] for i in active.tolist()], [0] * len(act))
        return rr, rc, slot, torch.stack([kr, kc])


def optimize_values(
    view: ModelView,
    tokenizer: Any,
    prompts: Sequence[ValuePrompts],
    layer: int,
    cfg: EditConfig,
    progress: Any = None,
    max_tokens: int = MAX_TOKENS,
) -> list[ValueResult]:
    """Fast engine: optimise the values of all requests together (same result as reference).

    Requests are independent, so a batch whose prompts have more than ``max_tokens`` suffix
    tokens in all (what one forward pass holds, and what the backward keeps activations for)
    is optimised in consecutive chunks of at most that many.
    """
    if not prompts:
        return []
    if len({p.n_prompts for p in prompts}) != 1:
        raise ValueError("all requests must use the same context templates")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    chunks: list[list[ValuePrompts]] = [[]]
    size = 0
    for p in prompts:
        tokens = sum(len(ids) - lk for ids, lk in zip(p.input_ids, p.lookup, strict=True))
        if chunks[-1] and size + tokens > max_tokens:
            chunks.append([])
            size = 0
        chunks[-1].append(p)
        size += tokens
    fixed = _Fixed()
    with _packed_attention(view, fixed):
        return [r for chunk in chunks
                for r in _optimize(view, tokenizer, chunk, layer, cfg, fixed, progress)]


def _optimize(
    view: ModelView,
    tokenizer: Any,
    prompts: Sequence[ValuePrompts],
    layer: int,
    cfg: EditConfig,
    fixed: _Fixed,
    progress: Any = None,
) -> list[ValueResult]:
    device = view.device
    head = view.lm_head
    ps = _Prompts(prompts, view, layer, pad_id_of(tokenizer), fixed)
    window = view.sliding_window
    longest = max(len(s.pre) + len(s.suf) for s in ps.segs)
    if isinstance(window, int) and longest > window:
        raise ValueError(
            f"a value prompt has {longest} tokens, more than the model's sliding attention "
            f"window ({window}), which the fast engine's packed attention does not apply; "
            "use engine='reference'")
    ps.prepare()
    n, d = len(prompts), view.d_model
    tg_all = _Targets(prompts, ps, device)
    n_rw, t_max, per_req = tg_all.n_rw, tg_all.t_max, tg_all.per_req
    targets, tmask, n_target = tg_all.targets, tg_all.mask, tg_all.n_target
    h0 = ps.hidden[torch.tensor([ps.segs[ps.rewrite_seg[i][0]].suf_start for i in range(n)],
                                device=device)].float()
    h0_norm = h0.norm(dim=-1)
    delta = torch.zeros(n, d, device=device)
    exp_avg = torch.zeros_like(delta)
    exp_avg_sq = torch.zeros_like(delta)
    mpes = [MPES(cfg.mpes_extra_steps) for _ in range(n)]
    results: list[dict[str, Any]] = [
        dict(steps=0, updates=0, stopped=False, loss=[], correct=[]) for _ in range(n)]
    zero_grads = torch.zeros(n, dtype=torch.long, device=device)
    kl_init = torch.zeros(n, head.weight.shape[0], device=device)
    active = torch.arange(n, device=device)
    softcap = view.logit_softcap

    rr, rc, slot, kl_pos = tg_all.positions(active)
    with stand_ins(view, layer, ps.as_tuple) as replaced:
        for it in range(cfg.v_num_grad_steps):
            n_act = len(active)
            local = torch.full((n,), -1, dtype=torch.long, device=device)
            local[active] = torch.arange(n_act, device=device)
            d_act = delta[active].clone().requires_grad_(True)
            last = ps.step(replaced[-1], d_act, local)
            # Loss read-out: each target position once; unused slots stay 0 / "correct".
            logp = torch.log_softmax(_logits(head, last[rr, rc], softcap), dim=-1)
            tg = targets[active]
            picked = logp.gather(-1, tg.flatten()[slot][:, None])[:, 0]
            target_logp = torch.zeros(n_act * per_req, device=device).index_put(
                (slot,), picked).view(n_act, n_rw, t_max)
            pred = tg.flatten().index_put((slot,), logp.argmax(-1)).view_as(tg)
            kl_logp = torch.log_softmax(_logits(head, last[kl_pos[0], kl_pos[1]], softcap), -1)
            if it == 0:
                kl_init = kl_logp.detach().clone()
            loss, _ = value_loss(
                target_logp, tmask[active], kl_logp, kl_init[active], d_act, h0_norm[active],
                n_target[active], kl_factor=cfg.kl_factor, weight_decay=cfg.v_weight_decay)
            correct = prompts_correct(pred[:, 1:], tg[:, 1:], tmask[active][:, 1:]).all(-1)
            keep = []
            losses, corrects = loss.detach().tolist(), correct.tolist()  # one device sync
            for q, i in enumerate(active.tolist()):
                res = results[i]
                res["steps"] += 1
                res["loss"].append(losses[q])
                res["correct"].append(corrects[q])
                if mpes[i].update(corrects[q]):
                    res["stopped"] = True
                elif res["loss"][-1] < cfg.loss_cutoff or it == cfg.v_num_grad_steps - 1:
                    pass
                else:
                    keep.append(q)
            if not keep:
                if progress is not None:
                    progress.update(n_act)
                break
            keep_t = torch.tensor(keep, device=device)
            # Only continuing requests contribute to the gradient (rows are independent).
            (loss[keep_t].sum()).backward()
            grad = d_act.grad[keep_t]
            cont = active[keep_t]
            step = it + 1  # every continuing request has made exactly `it` updates so far
            with torch.no_grad():
                m = exp_avg[cont].lerp_(grad, 1 - ADAM_BETAS[0])
                v = exp_avg_sq[cont].mul_(ADAM_BETAS[1]).addcmul_(grad, grad,
                                                                  value=1 - ADAM_BETAS[1])
                exp_avg[cont], exp_avg_sq[cont] = m, v
                step_size = cfg.v_lr / (1 - ADAM_BETAS[0] ** step)
                denom = (v.sqrt() / math.sqrt(1 - ADAM_BETAS[1] ** step)).add_(ADAM_EPS)
                new = delta[cont].addcdiv_(m, denom, value=-step_size)
                clamp_(new, cfg.clamp_norm_factor * h0_norm[cont])
                delta[cont] = new
            zero_grads[cont] += (~grad.any(dim=-1)).long()  # read once at the end: no sync
            for i in cont.tolist():
                results[i]["updates"] += 1
            if progress is not None:
                progress.update(n_act - len(keep))
            if len(keep) < n_act:
                active = cont
                keep_req = set(active.tolist())
                ps.select([k for k, s in enumerate(ps.segs) if s.req in keep_req])
                rr, rc, slot, kl_pos = tg_all.positions(active)
    zeros = zero_grads.tolist()
    return [
        ValueResult(z=(h0[i] + delta[i]).float(), h0=h0[i], steps=r["steps"],
                    updates=r["updates"], mpes_stopped=r["stopped"], loss_history=r["loss"],
                    correct_history=r["correct"], zero_grad_updates=zeros[i])
        for i, r in enumerate(results)
    ]


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
