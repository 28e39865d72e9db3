"""The value-optimisation objective, its stopping rule and result, shared by both engines.

Both engines feed these the same quantities (target log-probabilities, KL-prompt
log-distributions, δ, each step's loss and top-1 flag), so the loss, the stopping rule (MPES, the
loss cut-off, the step limit), the clamp and what a request's optimisation returns are defined
once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from encore_fast.config import EditConfig


@dataclass
class ValueResult:
    """Outcome of optimising one request's value: ``z = h0 + δ``."""

    z: torch.Tensor
    h0: torch.Tensor
    steps: int  # forward passes (loss evaluations)
    updates: int  # optimiser updates applied
    mpes_stopped: bool
    loss_history: list[float] = field(default_factory=list)
    correct_history: list[bool] = field(default_factory=list)  # all prefixed prompts top-1
    zero_grad_updates: int = 0  # updates whose gradient was exactly zero (16-bit underflow)


def value_loss(
    target_logp: torch.Tensor,
    target_mask: torch.Tensor,
    kl_logp: torch.Tensor,
    kl_init: torch.Tensor,
    delta: torch.Tensor,
    h0_norm: torch.Tensor,
    n_target: torch.Tensor,
    *,
    kl_factor: float,
    weight_decay: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-request loss ``[n]`` = NLL + kl_factor·KL(p_δ‖p_0) + wd·‖δ‖/‖h0‖².

    Shapes: ``target_logp``/``target_mask`` ``[n, p, t]`` (request, rewrite prompt, target
    position; masked entries ignored), ``kl_logp``/``kl_init`` ``[n, V]`` (one KL prompt per
    request), ``delta`` ``[n, d]``, ``h0_norm`` and ``n_target`` ``[n]``. The NLL of a prompt
    is its summed target NLL divided by the number of target tokens, averaged over prompts.
    """
    nll_each = -(target_logp * target_mask).sum(-1) / n_target[:, None]
    nll = nll_each.mean(-1)
    kl = kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="none").sum(-1)
    wd = weight_decay * delta.norm(dim=-1) / h0_norm**2
    return nll + kl + wd, {"nll": nll, "kl": kl, "wd": wd}


def prompts_correct(pred: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per prompt: whether the argmax at every target position equals the target token.

    ``pred``, ``targets``, ``mask``: ``[..., t]``; returns bool ``[...]``.
    """
    return ((pred == targets) | ~mask.bool()).all(-1)


class MPES:
    """Most-probable early stopping: count steps at which every prefixed rewrite prompt already
    predicts the whole target; stop when the count reaches ``extra_steps + 1``.

    The count is never reset. ``extra_steps=None`` disables the rule.
    """

    def __init__(self, extra_steps: int | None) -> None:
        self.extra_steps = extra_steps
        self.count = 0

    def update(self, all_correct: bool) -> bool:
        """Record one step; return True if optimisation must stop now (before the update)."""
        if self.extra_steps is None:
            return False
        if all_correct:
            self.count += 1
        return self.count >= self.extra_steps + 1


@torch.no_grad()
def clamp_(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale rows of ``delta`` down to ``max_norm`` where their norm exceeds it (in place)."""
    norms = delta.norm(dim=-1, keepdim=True)
    limit = max_norm[:, None]
    scale = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
    delta.mul_(scale)


class StopRule:
    """One request's optimisation record and when it ends: after each step's loss and
    "every prefixed prompt predicts the target" flag, :meth:`record` says whether an update
    follows -- not if MPES stops it, the loss is below ``loss_cutoff``, or the step limit
    ``v_num_grad_steps`` is reached."""

    def __init__(self, cfg: EditConfig) -> None:
        self.mpes = MPES(cfg.mpes_extra_steps)
        self.cutoff, self.max_steps = cfg.loss_cutoff, cfg.v_num_grad_steps
        self.loss: list[float] = []
        self.correct: list[bool] = []
        self.updates = 0
        self.stopped = False  # by MPES

    def record(self, loss: float, all_correct: bool) -> bool:
        """Record one step; True if the request goes on (an optimiser update follows)."""
        self.loss.append(loss)
        self.correct.append(all_correct)
        if self.mpes.update(all_correct):
            self.stopped = True
            return False
        return not (loss < self.cutoff or len(self.loss) >= self.max_steps)

    def result(self, z: torch.Tensor, h0: torch.Tensor, zero_grad_updates: int) -> ValueResult:
        return ValueResult(z=z, h0=h0, steps=len(self.loss), updates=self.updates,
                           mpes_stopped=self.stopped, loss_history=self.loss,
                           correct_history=self.correct, zero_grad_updates=zero_grad_updates)
