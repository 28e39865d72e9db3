"""Fast value optimisation: every request of a batch at once, and only the work δ can change.

Computes the same ``z`` as :mod:`encore_fast.values.reference` (docs/design.md §4):

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

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from encore_fast.config import EditConfig
from encore_fast.models.arch import ModelView, StandIn, block_hidden, stand_ins
from encore_fast.models.loading import pad_id
from encore_fast.values.attention import Fixed, packed_attention_mode
from encore_fast.values.objective import (
    StopRule,
    ValueResult,
    clamp_,
    prompts_correct,
    value_loss,
)
from encore_fast.values.packing import Layout, Segment
from encore_fast.values.prompts import ValuePrompts

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MAX_TOKENS = 8192  # default suffix tokens per packed forward (see optimize_values)


class _Captured(Exception):
    """Raised by the capture hook: nothing after block ``l_m`` is needed in that pass."""


class _Prompts:
    """The segments of a batch (each request's rewrite prompts, then its KL prompts), the once-
    per-batch work (prefix keys/values, block ``l_m``'s output) and the packed step forward."""

    def __init__(self, prompts: Sequence[ValuePrompts], view: ModelView, layer: int,
                 pad_id: int, fixed: Fixed) -> None:
        self.view, self.layer, self.pad_id = view, layer, pad_id
        self.base = view.backbone
        self.device = view.device
        self.dtype = view.dtype
        self.segs: list[Segment] = []
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
                self.segs.append(Segment(i, p.input_ids[j][:lk], suf, suf_n, c, own_n, kv))
                own_n, suf_n = own_n + lk - c, suf_n + len(suf)
        self.n_shared, self.n_own, self.n_suf = n_shared, own_n, suf_n
        self.fixed = fixed  # what packed_attention reads: set by select()
        # Per attention module: every prefix token's key and value, [n_pre, h_kv, hd] each.
        self.prefix_kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hidden = torch.empty(0)  # block l_m's output at every suffix token: [n_suf, d]
        self.as_tuple = False
        self.layout: Layout | None = None

    # -- once per batch ---------------------------------------------------------------------
    def _prefix_pass(self, query: list[list[int]], q_start: list[int], q_pos0: list[int],
                     kv: list[list[int]], n_out: int
                     ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``[n_out, h_kv, hd]`` (flat) of the query tokens at every layer,
        attending to ``kv`` in :attr:`prefix_kv`."""
        lay = Layout(query, q_start, q_pos0, kv, self.pad_id, self.device, self.dtype)
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
    def _set_fixed(self, lay: Layout) -> None:
        """Point :func:`packed_attention` at the prefix keys/values of ``lay``'s rows."""
        self.fixed.prefix = {
            m: tuple(lay.gather(t, lay.kv_idx).transpose(1, 2).contiguous() for t in kv)
            for m, kv in self.prefix_kv.items()} if lay.kv_width else {}

    def select(self, seg_ids: list[int]) -> None:
        """Pack the given segments (the active requests') for the next steps."""
        segs = [self.segs[k] for k in seg_ids]
        self.layout = lay = Layout(
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
    fixed = Fixed()
    with packed_attention_mode(view, fixed):
        return [r for chunk in chunks
                for r in _optimize(view, tokenizer, chunk, layer, cfg, fixed, progress)]


class RowAdam:
    """Adam on the rows of δ ``[n, d]``, each row with its own step count: the update
    ``torch.optim.Adam`` makes for one request's δ, for any subset of rows at once."""

    def __init__(self, delta: torch.Tensor, lr: float) -> None:
        self.delta, self.lr = delta, lr
        self.exp_avg = torch.zeros_like(delta)
        self.exp_avg_sq = torch.zeros_like(delta)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
        """Update ``delta[rows]`` with ``grad`` (their ``step``-th update); the new rows."""
        b1, b2 = ADAM_BETAS
        m = self.exp_avg[rows].lerp_(grad, 1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(ADAM_EPS)
        return self.delta[rows].addcdiv_(m, denom, value=-self.lr / (1 - b1**step))


def _check_window(view: ModelView, ps: _Prompts) -> None:
    """The packed attention applies no sliding window: refuse prompts longer than one."""
    window = view.sliding_window
    longest = max(len(s.pre) + len(s.suf) for s in ps.segs)
    if isinstance(window, int) and longest > window:
        raise ValueError(
            f"a value prompt has {longest} tokens, more than the model's sliding attention "
            f"window ({window}), which the fast engine's packed attention does not apply; "
            "use engine='reference'")


class _ReadOut:
    """The step's read-out: target log-probs and predictions at each target position once,
    and the KL prompts' log-distributions (the LM head only where it is read)."""

    def __init__(self, view: ModelView, tg: _Targets) -> None:
        self.head, self.softcap, self.tg = view.lm_head, view.logit_softcap, tg
        self.active: torch.Tensor | None = None

    def select(self, active: torch.Tensor) -> None:
        self.active = active
        self.rr, self.rc, self.slot, self.kl_pos = self.tg.positions(active)

    def __call__(self, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tg_all, active, slot = self.tg, self.active, self.slot
        logp = torch.log_softmax(_logits(self.head, last[self.rr, self.rc], self.softcap), -1)
        tg = tg_all.targets[active]
        picked = logp.gather(-1, tg.flatten()[slot][:, None])[:, 0]
        target_logp = torch.zeros(len(active) * tg_all.per_req, device=last.device).index_put(
            (slot,), picked).view(len(active), tg_all.n_rw, tg_all.t_max)
        pred = tg.flatten().index_put((slot,), logp.argmax(-1)).view_as(tg)
        kl_logp = torch.log_softmax(
            _logits(self.head, last[self.kl_pos[0], self.kl_pos[1]], self.softcap), -1)
        return target_logp, pred, kl_logp


def _optimize(
    view: ModelView,
    tokenizer: Any,
    prompts: Sequence[ValuePrompts],
    layer: int,
    cfg: EditConfig,
    fixed: Fixed,
    progress: Any = None,
) -> list[ValueResult]:
    """The steps of one chunk: packed forward, read-out, loss; stopped requests leave; one
    backward for the others, per-row Adam, clamp."""
    ps = _Prompts(prompts, view, layer, pad_id(tokenizer), fixed)
    _check_window(view, ps)
    ps.prepare()
    run = _Run(view, prompts, ps, cfg)
    with stand_ins(view, layer, ps.as_tuple) as replaced:
        for it in range(cfg.v_num_grad_steps):
            if not run.step(it, replaced[-1], progress):
                break
    zeros = run.zero_grads.tolist()
    return [rule.result((run.h0[i] + run.delta[i]).float(), run.h0[i], zeros[i])
            for i, rule in enumerate(run.rules)]


class _Run:
    """The optimisation of one chunk: δ ``[n, d_model]`` with per-row Adam and stop rules,
    and the requests still active (the others have left the packed rows)."""

    def __init__(self, view: ModelView, prompts: Sequence[ValuePrompts], ps: _Prompts,
                 cfg: EditConfig) -> None:
        device = self.device = view.device
        self.ps, self.cfg = ps, cfg
        n = self.n = len(prompts)
        self.tg_all = _Targets(prompts, ps, device)
        self.h0 = ps.hidden[torch.tensor(
            [ps.segs[ps.rewrite_seg[i][0]].suf_start for i in range(n)], device=device)].float()
        self.h0_norm = self.h0.norm(dim=-1)
        self.delta = torch.zeros(n, view.d_model, device=device)
        self.adam = RowAdam(self.delta, cfg.v_lr)
        self.rules = [StopRule(cfg) for _ in range(n)]
        self.zero_grads = torch.zeros(n, dtype=torch.long, device=device)
        self.kl_init: torch.Tensor | None = None
        self.active = torch.arange(n, device=device)
        self.read = _ReadOut(view, self.tg_all)
        self.read.select(self.active)

    def step(self, it: int, stand_in: StandIn, progress: Any) -> bool:
        """Step ``it``: the loss of every active request; those still going make their
        update. False once none is left."""
        active, n_act = self.active, len(self.active)
        local = torch.full((self.n,), -1, dtype=torch.long, device=self.device)
        local[active] = torch.arange(n_act, device=self.device)
        d_act = self.delta[active].clone().requires_grad_(True)
        loss, keep = self._loss(self.read(self.ps.step(stand_in, d_act, local)), d_act)
        if progress is not None:
            progress.update(n_act - len(keep))
        if not keep:
            return False
        keep_t = torch.tensor(keep, device=self.device)
        (loss[keep_t].sum()).backward()  # only continuing rows; rows are independent
        cont = self._update(active[keep_t], d_act.grad[keep_t], it)
        if len(keep) < n_act:
            self._narrow(cont)
        return True

    def _loss(self, read: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
              d_act: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The loss per active request, and which of them go on (their stop rules record it)."""
        target_logp, pred, kl_logp = read
        tg_all, active, cfg = self.tg_all, self.active, self.cfg
        if self.kl_init is None:
            self.kl_init = kl_logp.detach().clone()
        loss, _ = value_loss(
            target_logp, tg_all.mask[active], kl_logp, self.kl_init[active], d_act,
            self.h0_norm[active], tg_all.n_target[active], kl_factor=cfg.kl_factor,
            weight_decay=cfg.v_weight_decay)
        tg = tg_all.targets[active]
        correct = prompts_correct(pred[:, 1:], tg[:, 1:], tg_all.mask[active][:, 1:]).all(-1)
        losses, corrects = loss.detach().tolist(), correct.tolist()  # one device sync
        keep = [q for q, i in enumerate(active.tolist())
                if self.rules[i].record(losses[q], corrects[q])]
        return loss, keep

    def _update(self, cont: torch.Tensor, grad: torch.Tensor, it: int) -> torch.Tensor:
        """Adam and clamp on the rows ``cont`` that go on; returns them."""
        new = self.adam.step(cont, grad, it + 1)  # each has made exactly `it` updates so far
        clamp_(new, self.cfg.clamp_norm_factor * self.h0_norm[cont])
        self.delta[cont] = new
        self.zero_grads[cont] += (~grad.any(dim=-1)).long()  # read once at the end: no sync
        for i in cont.tolist():
            self.rules[i].updates += 1
        return cont

    def _narrow(self, cont: torch.Tensor) -> None:
        """Only the requests ``cont`` stay in the packed rows and the read-out."""
        self.active = cont
        kept = set(cont.tolist())
        self.ps.select([k for k, s in enumerate(self.ps.segs) if s.req in kept])
        self.read.select(cont)


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
