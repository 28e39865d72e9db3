"""Fast value optimisation: every request of a batch at once, and only the work δ can change.

Computes the same ``z`` as :mod:`encore_fast.values.reference` (DESIGN.md §3):

* **Batched**: δ is ``[n, d_model]``; each request's loss depends only on its own row, and the
  per-row Adam, clamp, loss cut-off, step limit and MPES reproduce each request's own trajectory.
  A request that stops is dropped from the batch (its rows are no longer computed).
* **Prefix reuse**: tokens before the last subject token are not affected by δ (causal
  attention). They run once, with a KV cache; each step runs only the suffix (from the last
  subject token on), attending to the cached prefix.
* **Layer skip**: blocks up to the edited block ``l_m`` are not affected by δ either. Their
  output for the suffix tokens is computed once; during the steps those blocks are replaced by
  stand-ins that return it (plus δ at the subject position).
* **Logits only where read**: the LM head runs only at the target positions and at the KL
  position, never over the whole ``[batch, seq, vocab]``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from encore_fast.config import EditConfig
from encore_fast.models.arch import ModelView, block_hidden, stand_ins
from encore_fast.values.objective import MPES, clamp_, prompts_correct, value_loss
from encore_fast.values.prompts import ValuePrompts, pad_id_of
from encore_fast.values.reference import ValueResult

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _cache_kwarg(base: nn.Module) -> str:
    """transformers 5 calls the KV cache ``cache``; 4.x called it ``past_key_values``."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _cache_tensors(cache: Any, fn: Any) -> None:
    """Apply ``fn`` to every layer's key and value tensor of a transformers (5.x) cache."""
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                setattr(layer, name, fn(t))


def _sanitize_cache(cache: Any) -> None:
    """Rows with no prefix token attend to nothing in the prefix pass and may leave NaNs in
    their (masked, weight-0) cache slots; 0·NaN would poison the suffix pass, so zero them."""
    _cache_tensors(cache, lambda t: torch.nan_to_num(t, nan=0.0))


def _crop(cache: Any, length: int) -> None:
    """Drop what the last pass appended: keep the first ``length`` positions."""
    _cache_tensors(cache, lambda t: t[..., :length, :].detach())


def _select_rows(cache: Any, index: torch.Tensor) -> None:
    _cache_tensors(cache, lambda t: t[index])


class _Batch:
    """Padded tensors for all prompts of the active requests: left-padded prefixes (up to the
    last subject token), right-padded suffixes (from it on), and where the loss reads."""

    def __init__(self, prompts: Sequence[ValuePrompts], pad_id: int, device: torch.device) -> None:
        self.n = len(prompts)
        rows = [(i, j) for i, p in enumerate(prompts) for j in range(p.n_prompts)]
        self.row_req = torch.tensor([i for i, _ in rows], device=device)
        pre = [prompts[i].input_ids[j][: prompts[i].lookup[j]] for i, j in rows]
        # KL prompts are read only at the subject position: nothing after it can matter.
        suf = [prompts[i].input_ids[j][prompts[i].lookup[j]:] if j < prompts[i].n_rewrite
               else prompts[i].input_ids[j][prompts[i].lookup[j]:][:1] for i, j in rows]
        self.p_max = max(len(s) for s in pre)
        s_max = max(len(s) for s in suf)
        r = len(rows)
        self.pre_ids = torch.full((r, self.p_max), pad_id, dtype=torch.long)
        self.pre_mask = torch.zeros((r, self.p_max), dtype=torch.long)
        self.suf_ids = torch.full((r, s_max), pad_id, dtype=torch.long)
        self.suf_mask = torch.zeros((r, s_max), dtype=torch.long)
        self.suf_pos = torch.zeros((r, s_max), dtype=torch.long)
        for k, (a, b) in enumerate(zip(pre, suf, strict=True)):
            if a:
                self.pre_ids[k, self.p_max - len(a):] = torch.tensor(a)
                self.pre_mask[k, self.p_max - len(a):] = 1
            self.suf_ids[k, : len(b)] = torch.tensor(b)
            self.suf_mask[k, : len(b)] = 1
            self.suf_pos[k] = len(a) + torch.arange(s_max)
        self.pre_pos = (self.pre_mask.cumsum(1) - 1).clamp(min=0)
        # Loss read-out: rewrite prompts' target positions, in suffix coordinates.
        self.n_rw = prompts[0].n_rewrite
        self.t_max = max(len(p.target_ids) for p in prompts)
        read_row, read_pos, targets, tmask = [], [], [], []
        kl_row = []
        k = 0
        for p in prompts:
            t = len(p.target_ids)
            for j in range(p.n_prompts):
                if j < p.n_rewrite:
                    for q in range(self.t_max):
                        read_row.append(k)
                        read_pos.append(p.target_start[j] - p.lookup[j] + min(q, t - 1))
                        targets.append(p.target_ids[min(q, t - 1)])
                        tmask.append(1.0 if q < t else 0.0)
                else:
                    kl_row.append(k)
                k += 1
        self.read_row = torch.tensor(read_row, device=device)
        self.read_pos = torch.tensor(read_pos, device=device)
        self.targets = torch.tensor(targets, device=device).view(self.n, self.n_rw, self.t_max)
        self.tmask = torch.tensor(tmask, device=device).view(self.n, self.n_rw, self.t_max)
        self.n_target = torch.tensor([float(len(p.target_ids)) for p in prompts], device=device)
        self.kl_row = torch.tensor(kl_row, device=device)
        for name in ("pre_ids", "pre_mask", "pre_pos", "suf_ids", "suf_mask", "suf_pos"):
            setattr(self, name, getattr(self, name).to(device))

    def rows_of(self, reqs: torch.Tensor) -> torch.Tensor:
        """Prompt-row indices belonging to the given request indices."""
        return torch.nonzero(torch.isin(self.row_req, reqs)).flatten()


