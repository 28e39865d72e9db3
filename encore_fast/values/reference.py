"""Reference value optimisation: one request at a time, the whole model each step.

This follows the published MEMIT/ENCORE code step by step (docs/design.md §2, steps 2-3): a free
vector δ is added to the output of block ``layer`` at the last subject token of every prompt, the
full model runs, full-vocabulary logits are formed, and Adam optimises δ. It is slow on purpose: it
is the yardstick the fast engine is tested against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from encore_fast.config import EditConfig
from encore_fast.models.arch import ModelView, block_hidden, replace_block_hidden
from encore_fast.models.hooks import editing_mode
from encore_fast.models.loading import pad_id
from encore_fast.values.objective import (
    StopRule,
    ValueResult,
    clamp_,
    prompts_correct,
    value_loss,
)
from encore_fast.values.prompts import ValuePrompts, pad_batch


class _Inputs:
    """One request's prompts on the model's device: the padded batch, each prompt's subject
    position, the rewrite prompts' target positions and ids."""

    def __init__(self, prompts: ValuePrompts, pad: int, device: torch.device) -> None:
        self.ids, self.attn = pad_batch(prompts.input_ids, pad, device)
        self.lookup = torch.tensor(prompts.lookup, device=device)
        self.rows = torch.arange(len(prompts.input_ids), device=device)
        self.n_rw, self.t = prompts.n_rewrite, len(prompts.target_ids)
        self.positions = torch.tensor(prompts.target_start, device=device)[:, None] + torch.arange(
            self.t, device=device)
        self.targets = torch.tensor(prompts.target_ids, device=device).expand(self.n_rw, self.t)
        self.tmask = torch.ones(self.n_rw, self.t, device=device)


def optimize_value(
    view: ModelView, tokenizer: Any, prompts: ValuePrompts, layer: int, cfg: EditConfig
) -> ValueResult:
    """Optimise δ for one request and return its target value ``z`` (fp32, ``[d_model]``)."""
    device = view.device
    x = _Inputs(prompts, pad_id(tokenizer), device)
    delta = torch.zeros(view.d_model, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    rule = StopRule(cfg)
    handle = view.blocks[layer].register_forward_hook(_add_delta(x, delta, state, device))
    with editing_mode(view.model):  # (δ alone needs gradients; the flags come back after)
        try:
            zero_grads = _steps(view, x, delta, state, opt, rule, cfg)
        finally:
            handle.remove()
    h0 = state["h0"]
    return rule.result((h0 + delta.detach()).float(), h0, zero_grads)


def _add_delta(x: _Inputs, delta: torch.Tensor, state: dict[str, torch.Tensor],
               device: torch.device) -> Any:
    """The forward hook of block ``layer``: adds δ at every prompt's subject position (and
    records the unedited output ``h0`` of the first prompt's, once)."""

    def hook(_mod: Any, _args: Any, output: Any) -> Any:
        hidden = block_hidden(output)
        if "h0" not in state:
            state["h0"] = hidden[0, int(x.lookup[0])].detach().float().clone().to(device)
        dev = hidden.device  # (the block's: another GPU than the inputs' under a device_map)
        add = torch.zeros_like(hidden).index_put((x.rows.to(dev), x.lookup.to(dev)), delta.to(
            dev, hidden.dtype).expand(len(x.rows), -1))
        return replace_block_hidden(output, hidden + add)

    return hook


def _steps(view: ModelView, x: _Inputs, delta: torch.Tensor, state: dict[str, torch.Tensor],
           opt: torch.optim.Optimizer, rule: StopRule, cfg: EditConfig) -> int:
    """Adam on δ until the stop rule ends it; the number of updates whose gradient was zero."""
    device = view.device
    n_rw, t, positions, targets, tmask = x.n_rw, x.t, x.positions, x.targets, x.tmask
    kl_init = None
    zero_grads = 0
    for _ in range(cfg.v_num_grad_steps):
        opt.zero_grad()
        logits = view.model(input_ids=x.ids, attention_mask=x.attn).logits.to(device).float()
        log_probs = torch.log_softmax(logits[:n_rw], dim=-1)
        rw_rows = torch.arange(n_rw, device=device)[:, None]
        target_logp = log_probs[rw_rows, positions].gather(-1, targets[..., None])[..., 0]
        kl_logp = torch.log_softmax(logits[n_rw:][torch.arange(
            len(x.rows) - n_rw, device=device), x.lookup[n_rw:]], dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        h0 = state["h0"]
        loss, _ = value_loss(
            target_logp[None], tmask[None], kl_logp[:1], kl_init[:1], delta[None],
            h0.norm()[None], torch.tensor([float(t)], device=device),
            kl_factor=cfg.kl_factor, weight_decay=cfg.v_weight_decay,
        )
        loss = loss[0]
        pred = logits[rw_rows, positions].argmax(-1)
        all_correct = bool(prompts_correct(pred[1:], targets[1:], tmask[1:]).all())
        if not rule.record(float(loss.detach()), all_correct):
            break
        loss.backward()
        zero_grads += int(not bool(delta.grad.any()))
        opt.step()
        rule.updates += 1
        with torch.no_grad():
            clamp_(delta[None], cfg.clamp_norm_factor * h0.norm()[None])
    return zero_grads


def optimize_values(
    view: ModelView,
    tokenizer: Any,
    prompts: Sequence[ValuePrompts],
    layer: int,
    cfg: EditConfig,
    progress: Any = None,
) -> list[ValueResult]:
    """Reference engine: optimise each request on its own, in order."""
    out = []
    for p in prompts:
        out.append(optimize_value(view, tokenizer, p, layer, cfg))
        if progress is not None:
            progress.update(1)
    return out
