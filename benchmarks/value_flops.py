"""FLOPs of the fast engine's value optimisation, counted from shapes, and a matmul ceiling.

What one value step computes (``encore_fast/values/fast.py``): δ is added to the output of the
last edited block ``l_m``; blocks ``0..l_m`` are replaced by stand-ins that return their output
computed once per batch, so a step runs only the blocks ``l_m+1 .. L-1`` over each request's
*suffix* tokens (a rewrite prompt from its last subject token on, target tokens but the last
included; a KL prompt only its last subject token), attending to the fixed keys/values of the
tokens before them (the prefix, computed once per batch). The LM head runs only where the loss
reads: each target token of each rewrite prompt once, and the request's KL position.

Counting (model FLOPs, what the computation needs, not what the kernels happen to do):

* matmul FLOPs only, ``2·m·n·k`` each; norms, rotary, softmax, activations and Adam are not
  counted; padding of the packed rows and masked-out attention scores are not counted;
* per block and token: Q and O ``2·d·h·hd`` each, K and V ``2·d·kv·hd`` each, the MLP
  ``2·d·I`` per matrix (3 matrices gated -- Llama, Qwen, Gemma, ... --, 2 for GPT-2/J/NeoX);
* attention: ``4·h·hd`` per query-key pair (``QKᵀ`` and ``P·V``), causal (a suffix token
  attends to its prefix and to the suffix tokens up to itself);
* LM head: ``2·d·V`` per read position;
* backward: the weights are frozen (the editor turns ``requires_grad`` off), so a linear layer's
  backward forms only the input gradient ``dX = dY·Wᵀ``: 1× its forward, not the usual 2×
  (no ``dW``). The attention products among the step's own tokens need both operands'
  gradients: 2×. Attention to the prefix: 1× (``dQ`` and ``dP`` only; the prefix keys and
  values are constants). The same conventions as ``cost_model.py``.

Per request: ``steps`` updates (``BatchReport.steps``) take one forward and one backward each;
the forward that stops it (MPES, loss cut-off or step limit) takes a forward only, so
``steps + 1`` forwards. Not counted: the once-per-batch prefix and ``l_m`` passes, the backward
of a stopped request's rows in the step it leaves (zero gradient, at most one per request), and
any value optimisation a value transform runs itself (NAS's anchor): ``seconds_values`` covers
all of them, so the achieved rate is a lower bound of the steps' own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from encore_fast.values.prompts import ValuePrompts

NOT_GATED = ("gpt2", "gptj", "gpt_neox")  # two-matrix MLPs


@dataclass(frozen=True)
class Shape:
    """What the FLOP count reads from a model config."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool = True

    @classmethod
    def of(cls, config: Any) -> Shape:
        """The shape of a Hugging Face config (Llama-style attribute names; GPT-2's mapped)."""
        d, h = config.hidden_size, config.num_attention_heads
        inter = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                 or 4 * d)
        return cls(hidden=d, intermediate=inter, heads=h,
                   kv_heads=getattr(config, "num_key_value_heads", None) or h,
                   head_dim=getattr(config, "head_dim", None) or d // h,
                   vocab=config.vocab_size,
                   gated=getattr(config, "model_type", "") not in NOT_GATED)


@dataclass(frozen=True)
class StepWork:
    """The tokens of one request's value step: ``tokens`` run through the blocks, ``reads`` LM
    head positions, query-key pairs among the step's own tokens and to the fixed prefix."""

    tokens: int
    reads: int
    own_pairs: int
    prefix_pairs: int


def step_flops(shape: Shape, blocks: int, work: StepWork) -> tuple[float, float]:
    """Matmul FLOPs (forward, backward) of one value step over ``work`` through ``blocks``
    decoder blocks and the LM head (conventions in the module docstring)."""
    d, hd = shape.hidden, shape.head_dim
    per_token = (2 * d * hd * (shape.heads + shape.kv_heads) * 2
                 + 2 * d * shape.intermediate * (3 if shape.gated else 2))
    linear = work.tokens * per_token
    pair = 4 * shape.heads * hd
    head = 2 * work.reads * d * shape.vocab
    forward = blocks * (linear + pair * (work.own_pairs + work.prefix_pairs)) + head
    backward = blocks * (linear + pair * (2 * work.own_pairs + work.prefix_pairs)) + head
    return float(forward), float(backward)


def request_work(prompts: ValuePrompts) -> StepWork:
    """One request's :class:`StepWork` from its value prompts, as the fast engine packs them."""
    tokens = own = prefix = 0
    for j, (ids, lk) in enumerate(zip(prompts.input_ids, prompts.lookup, strict=True)):
        n = len(ids) - lk if j < prompts.n_rewrite else 1  # a KL prompt: its read token
        tokens += n
        own += n * (n + 1) // 2
        prefix += n * lk
    reads = prompts.n_rewrite * len(prompts.target_ids) + 1  # targets; one KL position
    return StepWork(tokens, reads, own, prefix)


def value_flops(shape: Shape, blocks: int, works: Sequence[StepWork],
                steps: Sequence[int]) -> tuple[float, float]:
    """(mean FLOPs of one step -- forward and backward -- over the requests, total FLOPs of
    the value optimisation: ``steps[i]`` full steps and one more forward per request)."""
    per_step, total = [], 0.0
    for work, n in zip(works, steps, strict=True):
        fwd, bwd = step_flops(shape, blocks, work)
        per_step.append(fwd + bwd)
        total += n * (fwd + bwd) + fwd
    return sum(per_step) / len(per_step), total


def matmul_ceiling(size: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                   warmup: int = 3, repeats: int = 10) -> float:
    """FLOP/s of a ``size``-square matmul in ``dtype`` on ``device``, on this process's threads:
    the best of ``repeats`` timed runs after ``warmup`` untimed ones."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device=device, dtype=dtype)
            for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best
