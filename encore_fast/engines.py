"""The two engines, each one object: how values are optimised, which solver a layer gets, and
whether the key passes reuse the blocks below the first edited layer.

Both compute the same edits (docs/design.md §4). The reference engine follows the published code:
one request at a time through the whole model, a direct float64 solve of the full system per
batch. The fast engine optimises a batch's values together (packed, prefix reuse), keeps a
Woodbury inverse per layer, and runs the blocks below the first edited layer once per batch.
The editor picks its engine once, by name, with :func:`make_engine`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from encore_fast.batch_report import checked_values
from encore_fast.config import EditConfig
from encore_fast.errors import ConfigError
from encore_fast.methods import LayerState, UpdateRule, ValueContext
from encore_fast.methods.solver import DirectSolver, WoodburySolver
from encore_fast.models.arch import ModelView
from encore_fast.paths import cache_dir
from encore_fast.requests import EditRequest
from encore_fast.sharing import shared_values
from encore_fast.values import reference
from encore_fast.values.objective import ValueResult
from encore_fast.values.prompts import PromptTokens, ValuePrompts, build_value_prompts

ENGINES = ("reference", "fast")

Solver = DirectSolver | WoodburySolver
# a saved Woodbury inverse and its counters (batches, refactorisations)
SavedInverse = tuple[torch.Tensor, tuple[int, int]]


class Engine:
    """What differs between the engines; the defaults are the reference engine's."""

    name = ""

    def values(self, view: ModelView, tokenizer: Any, reqs: Sequence[EditRequest],
               contexts: list[str], tokens: PromptTokens, cfg: EditConfig,
               progress: Any = None) -> list[ValueResult]:
        """The target value ``z`` of every request, from its context-prefixed prompts
        (changes no weight)."""
        prompts = [build_value_prompts(tokenizer, r, contexts, tokens) for r in reqs]
        return self.optimize_values(view, tokenizer, prompts, cfg.layers[-1], cfg,
                                    progress=progress)

    def optimize_values(self, view: ModelView, tokenizer: Any, prompts: Sequence[ValuePrompts],
                        layer: int, cfg: EditConfig, progress: Any = None) -> list[ValueResult]:
        """The target value ``z`` of every request, ``layer`` being the last edited one."""
        raise NotImplementedError

    def batch_values(self, editor: Any, reqs: Sequence[EditRequest], tokens: PromptTokens,
                     bar: Any) -> tuple[list[ValueResult], torch.Tensor | None]:
        """``editor``'s batch: every request's optimised value (shared out over the ranks),
        checked, then through the method's value transforms: the values and ``z`` ``[n, d]``;
        nothing (no values, no ``z``) for a rule without value optimisation (UltraEdit)."""
        if editor.rule.direct:
            return [], None
        values = shared_values(editor.group, list(reqs), lambda share: self.values(
            editor.view, editor.tokenizer, share, editor.context_templates, tokens,
            editor.hparams, bar), bar, f"batch {editor.num_batches}: value optimisation",
            editor.view.device)
        zs = checked_values(list(reqs), values, editor.num_batches, editor.view.dtype)
        return values, editor.parts.transform_values(
            zs, lambda: self.context(editor, reqs, values))

    def context(self, editor: Any, reqs: Sequence[EditRequest],
                values: Sequence[ValueResult]) -> ValueContext:
        """What a value transform reads about ``editor``'s batch (:class:`ValueContext`),
        with this engine's value optimisation for the statistics it computes once."""
        view, tok, cfg = editor.view, editor.tokenizer, editor.hparams

        def optimize(rs: Sequence[EditRequest], contexts: list[str],
                     settings: EditConfig) -> list[ValueResult]:
            return self.values(view, tok, rs, contexts, PromptTokens(tok), settings)

        cache = editor.stats_cache  # (False: none; None or True: the default cache; a folder)
        where = None if cache is False else cache_dir() if cache is None or cache is True \
            else Path(cache)
        return ValueContext(view, tok, reqs, values, cfg, optimize, editor.fingerprint, where,
                            editor.num_batches > 0, editor.progress)

    def reuse_below(self, layers: Sequence[int]) -> int | None:
        """Below which block the key passes may reuse outputs within a batch (None: never)."""
        return None

    def solver(self, rule: UpdateRule, layer: int, state: LayerState, cfg: EditConfig,
               saved: SavedInverse | None = None) -> Solver:
        """A fresh solver of ``layer`` over ``state`` (a saved inverse is of no use here)."""
        return DirectSolver(rule, state, cfg)


