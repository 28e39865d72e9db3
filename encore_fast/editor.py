"""The :class:`Editor`: sequential batches of fact edits, with undo, reset, save and load.

Data flows one way (DESIGN.md §6): requests -> validation -> values ``z`` and keys ``K`` (model
work, ``values/``) -> update rule (linear algebra, ``methods/``) -> weights (``kernels``). The
editor owns the sequential state: the per-layer ``S``, the original weights, and the history of
applied low-rank factors, which is what undo, save and load replay.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from encore_fast.config import guess_preset, make_config
from encore_fast.distributed import resolve_group
from encore_fast.edits_file import Base, Batch, check_update, pack_edits, read_edits
from encore_fast.edits_file import read_edits_metadata as read_edits_metadata
from encore_fast.errors import (
    ConfigError,
    EditError,
    EditorConflictError,
    HistoryError,
)
from encore_fast.io import atomic_save
from encore_fast.kernels import apply_lowrank_update_
from encore_fast.methods import LayerState, get_rule
from encore_fast.methods.solver import DirectSolver, WoodburySolver
from encore_fast.models.arch import ArchSpec, ModelView
from encore_fast.models.fingerprint import model_fingerprint, weights_fingerprint
from encore_fast.models.hooks import editing_mode
from encore_fast.models.loading import load_model, prepare_tokenizer
from encore_fast.paths import default_corpus
from encore_fast.requests import (
    EditRequest,
    as_requests,
    encode,
    validate_requests,
)
from encore_fast.stats import check_second_moments, sample_corpus, second_moments
from encore_fast.values.keys import SubjectForwards
from encore_fast.values.prompts import PromptTokens, build_value_prompts
from encore_fast.values.templates import generate_context_templates

ENGINES = ("reference", "fast")
_HOLDERS: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[Editor]] = (
    weakref.WeakKeyDictionary())  # model -> the live editor that edits it


@dataclass
class BatchReport:
    """What one batch did: time, value-optimisation steps, MPES stops, norms per layer."""

    batch_index: int
    n_requests: int
    seconds: float
    steps: list[int]
    mpes_stopped: list[bool]
    weight_norms: dict[int, float]
    delta_norms: dict[int, float]
    seconds_values: float = 0.0
    seconds_update: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


class Editor:
    """Edit facts in a causal LM, batch after batch, with ENCORE, MEMIT or AlphaEdit.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        method: ``"encore"`` (default), ``"memit"``, ``"memit-seq"`` or ``"alphaedit"``.
        preset: ``"auto"`` (from the model's name), a name in ``config.PRESETS``, or None for
            generic Llama3-8B settings at the same relative depth.
        engine: ``"fast"`` (default: batched values, prefix reuse, Woodbury solves) or
            ``"reference"`` (one request at a time, full model, direct float64 solves, as the
            published code); both compute the same edits.
        corpus: text for ``C0`` (iterable of strings, file, or dataset name); default WikiText-2
            from the data folder, else text sampled from the model itself.
        stats: precomputed ``{layer: C0}`` (skips the corpus).
        stats_cache: folder for cached ``C0`` (default ``<cache>/stats``; False disables).
        arch: an :class:`ArchSpec` for architectures that are not detected.
        max_value_tokens: the fast engine's limit on prompt tokens per forward pass of the value
            optimisation; larger batches are optimised in chunks (same result, less memory).
        master_weights: keep an fp32 copy of each edited matrix of a 16-bit model and add the
            updates there, refreshing the model's weight from it (round-to-nearest) after each
            batch, so rounding does not pile up over thousands of edits; undo, reset, save/load
            and the reported norms work on the masters. Default: on for fp16/bf16 models
            (costs 4 bytes per edited weight); no effect on fp32 models.
        process_group: edit data-parallel over the ranks of a ``torch.distributed`` group
            (launched with ``torchrun``): ``C0`` from every rank's share of the corpus, each
            batch's values optimised in shares, rank 0's update applied on every rank, so all
            ranks hold the same weights and state after each batch. ``None`` (default) uses the
            default group when one is initialised with more than one process; ``False``: this
            process alone. Every rank must make the same calls (edit, undo, load, save).
        state_device: where each layer's ``C0``, ``S`` and solver state (float64,
            ``d_in × d_in`` each) live: default the device the layer computes on (for a
            ``device_map`` model, the layer's GPU); a device, or ``{layer: device}``, to put
            them elsewhere (e.g. a GPU with room to spare); keys and residuals go there for the
            solve and the factors come back.
        history: how many of the last batches undo can take back (their factors are kept in
            memory: ``(d_out + 2 d_in) · n`` floats per layer and batch). Older batches are
            folded into a base state (the edited matrices, ``S`` and solver state after them;
            materialised when the first batch is dropped, as large as that state), which
            :meth:`save_edits` writes in their place. ``None``: keep every batch; ``0``: keep
            none and no base (no undo; the smallest memory, what long runs use). Default 100.
        **overrides: any :class:`EditConfig` field (``layers``, ``lambda_p``, ...).

    One editor per model: it owns the edited matrices' history, so a second ``Editor`` on the
    same model object, while the first is alive, raises :class:`EditorConflictError` (two
    would silently undo each other's edits); :meth:`release` the first, or edit a copy.
    Each batch is all-or-nothing: if anything fails, the model, ``S``, solver state and
    history are as before the batch (:class:`EditError` names the layer and why).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        method: str = "encore",
        preset: str | None = "auto",
        *,
        engine: str = "fast",
        corpus: Any = None,
        stats: Mapping[int, torch.Tensor] | None = None,
        stats_cache: str | os.PathLike | bool | None = None,
        arch: ArchSpec | None = None,
        model_name: str | None = None,
        progress: bool = True,
        max_value_tokens: int = 8192,
        master_weights: bool | None = None,
        process_group: Any = None,
        state_device: str | torch.device | Mapping[int, str | torch.device] | None = None,
        history: int | None = 100,
        **overrides: Any,
    ) -> None:
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        if not isinstance(max_value_tokens, int) or max_value_tokens < 1:
            raise ConfigError(f"max_value_tokens must be an integer >= 1, got {max_value_tokens!r}")
        _check_history(history)
        holder = _HOLDERS.get(model)
        if holder is not None and holder() is not None:
            raise EditorConflictError(
                "this model object is already edited by another live Editor (it holds the "
                "history and sequential state, so two would silently undo each other's "
                "edits); use that editor, call its release(), or edit copy.deepcopy(model)")
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.view = ModelView(model, arch)
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or "model")
        if preset == "auto":
            preset = guess_preset(self.model_name)
        self.preset = preset
        self.method = method
        self.hparams = make_config(method, preset, self.view.num_layers, **overrides)
        self.rule = get_rule(method)
        self.engine = engine
        self.corpus = corpus
        self.stats_cache = stats_cache
        self.group = resolve_group(process_group)
        self.state_device = _checked_state_device(state_device)
        self.progress = progress and (self.group is None or self.group.is_main)
        self.max_value_tokens = max_value_tokens
        self.fingerprint = model_fingerprint(model)
        self._weights_fingerprint: str | None = None
        self._given_stats = self._check_given_stats(stats) if stats is not None else None
        self._states: dict[int, LayerState] | None = None
        self._contexts: list[str] | None = None
        self._original = {l: self.view.weight(l).detach().clone() for l in self.hparams.layers}
        half = self.view.dtype in (torch.float16, torch.bfloat16)
        self.master_weights = half and (master_weights is None or bool(master_weights))
        self._masters: dict[int, torch.Tensor] = {
            l: w0.float() for l, w0 in self._original.items()} if self.master_weights else {}
        self._history: list[Batch] = []  # the batches undo can reach (the last ones)
        self._dropped: list[list[EditRequest]] = []  # requests of the batches before them
        self._base: Base | None = None  # the state after those (None: original, or history=0)
        self._history_limit = history
        self._solvers: dict[int, DirectSolver | WoodburySolver] = {}
        self._released = False
        _HOLDERS[model] = weakref.ref(self)

    def release(self) -> None:
        """Let another :class:`Editor` take this model (its weights stay as they are); this
        editor refuses to edit, undo, reset or load afterwards."""
        holder = _HOLDERS.get(self.model)
        if holder is not None and holder() is self:
            del _HOLDERS[self.model]
        self._released = True

    def _check_held(self, action: str) -> None:
        if self._released:
            raise EditorConflictError(f"cannot {action}: this editor was released")

    def _check_given_stats(self, stats: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """User-given ``C0``: every edited layer present, each one finite, symmetric, of the
        layer's shape (checked here, before anything uses it)."""
        if not isinstance(stats, Mapping):
            raise ConfigError(f"stats must be a mapping layer -> C0, got {type(stats).__name__}")
        missing = [l for l in self.hparams.layers if l not in stats]
        if missing and stats:
            raise ConfigError(f"stats given for layers {sorted(stats)}, missing {missing}")
        return {l: check_second_moments(c, l, self.view.d_in(l), "stats= given to the Editor")
                for l, c in stats.items() if l in self.hparams.layers}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        method: str = "encore",
        preset: str | None = "auto",
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> Editor:
        """Load a model (hub name, local path, or None for the bundled SmolLM2-135M) and wrap it."""
        model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
        name = "smollm2-135m" if name_or_path is None else str(name_or_path)
        kwargs.setdefault("model_name", name)
        return cls(model, tokenizer, method, preset, **kwargs)

    # ------------------------------------------------------------------ properties

    @property
    def num_batches(self) -> int:
        """Batches applied so far (also those the bounded history no longer keeps)."""
        return len(self._dropped) + len(self._history)

    @property
    def num_edits(self) -> int:
        return sum(map(len, self._dropped)) + sum(len(b.requests) for b in self._history)

    @property
    def requests(self) -> list[EditRequest]:
        """All requests applied so far, in order."""
        return [r for b in self._dropped for r in b] + [
            r for b in self._history for r in b.requests]

    @property
    def history(self) -> int | None:
        """How many of the last batches undo can take back (``None``: all); setting a smaller
        value drops the older ones now."""
        return self._history_limit

    @history.setter
    def history(self, value: int | None) -> None:
        _check_history(value)
        self._history_limit = value
        self._trim_history()

    @property
    def context_templates(self) -> list[str]:
        """``["{}"]`` + generated prefixes: made once per editor from the unedited model (before
        its first edit or load) and saved with the edits, so that a loaded or resumed run goes
        on with the very same prefixes."""
        if self._contexts is None:
            if self.num_batches:
                raise RuntimeError("context templates must be made from the unedited model")
            with editing_mode(self.model):
                self._contexts = generate_context_templates(
                    self.model, self.tokenizer, words=self.hparams.context_words,
                    length=self.hparams.context_length, seed=self.hparams.context_seed)
            if self.group is not None:  # (seeded, but sampling may differ across devices)
                self._contexts = self.group.broadcast(self._contexts, "context templates")
        return self._contexts

    def weight_norms(self) -> dict[int, float]:
        """Current ‖W‖_F of every edited matrix (of its fp32 master, when there is one)."""
        return {l: float(self.edited_weight(l).detach().float().norm())
                for l in self.hparams.layers}

    def edited_weight(self, layer: int) -> torch.Tensor:
        """The edited matrix of ``layer`` as the editor accumulates it: the fp32 master of a
        16-bit model (the model holds it rounded), else the model's weight itself."""
        return self._masters.get(layer, self.view.weight(layer))

    def layer_states(self) -> dict[int, LayerState]:
        """Per-layer ``C0`` (computed or loaded on first use, from the original model) and ``S``."""
        if self._states is None:
            c0 = self._given_stats or self._compute_stats()
            missing = [l for l in self.hparams.layers if l not in c0]
            if missing:
                raise ConfigError(f"stats given for layers {sorted(c0)}, missing {missing}")
            self._states = {
                l: LayerState(c0=c0[l].to(self._state_device(l), torch.float64))
                for l in self.hparams.layers
            }
        return self._states

    def _state_device(self, layer: int) -> torch.device:
        """Where ``layer``'s ``C0``, ``S`` and solver state live (see ``state_device``)."""
        chosen = self.state_device
        if isinstance(chosen, Mapping):
            chosen = chosen.get(layer)
        return torch.device(chosen) if chosen is not None else self.view.layer_device(layer)

    def _compute_stats(self) -> dict[int, torch.Tensor]:
        if self.num_batches:
            raise RuntimeError("statistics must be computed on the original model; reset() first")
        corpus = self.corpus if self.corpus is not None else default_corpus()
        if corpus is None:
            corpus = sample_corpus(self.model, self.tokenizer)
        cache = self.stats_cache
        if self._weights_fingerprint is None:
            self._weights_fingerprint = weights_fingerprint(self.model)
        with editing_mode(self.model):
            c0 = second_moments(
                self.view, self.tokenizer, self.hparams.layers, corpus,
                n_samples=self.hparams.stats_samples, max_length=self.hparams.stats_max_length,
                fingerprint=self.fingerprint, model_name=self.model_name,
                cache=None if cache is True else cache, progress=self.progress,
                weights_fingerprint=self._weights_fingerprint, group=self.group,
            )
        for layer, c in c0.items():
            check_second_moments(c, layer, self.view.d_in(layer), "C0 computed from the corpus")
        return c0

    # ------------------------------------------------------------------ editing

    def edit(
        self,
        requests: Iterable[EditRequest | Mapping[str, Any]],
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> list[BatchReport]:
        """Apply ``requests`` in batches of ``batch_size`` (default ``hparams.batch_size``),
        one after another on the model as edited so far.

        All requests are validated first; a bad one raises :class:`RequestError` before any
        weight changes. Each batch is a transaction: if it fails (:class:`EditError`, or an
        interrupt), the model and the editor are as before that batch; the batches before it
        in this call stay applied. Runs with the model in eval mode (its mode is restored).
        """
        self._check_held("edit")
        reqs = as_requests(requests)
        bs = self.hparams.batch_size if batch_size is None else batch_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {bs!r}")
        if not reqs:
            return []
        progress = self.progress if progress is None else progress
        with editing_mode(self.model):
            validate_requests(reqs, self.tokenizer, self._max_request_length(), bs)
            self.layer_states()
            reports = []
            bar = tqdm(total=len(reqs), desc=f"{self.method} edits", unit="edit",
                       disable=not progress)
            try:
                for s in range(0, len(reqs), bs):
                    reports.append(self._edit_batch(reqs[s : s + bs], bar))
            finally:
                bar.close()
        return reports

    def _max_request_length(self) -> int:
        """Tokens a request's prompt + target may use, leaving room for the longest prefix."""
        limit = self.hparams.max_prompt_length
        model_max = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        if model_max:
            limit = min(limit, int(model_max))
        prefix = max(len(encode(self.tokenizer, c.replace("{}", ""))) for c in
                     self.context_templates)
        return limit - prefix

    def _edit_batch(self, reqs: list[EditRequest], bar: Any) -> BatchReport:
        """Values, then every layer's update (applied, as the next layer's keys need it), then
        ``S`` and the solvers; on any failure the applied layers are put back."""
        t0 = time.perf_counter()
        tokens = PromptTokens(self.tokenizer)  # (value prompts and key passes share them)
        values = self._shared_values(reqs, bar, tokens)
        zs = self._checked_values(reqs, values)
        t1 = time.perf_counter()
        if self.group is None:
            batch, keys64, w_norms, d_norms = self._update_layers(reqs, zs, tokens)
        else:
            batch, keys64, w_norms, d_norms = self._update_from_main(reqs, zs, tokens)
        self._commit(batch, keys64, solved=self.group is None or self.group.is_main)
        t2 = time.perf_counter()
        return BatchReport(
            batch_index=self.num_batches - 1, n_requests=len(reqs), seconds=t2 - t0,
            steps=[v.updates for v in values], mpes_stopped=[v.mpes_stopped for v in values],
            weight_norms=w_norms, delta_norms=d_norms, seconds_values=t1 - t0,
            seconds_update=t2 - t1,
        )

    def _shared_values(self, reqs: list[EditRequest], bar: Any,
                       tokens: PromptTokens) -> list[Any]:
        """The values of all ``reqs``: in one process, or each rank its share, then gathered
        (every rank gets all of them, in request order, on its own device)."""
        group = self.group
        if group is None:
            return self._optimize_values(reqs, bar, tokens)
        mine: list[Any] = []
        error = None
        try:
            share = reqs[group.share(len(reqs))]
            mine = self._optimize_values(share, bar, tokens) if share else []
        except Exception as exc:  # told to the other ranks, then raised here too
            error = exc
        what = f"batch {self.num_batches}: value optimisation"
        group.agree(error, what)
        parts = group.gather([replace(v, z=v.z.cpu(), h0=v.h0.cpu()) for v in mine], what)
        if bar is not None:
            bar.update(len(reqs) - len(mine))
        dev = self.view.device
        return [replace(v, z=v.z.to(dev), h0=v.h0.to(dev)) for part in parts for v in part]

    def _update_from_main(self, reqs: list[EditRequest], zs: torch.Tensor,
                          tokens: PromptTokens) -> tuple[
            Batch, dict[int, torch.Tensor], dict[int, float], dict[int, float]]:
        """Rank 0 solves and applies the batch's update, then sends its factors; the other
        ranks apply those very factors (so every rank's weights stay bit-identical)."""
        group = self.group
        assert group is not None
        what = f"batch {self.num_batches}: the update"
        if group.is_main:
            try:
                batch, keys64, w_norms, d_norms = self._update_layers(reqs, zs, tokens)
            except Exception as exc:
                group.broadcast(("error", f"{type(exc).__name__}: {exc}"), what)
                raise
            group.broadcast(("ok", (batch.factors, w_norms, d_norms)), what)
            return batch, keys64, w_norms, d_norms
        status, payload = group.broadcast(None, what)
        if status == "error":
            raise EditError(f"rank {group.rank}: {what} failed on rank 0 (nothing was changed "
                            f"on any rank): {payload}")
        factors, w_norms, d_norms = payload
        batch = Batch(requests=list(reqs), factors=factors)
        return batch, self._apply_factors(batch), w_norms, d_norms

    def _apply_factors(self, batch: Batch) -> dict[int, torch.Tensor]:
        """Apply a batch's saved factors to the weights (no solve); its keys for the fold."""
        states = self.layer_states()
        keys64 = {}
        for layer, (u, v, k) in batch.factors.items():
            self._apply(layer, u, v)
            keys64[layer] = k.to(states[layer].c0.device).double()
        return keys64

    def _optimize_values(self, reqs: list[EditRequest], bar: Any,
                         tokens: PromptTokens) -> list[Any]:
        """The target value ``z`` of every request (changes no weight)."""
        cfg, contexts = self.hparams, self.context_templates
        prompts = [build_value_prompts(self.tokenizer, r, contexts, tokens) for r in reqs]
        if self.engine == "fast":
            from encore_fast.values.fast import optimize_values

            return optimize_values(self.view, self.tokenizer, prompts, cfg.layers[-1], cfg,
                                   progress=bar, max_tokens=self.max_value_tokens)
        from encore_fast.values.reference import optimize_values as reference_values

        return reference_values(self.view, self.tokenizer, prompts, cfg.layers[-1], cfg,
                                progress=bar)

    def _checked_values(self, reqs: list[EditRequest], values: list[Any]) -> torch.Tensor:
        """Stack the values; non-finite ones are an error, suspicious ones a warning."""
        batch = self.num_batches
        bad = [i for i, v in enumerate(values) if not bool(torch.isfinite(v.z).all())]
        if bad:
            names = "; ".join(reqs[i].describe() for i in bad[:3])
            raise EditError(
                f"batch {batch}: the target value of {len(bad)} request(s) is not finite "
                f"({names}): NaN/inf in the value optimisation (a 16-bit model overflowing?); "
                "nothing was changed")
        stuck = [(i, v.zero_grad_updates) for i, v in enumerate(values)
                 if getattr(v, "zero_grad_updates", 0)]
        if stuck:
            names = "; ".join(f"{reqs[i].describe()}: {k} of {values[i].updates}"
                              for i, k in stuck[:3])
            why = ("16-bit gradients underflowing: edit in float32, or in bf16, whose range "
                   "is wider than fp16's" if self.view.dtype in (torch.float16, torch.bfloat16)
                   else "the loss does not depend on δ there (e.g. constant logits)")
            warnings.warn(
                f"batch {batch}: the gradient of δ was exactly zero in some optimiser steps "
                f"({names}), so δ did not move there although the report counts the steps; "
                f"likely cause: {why}", stacklevel=4)
        known = [i for i, v in enumerate(values) if v.correct_history and v.correct_history[0]]
        if known:
            names = "; ".join(reqs[i].describe() for i in known[:3])
            warnings.warn(
                f"batch {batch}: {len(known)} request(s) already predict their target on every "
                f"context-prefixed prompt before the edit ({names}); edited anyway (their keys "
                "still enter the update and S)", stacklevel=4)
        return torch.stack([v.z for v in values])

    def _update_layers(self, reqs: list[EditRequest], zs: torch.Tensor,
                       tokens: PromptTokens | None = None) -> tuple[
            Batch, dict[int, torch.Tensor], dict[int, float], dict[int, float]]:
        """Solve and apply each layer's update in turn; roll all of them back on failure."""
        cfg, view = self.hparams, self.view
        z_layer = cfg.layers[-1]
        batch = Batch(requests=list(reqs))
        keys64: dict[int, torch.Tensor] = {}
        w_norms, d_norms = {}, {}
        backups: dict[int, torch.Tensor] = {}
        had_solvers = set(self._solvers)
        layer = cfg.layers[0]
        try:
            fwd = SubjectForwards(view, self.tokenizer, reqs, self.context_templates,
                                  reuse_below=cfg.layers[0] if self.engine == "fast" else None,
                                  tokens=tokens)
            for i, layer in enumerate(cfg.layers):
                fwd.freeze_below(layer)  # the layers before it are final for this batch
                keys = fwd.keys(layer)
                cur = fwd.block_outputs(z_layer)
                resid = (zs.to(cur.device) - cur) / (len(cfg.layers) - i)
                sdev = self.layer_states()[layer].c0.device  # (keys go to the state)
                k64 = keys.T.contiguous().double().to(sdev)  # the layout replay reads back
                v = self._solver(layer).solve(k64, resid.T.double().to(sdev))
                u32, v32 = resid.T.contiguous(), v.float().contiguous()
                check_update(layer, keys, u32, v32, tuple(view.weight(layer).shape),
                              view.arch.transposed)
                backups[layer] = self.edited_weight(layer).detach().clone()
                w_norms[layer], d_norms[layer] = self._apply(layer, u32, v32)
                if not (math.isfinite(w_norms[layer]) and math.isfinite(d_norms[layer])):
                    raise EditError(f"layer {layer}: the edited weights are not finite "
                                    f"(‖W‖ = {w_norms[layer]}): the update overflows the "
                                    f"model's {view.dtype_name}")
                keys64[layer] = k64
                batch.factors[layer] = (u32.cpu(), v32.cpu(), keys.T.contiguous().cpu())
        except BaseException as exc:
            with torch.no_grad():
                for l, w in backups.items():  # (model weight = master rounded, as before)
                    if l in self._masters:
                        self._masters[l].copy_(w)
                    view.weight(l).data.copy_(w)
            for solver in self._solvers.values():
                solver.discard()
            self._solvers = {l: sv for l, sv in self._solvers.items() if l in had_solvers}
            where = f"batch {self.num_batches}, layer {layer}"
            if isinstance(exc, torch.linalg.LinAlgError):
                raise EditError(
                    f"{where}: the update's linear system could not be solved ({exc}); C0 or "
                    "lambda_p / lambda_n / alpha may be wrong; the batch was rolled back, "
                    "nothing was changed") from exc
            if isinstance(exc, EditError):
                raise EditError(f"{where}: {exc}; the batch was rolled back, nothing was "
                                "changed") from exc
            raise
        return batch, keys64, w_norms, d_norms

    def _commit(self, batch: Batch, keys64: Mapping[int, torch.Tensor], solved: bool) -> None:
        """Fold a batch whose weights are applied into ``S`` and the solvers, record it.
        ``solved``: the solvers hold this batch from :meth:`_update_layers` (else, in a
        replay, they fold the keys themselves: the same operations on the same inputs)."""
        for layer, k64 in keys64.items():
            solver = self._solver(layer)
            if solved:
                solver.commit(k64)
            else:
                solver.fold(k64)
        self._history.append(batch)
        self._trim_history()

    def _trim_history(self) -> None:
        """Drop the batches past the ``history`` window, folding them into the base."""
        limit = self._history_limit
        if limit is None:
            return
        while len(self._history) > limit:
            batch = self._history.pop(0)
            self._dropped.append(batch.requests)
            if limit > 0:
                self._fold_into_base(batch)
        if limit == 0:
            self._base = None  # nothing to go back to: the live state is all there is

    def _fold_into_base(self, batch: Batch) -> None:
        """Advance the base by one batch: the same operations as when it was applied."""
        if self._base is None:
            states = {l: LayerState(c0=st.c0) for l, st in self.layer_states().items()}
            self._base = Base(
                weights={l: (w0.float() if l in self._masters else w0.clone())
                         for l, w0 in self._original.items()},
                states=states,
                solvers={l: self._make_solver(l, st) for l, st in states.items()})
        base = self._base
        with torch.no_grad():
            for layer, (u, v, k) in batch.factors.items():
                w = base.weights[layer]
                apply_lowrank_update_(w, u.to(w.device), v.to(w.device),
                                      transposed=self.view.arch.transposed)
                base.solvers[layer].fold(k.to(base.states[layer].c0.device).double())

    def _restore_base(self) -> None:
        """Weights, ``S`` and solvers := the base (the original model when there is none)."""
        base = self._base
        if base is None:
            if self._dropped:
                raise HistoryError("the batches before the kept history were not kept "
                                   "(history=0): there is no state to go back to")
            self._restore_original()
            return
        states = self.layer_states()
        with torch.no_grad():
            for layer, w in base.weights.items():
                if layer in self._masters:
                    self._masters[layer].copy_(w)
                self.view.weight(layer).data.copy_(w)  # (a master rounded, as the kernel does)
                st = base.states[layer]
                states[layer].s = None if st.s is None else st.s.clone()
                self._solvers[layer] = base.solvers[layer].copy(states[layer])

    @torch.no_grad()
    def _apply(self, layer: int, u: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
        """``W += U Vᵀ`` through the kernel dispatch: in the weight's own dtype, or, with a
        master, in fp32 on the master, writing the model's weight rounded in the same pass."""
        w = self.view.weight(layer)
        dev = w.device
        master = self._masters.get(layer)
        if master is None:
            norms = apply_lowrank_update_(w.data, u.to(dev), v.to(dev),
                                          transposed=self.view.arch.transposed)
        else:
            norms = apply_lowrank_update_(master, u.to(dev), v.to(dev),
                                          transposed=self.view.arch.transposed, out=w.data)
        return float(norms[0]), float(norms[1])

    # ------------------------------------------------------------------ history

    def reset(self) -> None:
        """Restore the original weights and forget all edits and sequential state."""
        self._check_held("reset")
        self._restore_original()
        self._history.clear()
        self._dropped.clear()
        self._base = None

    def _restore_original(self) -> None:
        with torch.no_grad():
            for layer, w0 in self._original.items():
                self.view.weight(layer).data.copy_(w0)
                if layer in self._masters:
                    self._masters[layer].copy_(w0)
        if self._states is not None:
            for st in self._states.values():
                st.s = None
        self._solvers = {}

    def undo(self) -> list[EditRequest]:
        """Take back the last batch (weights, sequential and solver state); returns its
        requests. The editor is then exactly as if the last batch had never been applied."""
        self._check_held("undo")
        if not self._history:
            if self._dropped:
                raise HistoryError(
                    f"cannot undo batch {self.num_batches - 1}: this editor keeps the last "
                    f"{self._history_limit} batch(es) (history={self._history_limit}) and has "
                    "already taken back those; the earlier batches are folded into its state "
                    "(reset() goes back to the original model)")
            raise RuntimeError("nothing to undo: no batch has been applied")
        kept = self._history[:-1]
        last = self._history[-1]
        self._replay(kept)
        return last.requests

    def _replay(self, batches: list[Batch]) -> None:
        """Set weights, ``S`` and solver state to the base (or the original) + the given
        batches, applied in order: the same operations on the same inputs as when they were
        first applied, so the result is bit-for-bit that of the editor that applied them."""
        self._restore_base()
        self._history = []
        for layer in self.hparams.layers:
            self._solver(layer)  # (no base: made from S = 0, as before a first batch)
        for batch in batches:
            self._commit(batch, self._apply_factors(batch), solved=False)

    def _solver(self, layer: int) -> DirectSolver | WoodburySolver:
        """The solver of ``layer``: Woodbury (fast engine, built from ``C0`` and ``S``) or the
        rule's direct float64 solve (reference engine)."""
        if layer not in self._solvers:
            self._solvers[layer] = self._make_solver(layer, self.layer_states()[layer])
        return self._solvers[layer]

    def _make_solver(self, layer: int, state: LayerState) -> DirectSolver | WoodburySolver:
        """A fresh solver over ``state`` (see :meth:`_solver`)."""
        solver: DirectSolver | WoodburySolver | None = None
        if self.engine == "fast":
            try:
                solver = WoodburySolver(self.rule, state, self.hparams)
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                if isinstance(exc, torch.linalg.LinAlgError) or (
                        type(exc) is RuntimeError and "allocate" not in str(exc)):
                    raise  # CPU allocation failures are RuntimeErrors; nothing else is ours

                d = state.c0.shape[0]
                warnings.warn(
                    f"layer {layer}: the Woodbury solver's float64 {d}x{d} inverse "
                    f"({d * d * 8 / 2**30:.2f} GiB) does not fit on {state.c0.device} "
                    f"({type(exc).__name__}); solving the full system each batch instead "
                    "(same result, slower)", stacklevel=3)
        return solver or DirectSolver(self.rule, state, self.hparams)

    # ------------------------------------------------------------------ save / load

    def save_edits(self, path: str | os.PathLike,
                   metadata: Mapping[str, Any] | None = None) -> Path:
        """Write all applied batches (low-rank factors, keys, requests, settings, context
        templates, a checksum) to a safetensors file, atomically; the batches the bounded
        history dropped are written as the state after them (``encore_fast.edits_file``), so
        the file of a long run with ``history=0`` is one state, not every batch. Load it with
        :meth:`load_edits` on the same model. ``metadata``: JSON-able extras stored with
        it (read back by :func:`read_edits_metadata`). Under a process group, rank 0 writes
        the file (the others wait for it, and raise if it fails)."""
        meta = {
            "method": self.method,
            "model_name": self.model_name,
            "model_fingerprint": self.fingerprint,
            "config": json.dumps(self.hparams.to_dict()),
            "contexts": json.dumps(self.context_templates),
            "extra": json.dumps(dict(metadata or {})),
        }
        tensors = pack_edits(meta, self._history, self._dropped, self._saved_base())
        if self.group is None:
            return atomic_save(path, tensors, meta)
        error = None  # under a process group rank 0 writes, the others learn how it went
        try:
            if self.group.is_main:
                atomic_save(path, tensors, meta)
        except Exception as exc:
            error = exc
        self.group.agree(error, f"saving the edits to {path}")
        return Path(path)

    def load_edits(self, path: str | os.PathLike) -> int:
        """Apply the batches saved in ``path`` to this (unedited) editor's model; returns the
        number of batches. The model, ``S`` and solver state are then bit-for-bit those of
        the editor that saved the file, and its context templates are used from then on.
        Refuses (:class:`EditsFileError`, naming the file, nothing changed) a file that is
        unreadable, damaged (checksum), or made for another model, method or layers."""
        self._check_held("load edits")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no edits file at {path}")
        if self.num_batches:
            raise RuntimeError(f"cannot load {path}: this editor already has "
                               f"{self.num_batches} batch(es); call reset() first")
        saved = read_edits(path, self)
        if saved.contexts is not None:
            self._contexts = saved.contexts
        else:
            self.context_templates  # noqa: B018  (files before contexts were saved: make them now)
        with editing_mode(self.model):
            states = self.layer_states()  # (C0 from the original model, before any change)
            if saved.dropped:
                self._base = self._base_from_file(saved, states)
                self._dropped = list(saved.dropped)
            try:
                self._replay(saved.batches)
            except BaseException:
                self.reset()
                raise
            self._trim_history()
        return self.num_batches

    def _saved_base(self) -> Base | None:
        """The state save_edits writes for the dropped batches (history=0: the live one)."""
        if not self._dropped:
            return None
        if self._base is not None:
            return self._base
        return Base(weights={l: self.edited_weight(l) for l in self.hparams.layers},
                    states=self.layer_states(), solvers=self._solvers)

    def _base_from_file(self, saved: Any, states: Mapping[int, LayerState]) -> Base:
        """The base of a loaded file on this editor's devices and dtypes (its solvers as
        saved, or made from its ``S`` when the file has no inverse, e.g. reference runs)."""
        weights, bstates, solvers = {}, {}, {}
        for layer, entry in saved.base.items():
            edited = self.edited_weight(layer)
            weights[layer] = entry["W"].to(edited.device, edited.dtype).clone()
            sdev = states[layer].c0.device
            st = LayerState(c0=states[layer].c0)
            if "S" in entry:
                st.s = entry["S"].to(sdev, torch.float64).clone()
            bstates[layer] = st
            if self.engine == "fast" and "inv" in entry and layer in saved.counters:
                done, refact = saved.counters[layer]
                solvers[layer] = WoodburySolver(
                    self.rule, st, self.hparams, inv=entry["inv"].to(sdev, torch.float64).clone(),
                    batches=done, refactorisations=refact)
            else:
                solvers[layer] = self._make_solver(layer, st)
        return Base(weights=weights, states=bstates, solvers=solvers)


    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The ``metadata`` extras that :meth:`save_edits` stored in ``path``."""
        return read_edits_metadata(path)


def _check_history(history: Any) -> None:
    if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                or history < 0):
        raise ConfigError(f"history must be None or an integer >= 0, got {history!r}")


def _checked_state_device(chosen: Any) -> Any:
    """``state_device`` as given, once every device in it is one torch knows."""
    items = chosen.items() if isinstance(chosen, Mapping) else [(None, chosen)]
    for layer, dev in items:
        if dev is None:
            continue
        try:
            torch.device(dev)
        except (RuntimeError, TypeError) as exc:
            where = "state_device" if layer is None else f"state_device[{layer}]"
            raise ConfigError(f"{where} = {dev!r} is not a device ({exc})") from None
    return chosen
