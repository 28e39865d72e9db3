"""Context templates: ``"{}"`` plus short model-generated prefixes (docs/design.md §2, step 1).

Each prefix is sampled from the model (top-5, 10 tokens including the seed word) with a fixed
seed, braces replaced by spaces, and ``". {}"`` appended. They are generated once per model so
runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from encore_fast.models.placement import input_device
from encore_fast.requests import encode


@torch.no_grad()
def generate_context_templates(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    words: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    length: int = 10,
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """``["{}"]`` followed by one sampled ``"<text>. {}"`` per seed word."""
    gen = torch.Generator().manual_seed(seed)
    device = input_device(model)
    templates = ["{}"]
    for word in words:
        ids = encode(tokenizer, word)
        n_special = len(ids) - len(tokenizer(word, add_special_tokens=False)["input_ids"])
        while len(ids) - n_special < length:
            logits = model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            top = torch.topk(logits, top_k)
            probs = torch.softmax(top.values, dim=-1)
            choice = torch.multinomial(probs, 1, generator=gen).item()
            ids.append(int(top.indices[choice]))
        text = tokenizer.decode(ids[n_special:], skip_special_tokens=True)
        templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates


def fill(context: str, template: str) -> str:
    """Put a request template (which still holds ``{}`` for the subject) into a context."""
    return context.replace("{}", template, 1)