class ReferenceEngine(Engine):
    """One request at a time, the whole model, the rule's direct float64 solve."""

    name = "reference"

    def optimize_values(self, view: ModelView, tokenizer: Any, prompts: Sequence[ValuePrompts],
                        layer: int, cfg: EditConfig, progress: Any = None) -> list[ValueResult]:
        """The target value ``z`` of every request, ``layer`` being the last edited one."""
        return reference.optimize_values(view, tokenizer, prompts, layer, cfg,
                                         progress=progress)


class FastEngine(Engine):
    """Batched values in chunks of at most ``max_tokens`` prompt tokens, Woodbury solves, the
    blocks below the first edited layer run once per batch."""

    name = "fast"

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def optimize_values(self, view: ModelView, tokenizer: Any, prompts: Sequence[ValuePrompts],
                        layer: int, cfg: EditConfig, progress: Any = None) -> list[ValueResult]:
        """The target value ``z`` of every request, ``layer`` being the last edited one."""
        # (here, not at the top: values.fast imports transformers' attention registry, which
        # would triple the time ``import encore_fast`` takes)
        from encore_fast.values import fast

        return fast.optimize_values(view, tokenizer, prompts, layer, cfg, progress=progress,
                                    max_tokens=self.max_tokens)

    def reuse_below(self, layers: Sequence[int]) -> int | None:
        """The first edited layer: the blocks below it do not change while a batch is applied."""
        return layers[0]

    def solver(self, rule: UpdateRule, layer: int, state: LayerState, cfg: EditConfig,
               saved: SavedInverse | None = None) -> Solver:
        """A Woodbury solver over ``state`` (from ``saved``, its inverse and counters, when
        given); the direct solve, with a warning, when the inverse does not fit in memory,
        and for rules that are no fixed system (``rule.woodbury`` false)."""
        if not rule.woodbury:
            return DirectSolver(rule, state, cfg)
        if saved is not None:
            inv, (done, refact) = saved
            return WoodburySolver(rule, state, cfg,
                                  inv=inv.to(state.c0.device, torch.float64).clone(),
                                  batches=done, refactorisations=refact)
        try:
            return WoodburySolver(rule, state, cfg)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            if isinstance(exc, torch.linalg.LinAlgError) or (
                    type(exc) is RuntimeError and "allocate" not in str(exc)):
                raise  # CPU allocation failures are RuntimeErrors; nothing else is ours

            d = state.c0.shape[0]
            warnings.warn(
                f"layer {layer}: the Woodbury solver's float64 {d}x{d} inverse "
                f"({d * d * 8 / 2**30:.2f} GiB) does not fit on {state.c0.device} "
                f"({type(exc).__name__}); solving the full system each batch instead "
                "(same result, slower)", stacklevel=4)
        return DirectSolver(rule, state, cfg)


def make_engine(name: str, max_value_tokens: int) -> Engine:
    """The engine called ``name`` (one of :data:`ENGINES`); ``max_value_tokens`` is the fast
    engine's limit on prompt tokens per forward pass of the value optimisation."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {ENGINES}")
    if not isinstance(max_value_tokens, int) or max_value_tokens < 1:
        raise ConfigError(f"max_value_tokens must be an integer >= 1, got {max_value_tokens!r}")
    makers: dict[str, Callable[[], Engine]] = {
        "reference": ReferenceEngine, "fast": lambda: FastEngine(max_value_tokens)}
    return makers[name]()