def optimize_values(
    view: ModelView,
    tokenizer: Any,
    prompts: Sequence[ValuePrompts],
    layer: int,
    cfg: EditConfig,
    progress: Any = None,
    min_group: int = 4,
) -> list[ValueResult]:
    """Fast engine: optimise the values of all requests together (same result as reference).

    Requests are independent (each owns a row of δ), so they are bucketed by suffix length and
    each bucket runs as one batch: less padding than one batch padded to the longest suffix.
    Buckets smaller than ``min_group`` requests are merged into the next longer one.
    """
    if not prompts:
        return []
    suffix = [max(len(ids) - lk for ids, lk in zip(p.input_ids[: p.n_rewrite], p.lookup,
                                                    strict=False))
              for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: suffix[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (suffix[groups[-1][-1]] == suffix[i] or len(groups[-1]) < min_group):
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) > 1 and len(groups[-1]) < min_group:
        groups[-2].extend(groups.pop())
    results: list[ValueResult | None] = [None] * len(prompts)
    for g in groups:
        for i, res in zip(g, _optimize_group(view, tokenizer, [prompts[i] for i in g], layer,
                                             cfg, progress), strict=True):
            results[i] = res
    return results  # type: ignore[return-value]


def _optimize_group(
    view: ModelView,
    tokenizer: Any,
    prompts: Sequence[ValuePrompts],
    layer: int,
    cfg: EditConfig,
    progress: Any = None,
) -> list[ValueResult]:
    """One batch of requests, padded together (see :func:`optimize_values`)."""
    if len({p.n_prompts for p in prompts}) != 1:
        raise ValueError("all requests must use the same context templates")
    device = view.device
    model = view.model
    base = model.base_model
    head = model.get_output_embeddings()
    ckw = _cache_kwarg(base)
    b = _Batch(prompts, pad_id_of(tokenizer), device)
    n, d = len(prompts), view.d_model

    # 1. Prefix pass (once): KV cache of everything before the last subject token.
    cache = None
    with torch.no_grad():
        if b.p_max > 0:
            out = base(input_ids=b.pre_ids, attention_mask=b.pre_mask, position_ids=b.pre_pos,
                       use_cache=True)
            cache = _out_cache(out)
            _sanitize_cache(cache)
        full_mask = torch.cat([b.pre_mask, b.suf_mask], 1)

        # 2. Suffix pass through the real blocks up to l_m (once): their output is fixed.
        captured: dict[str, Any] = {}

        def grab(_m: Any, _a: Any, output: Any) -> None:
            captured["h"] = block_hidden(output).detach()
            captured["tuple"] = not isinstance(output, torch.Tensor)

        handle = view.blocks[layer].register_forward_hook(grab)
        try:
            kwargs = {ckw: cache} if cache is not None else {}
            base(input_ids=b.suf_ids, attention_mask=full_mask, position_ids=b.suf_pos,
                 use_cache=cache is not None, **kwargs)
        finally:
            handle.remove()
        if cache is not None:
            _crop(cache, b.p_max)
    h_lm = captured["h"]  # [rows, suffix, d]
    # Rows are ordered by request; each request's first row is its raw rewrite prompt.
    h0 = h_lm.view(n, -1, *h_lm.shape[1:])[:, 0, 0]
    h0 = h0.float()
    h0_norm = h0.norm(dim=-1)

    delta = torch.zeros(n, d, device=device)
    exp_avg = torch.zeros_like(delta)
    exp_avg_sq = torch.zeros_like(delta)
    mpes = [MPES(cfg.mpes_extra_steps) for _ in range(n)]
    results: list[dict[str, Any]] = [
        dict(steps=0, updates=0, stopped=False, loss=[], correct=[]) for _ in range(n)]
    kl_init = torch.zeros(n, head.weight.shape[0], device=device)
    active = torch.arange(n, device=device)
    rows = torch.arange(len(b.row_req), device=device)
    softcap = getattr(model.config, "final_logit_softcapping", None)

    with stand_ins(view, layer, captured["tuple"]) as replaced:
        for it in range(cfg.v_num_grad_steps):
            n_act = len(active)
            local = torch.full((n,), -1, dtype=torch.long, device=device)
            local[active] = torch.arange(n_act, device=device)
            d_act = delta[active].clone().requires_grad_(True)
            row_local = local[b.row_req[rows]]
            hidden = h_lm[rows]
            first = hidden[:, :1] + d_act[row_local][:, None].to(hidden.dtype)
            replaced[-1].hidden = torch.cat([first, hidden[:, 1:]], 1)
            kwargs = {ckw: cache} if cache is not None else {}
            out = base(input_ids=b.suf_ids[rows], attention_mask=full_mask[rows],
                       position_ids=b.suf_pos[rows], use_cache=cache is not None, **kwargs)
            last = out.last_hidden_state
            if cache is not None:
                _crop(cache, b.p_max)
            # Map global row ids to positions in the active batch.
            pos_in_batch = torch.full((len(b.row_req),), -1, dtype=torch.long, device=device)
            pos_in_batch[rows] = torch.arange(len(rows), device=device)
            rd = pos_in_batch[b.read_row].view(n, b.n_rw, b.t_max)[active].flatten()
            rp = b.read_pos.view(n, b.n_rw, b.t_max)[active].flatten()
            logits = _logits(head, last[rd, rp], softcap).view(n_act, b.n_rw, b.t_max, -1)
            logp = torch.log_softmax(logits, dim=-1)
            tg = b.targets[active]
            target_logp = logp.gather(-1, tg[..., None])[..., 0]
            kl_logits = _logits(head, last[pos_in_batch[b.kl_row[active]], 0], softcap)
            kl_logp = torch.log_softmax(kl_logits, dim=-1)
            if it == 0:
                kl_init = kl_logp.detach().clone()
            loss, _ = value_loss(
                target_logp, b.tmask[active], kl_logp, kl_init[active], d_act, h0_norm[active],
                b.n_target[active], kl_factor=cfg.kl_factor, weight_decay=cfg.v_weight_decay)
            correct = prompts_correct(logits.argmax(-1)[:, 1:], tg[:, 1:],
                                      b.tmask[active][:, 1:]).all(-1)
            keep = []
            for q, i in enumerate(active.tolist()):
                res = results[i]
                res["steps"] += 1
                res["loss"].append(float(loss[q].detach()))
                res["correct"].append(bool(correct[q]))
                if mpes[i].update(bool(correct[q])):
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
            for i in cont.tolist():
                results[i]["updates"] += 1
            if progress is not None:
                progress.update(n_act - len(keep))
            if len(keep) < n_act:
                active = cont
                new_rows = b.rows_of(active)
                if cache is not None:  # the cache holds the current rows, in order
                    _select_rows(cache, pos_in_batch[new_rows])
                rows = new_rows
    return [
        ValueResult(z=(h0[i] + delta[i]).float(), h0=h0[i], steps=r["steps"],
                    updates=r["updates"], mpes_stopped=r["stopped"], loss_history=r["loss"],
                    correct_history=r["correct"])
        for i, r in enumerate(results)
    ]


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
