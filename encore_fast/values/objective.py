"""The value-optimisation objective and ENCORE's MPES rule, shared by both engines.

Both engines feed these functions the same quantities (target log-probabilities, KL-prompt
log-distributions, δ), so the loss, the stopping rules and the clamp are defined once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
