"""The :class:`Editor`: sequential batches of fact edits, with undo, reset, save and load.

It runs the pipeline requests -> values ``z`` and keys ``K`` (``values/``) -> update rule
(``methods/``) -> weights (``kernels``) and owns the sequential state; what differs between the
engines, the history, the ranks, ``C0``, the contexts and a batch's checks have their own modules
(``engines``, ``history``, ``sharing``, ``layer_states``, ``contexts``, ``batch_report``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from encore_fast import layer_states as lstates
from encore_fast.batch_report import BatchReport as BatchReport
from encore_fast.batch_report import (
    check_norms,
    checked_batch_size,
    rolled_back_error,
)
from encore_fast.config import guess_preset, make_config
from encore_fast.contexts import make_context_templates, max_request_length
from encore_fast.distributed import resolve_group
from encore_fast.edits_file import Batch, check_update, edits_header, read_edits
from encore_fast.edits_file import read_edits_metadata as read_edits_metadata
from encore_fast.engines import ENGINES as ENGINES
from encore_fast.engines import SavedInverse, Solver, make_engine
from encore_fast.errors import EditorConflictError
from encore_fast.export import export_editor
from encore_fast.history import History, check_history
from encore_fast.matrices import EditedMatrices, check_free, claim, unclaim
from encore_fast.methods import LayerState, LowRankUpdate, build_method
from encore_fast.models.arch import ArchSpec, ModelView
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.models.hooks import editing_mode
from encore_fast.models.loading import load_model, prepare_tokenizer
from encore_fast.requests import EditRequest, as_requests, validate_requests
from encore_fast.sharing import Update, update_from_main, write_edits
from encore_fast.values.keys import SubjectForwards
from encore_fast.values.prompts import PromptTokens


class Editor:
    """Edit facts in a causal LM, batch after batch, with ENCORE, MEMIT, AlphaEdit and others.

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer.
        method: ``"encore"`` (default), another registered rule (``encore_fast.methods.RULES``),
            an alias, or a rule joined with transforms, ``"alphaedit+nas"`` (README "Methods").
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
        chat: edit every request inside the tokenizer's chat template (as ``chat=True`` on each
            request does: the prompt the user's turn, the target the assistant's first words).
        **overrides: any :class:`EditConfig` field (``layers``, ``lambda_p``, ...).

    One editor per model: it owns the edited matrices' history, so a second ``Editor`` on the
    same model object, while the first is alive, raises :class:`EditorConflictError` (two
    would silently undo each other's edits); :meth:`release` the first, or edit a copy.
    Each batch is all-or-nothing: if anything fails, the model, ``S``, solver state and
    history are as before the batch (:class:`EditError` names the layer and why).
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, method: str = "encore",
        preset: str | None = "auto", *, engine: str = "fast", corpus: Any = None,
        stats: Mapping[int, torch.Tensor] | None = None,
        stats_cache: str | os.PathLike | bool | None = None, arch: ArchSpec | None = None,
        model_name: str | None = None, progress: bool = True, max_value_tokens: int = 8192,
        master_weights: bool | None = None, process_group: Any = None,
        state_device: str | torch.device | Mapping[int, str | torch.device] | None = None,
        history: int | None = 100, chat: bool = False, **overrides: Any,
    ) -> None:
        self._engine = make_engine(engine, max_value_tokens)  # (checks both)
        check_history(history)
        check_free(model)
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.view = ModelView(model, arch)
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or "model")
        self.preset = guess_preset(self.model_name) if preset == "auto" else preset
        self.parts = build_method(method)  # (the rule and any transforms: "alphaedit+nas")
        self.method = self.parts.name
        self.hparams = make_config(self.method, self.preset, self.view.num_layers, **overrides)
        self.rule = self.parts.rule
        self.sites = lstates.checked_sites(self.view, self.rule.sites(self.hparams))
        self.engine = engine
        self.corpus = corpus
        self.stats_cache = stats_cache
        self.group = resolve_group(process_group)
        self.state_device = lstates.checked_state_device(state_device)
        self.progress = progress and (self.group is None or self.group.is_main)
        self.max_value_tokens, self.chat = max_value_tokens, bool(chat)
        self.fingerprint = model_fingerprint(model)
        self._given_stats = None if stats is None else lstates.checked_stats(
            stats, self.hparams.layers, self.view.d_in)
        self._states: dict[int, LayerState] | None = None
        self._contexts: list[str] | None = None
        self.matrices = EditedMatrices(self.view, self.sites, master_weights)
        self.master_weights = self.matrices.use_masters
        self._original = self.matrices.original  # (the unedited matrices)
        self.edit_history = History(history, self.matrices)  # (the batches; ``history``: N)
        self._solvers: dict[int, Solver] = {}
        self._released = False
        claim(model, self)

    def release(self) -> None:
        """Let another :class:`Editor` take this model (as it is); this one refuses all edits."""
        unclaim(self.model, self)
        self._released = True

    def _check_held(self, action: str) -> None:
        if self._released:
            raise EditorConflictError(f"cannot {action}: this editor was released")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike | None = None, method: str = "encore",
        preset: str | None = "auto", *, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu", **kwargs: Any,
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
        return self.edit_history.num_batches

    @property
    def num_edits(self) -> int:
        return self.edit_history.num_edits

    @property
    def requests(self) -> list[EditRequest]:
        """All requests applied so far, in order."""
        return self.edit_history.requests

    @property
    def history(self) -> int | None:
        """How many of the last batches undo can take back (``None``: all); setting a smaller
        value drops the older ones now."""
        return self.edit_history.limit

    @history.setter
    def history(self, value: int | None) -> None:
        self.edit_history.set_limit(value, self.layer_states, self._make_solver)

    @property
    def context_templates(self) -> list[str]:
        """``["{}"]`` + generated prefixes: made once per editor from the unedited model (before
        its first edit or load) and saved with the edits, so that a loaded or resumed run goes
        on with the very same prefixes."""
        if self._contexts is None:
            if self.num_batches:
                raise RuntimeError("context templates must be made from the unedited model")
            self._contexts = make_context_templates(self.model, self.tokenizer, self.hparams,
                                                    self.group)
        return self._contexts

    def weight_norms(self) -> dict[int, float]:
        """Current ‖W‖_F of every edited matrix (of its fp32 master, when there is one)."""
        return {l: float(self.edited_weight(l).detach().float().norm())
                for l in self.sites}

    def edited_weight(self, layer: int) -> torch.Tensor:
        """The edited matrix as accumulated: its fp32 master (16-bit models), else the weight."""
        return self.matrices.edited(layer)

    def layer_states(self) -> dict[int, LayerState]:
        """Per-layer ``C0`` (computed or loaded on first use, from the original model) and ``S``."""
        if self._states is None:
            c0 = (self._given_stats or self._compute_stats()) if self.rule.uses_c0 else {
                s: torch.zeros(0, 0) for s in self.sites}  # (UltraEdit: no C0)
            self._states = lstates.initial_states(c0, self.sites, self.state_device, self.view)
        return self._states

    def _compute_stats(self) -> dict[int, torch.Tensor]:
        if self.num_batches:
            raise RuntimeError("statistics must be computed on the original model; reset() first")
        return lstates.corpus_c0(self.view, self.tokenizer, self.hparams, self.corpus,
                         fingerprint=self.fingerprint, model_name=self.model_name,
                         cache=self.stats_cache, progress=self.progress, group=self.group)

    # ------------------------------------------------------------------ editing

    def edit(self, requests: Iterable[EditRequest | Mapping[str, Any]],
             batch_size: int | None = None, progress: bool | None = None) -> list[BatchReport]:
        """Apply ``requests`` (:class:`EditRequest` objects or dicts: ``prompt``, ``subject``,
        ``target_new``, ``chat``, ...; or one of either) in batches of ``batch_size`` (default
        ``hparams.batch_size``), one after another on the model as edited so far; returns one
        :class:`BatchReport` per batch (time, value steps, MPES stops, weight and update norms).

        All requests are validated first; a bad one raises :class:`RequestError` before any
        weight changes. Each batch is a transaction: if it fails (:class:`EditError`, or an
        interrupt), the model and the editor are as before that batch; the batches before it
        in this call stay applied. Runs with the model in eval mode (its mode is restored).
        """
        self._check_held("edit")
        reqs = as_requests(requests, self.chat)
        bs = checked_batch_size(self.hparams.batch_size if batch_size is None else batch_size)
        if not reqs:
            return []
        progress = self.progress if progress is None else progress
        with editing_mode(self.model):
            validate_requests(reqs, self.tokenizer, max_request_length(
                self.model, self.tokenizer, self.hparams, self.context_templates), bs)
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

    def _edit_batch(self, reqs: list[EditRequest], bar: Any) -> BatchReport:
        """Values, then every layer's update (applied, as the next layer's keys need it), then
        ``S`` and the solvers; on any failure the applied layers are put back."""
        t0 = time.perf_counter()
        tokens = PromptTokens(self.tokenizer)  # (value prompts and key passes share them)
        values, zs = self._engine.batch_values(self, reqs, tokens, bar)
        t1 = time.perf_counter()
        batch, keys64, w_norms, d_norms = update_from_main(
            self.group, reqs, lambda: self._update_layers(reqs, zs, tokens),
            self._apply_factors, f"batch {self.num_batches}: the update")
        self._commit(batch, keys64, solved=self.group is None or self.group.is_main)
        t2 = time.perf_counter()
        return BatchReport(
            batch_index=self.num_batches - 1, n_requests=len(reqs), seconds=t2 - t0,
            steps=[v.updates for v in values], mpes_stopped=[v.mpes_stopped for v in values],
            weight_norms=w_norms, delta_norms=d_norms, seconds_values=t1 - t0,
            seconds_update=t2 - t1,
        )

    def _update_layers(self, reqs: list[EditRequest], zs: torch.Tensor,
                       tokens: PromptTokens | None = None) -> Update:
        """Solve and apply each layer's update in turn; roll all of them back on failure."""
        cfg = self.hparams
        batch = Batch(requests=list(reqs))
        keys64, backups, w_norms, d_norms = {}, {}, {}, {}
        had_solvers = set(self._solvers)
        layer = cfg.layers[0]
        try:
            fwd = self.rule.updates(self.view, self.tokenizer, reqs, self.layer_states(), cfg) \
                if self.rule.direct else SubjectForwards(
                    self.view, self.tokenizer, reqs, self.context_templates,
                    reuse_below=self._engine.reuse_below(cfg.layers), tokens=tokens)
            for i, layer in enumerate(self.sites):
                keys, upd, k64 = self._solve_layer(fwd, i, layer, zs)
                backups[layer] = self.edited_weight(layer).detach().clone()
                w_norms[layer], d_norms[layer] = self.matrices.apply(layer, upd.u, upd.v, upd.mask)
                check_norms(layer, w_norms[layer], d_norms[layer], self.view.dtype_name)
                keys64[layer] = k64
                batch.record(layer, upd.u, upd.v, keys.T.contiguous(), upd.mask)
        except BaseException as exc:
            self._roll_back(backups, had_solvers)
            error = rolled_back_error(exc, f"batch {self.num_batches}, layer {layer}")
            if error is None:
                raise
            raise error from exc
        return batch, keys64, w_norms, d_norms

    def _solve_layer(self, fwd: Any, i: int, layer: Any, zs: torch.Tensor | None) -> tuple[
            torch.Tensor, LowRankUpdate, torch.Tensor]:
        """The ``i``-th edited site's keys, its checked update (fp32 factors, after the
        method's update transforms) and its keys in float64 on the state's device (the layers
        before it are final for this batch); a direct rule's (``fwd``: its updates) as given."""
        cfg = self.hparams
        sdev = self.layer_states()[layer].c0.device  # (keys go to the state)
        if isinstance(fwd, dict):  # (keys: what the batch records for the site's state)
            keys, upd = fwd[layer]
            k64 = keys.T.contiguous().double().to(sdev)
        else:
            fwd.freeze_below(layer)
            keys = fwd.keys(layer)
            cur = fwd.block_outputs(cfg.layers[-1])
            resid = (zs.to(cur.device) - cur) / (len(cfg.layers) - i)
            k64 = keys.T.contiguous().double().to(sdev)  # the layout replay reads back
            v = self._solver(layer).solve(k64, resid.T.double().to(sdev))
            upd = LowRankUpdate(resid.T.contiguous(), v.float().contiguous())
        upd = self.parts.transform_update(upd, lambda: self.matrices.update_context(
            layer, self.layer_states()[layer], cfg, keys))
        check_update(layer, keys, upd.u, upd.v, tuple(self.view.weight(layer).shape),
                     self.view.arch.transposed, record_shape=self.rule.record_shape)
        return keys, upd, k64

    def _roll_back(self, backups: Mapping[int, torch.Tensor], had_solvers: set[int]) -> None:
        """Put back the matrices a failed batch changed, and the solvers as before it."""
        for l, w in backups.items():  # (model weight = master rounded, as before)
            self.matrices.put(l, w)
        for solver in self._solvers.values():
            solver.discard()
        self._solvers = {l: sv for l, sv in self._solvers.items() if l in had_solvers}

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
        self.edit_history.append(batch, self.layer_states, self._make_solver)

    def _apply_factors(self, batch: Batch) -> dict[int, torch.Tensor]:
        """Apply a batch's saved factors to the weights (no solve); its keys for the fold."""
        states = self.layer_states()
        keys64 = {}
        for layer, (u, v, k) in batch.factors.items():
            self.matrices.apply(layer, u, v, batch.masks.get(layer))
            keys64[layer] = k.to(states[layer].c0.device).double()
        return keys64

    def _solver(self, layer: int) -> Solver:
        """The solver of ``layer`` (made by the engine on first use, from ``C0`` and ``S``)."""
        if layer not in self._solvers:
            self._solvers[layer] = self._make_solver(layer, self.layer_states()[layer])
        return self._solvers[layer]

    def _make_solver(self, layer: int, state: LayerState,
                     saved: SavedInverse | None = None) -> Solver:
        """A fresh solver over ``state`` (from a saved inverse and its counters, if given)."""
        return self._engine.solver(self.rule, layer, state, self.hparams, saved)

    # ------------------------------------------------------------------ history, save, load

    def reset(self) -> None:
        """Restore the original weights and forget all edits and sequential state."""
        self._check_held("reset")
        self._solvers = self.edit_history.restore_original(self._states)
        self.edit_history.clear()

    def undo(self) -> list[EditRequest]:
        """Take back the last batch (weights, sequential and solver state); returns its
        requests. The editor is then exactly as if the last batch had never been applied."""
        self._check_held("undo")
        kept, last = self.edit_history.before_last()
        self._replay(kept)
        return last.requests

    def _replay(self, batches: list[Batch]) -> None:
        """Set weights, ``S`` and solver state to the base (or the original) + the given
        batches, applied in order: the same operations on the same inputs as when they were
        first applied, so the result is bit-for-bit that of the editor that applied them."""
        self._solvers = self.edit_history.restore(self._states)
        for layer in self.sites:
            self._solver(layer)  # (no base: made from S = 0, as before a first batch)
        for batch in batches:
            self._commit(batch, self._apply_factors(batch), solved=False)

    def save_edits(self, path: str | os.PathLike,
                   metadata: Mapping[str, Any] | None = None) -> Path:
        """Write all applied batches (low-rank factors, keys, requests, settings, context
        templates, a checksum) to a safetensors file, atomically; the batches the bounded
        history dropped are written as the state after them (``encore_fast.edits_file``), so
        the file of a long run with ``history=0`` is one state, not every batch. Load it with
        :meth:`load_edits` on the same model. ``metadata``: JSON-able extras stored with
        it (read back by :func:`read_edits_metadata`). Under a process group, rank 0 writes
        the file (the others wait for it, and raise if it fails)."""
        meta = edits_header(self.method, self.model_name, self.fingerprint, self.hparams,
                            self.context_templates, metadata)
        tensors = self.edit_history.pack(meta, self.layer_states, self._solvers)
        return write_edits(self.group, path, tensors, meta)

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
        saved = read_edits(
            path, fingerprint=self.fingerprint, method=self.method, config=self.hparams,
            weight_shapes={l: tuple(self.view.weight(l).shape) for l in self.sites},
            transposed=self.view.arch.transposed, record_shape=self.rule.record_shape)
        # (files from before contexts were saved: made now, from the unedited model)
        self._contexts = saved.contexts or self.context_templates
        with editing_mode(self.model):  # (C0 from the original model, before any change:)
            self.edit_history.load(saved, self.layer_states(), self._make_solver)
            try:
                self._replay(saved.batches)
            except BaseException:
                self.reset()
                raise
            self.edit_history.trim(self.layer_states, self._make_solver)
        return self.num_batches

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False,
                        gguf: str | None = None) -> Path:
        """The edited model as a transformers checkpoint (and GGUF: ``encore_fast.export``)."""
        return export_editor(self, path, overwrite=overwrite, gguf=gguf)

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
        """The ``metadata`` extras that :meth:`save_edits` stored in ``path``."""
        return read_edits_metadata(path)

