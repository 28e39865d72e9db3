"""The :class:`Editor`: sequential batches of fact edits, with undo, reset, save and load.

Data flows one way (DESIGN.md §6): requests -> validation -> values ``z`` and keys ``K`` (model
work, ``values/``) -> update rule (linear algebra, ``methods/``) -> weights (``kernels``). The
editor owns the sequential state: the per-layer ``S``, the original weights, and the history of
applied low-rank factors, which is what undo, save and load replay.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from encore_fast.config import EditConfig, guess_preset, make_config
from encore_fast.kernels import apply_lowrank_update_
from encore_fast.methods import LayerState, get_rule
from encore_fast.methods.solver import DirectSolver, WoodburySolver
from encore_fast.models.arch import ArchSpec, ModelView
from encore_fast.models.fingerprint import model_fingerprint
from encore_fast.models.loading import load_model, prepare_tokenizer
from encore_fast.paths import default_corpus
from encore_fast.requests import EditRequest, as_requests, encode, validate_requests
from encore_fast.stats import second_moments
from encore_fast.values.keys import SubjectForwards
from encore_fast.values.prompts import build_value_prompts
from encore_fast.values.templates import generate_context_templates

EDITS_FORMAT = "encore_fast.edits/1"
ENGINES = ("reference", "fast")


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


@dataclass
class _Batch:
    """One applied batch: its requests and, per layer, ``Δ = U Vᵀ`` and the keys ``K``."""

    requests: list[EditRequest]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)


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
        **overrides: any :class:`EditConfig` field (``layers``, ``lambda_p``, ...).
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
        **overrides: Any,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.view = ModelView(model, arch)
        self.model_name = model_name or str(getattr(model.config, "name_or_path", "") or "model")
        if preset == "auto":
            preset = guess_preset(self.model_name)
        self.preset = preset
        self.method = method
        self.hparams: EditConfig = make_config(method, preset, self.view.num_layers, **overrides)
        self.rule = get_rule(method)
        self.engine = engine
        self.corpus = corpus
        self.stats_cache = stats_cache
        self.progress = progress
        self.max_value_tokens = max_value_tokens
        self.fingerprint = model_fingerprint(model)
        self._given_stats = dict(stats) if stats is not None else None
        self._states: dict[int, LayerState] | None = None
        self._contexts: list[str] | None = None
        self._original = {l: self.view.weight(l).detach().clone() for l in self.hparams.layers}
        self._history: list[_Batch] = []
        self._solvers: dict[int, DirectSolver | WoodburySolver] = {}

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
        return len(self._history)

    @property
    def num_edits(self) -> int:
        return sum(len(b.requests) for b in self._history)

    @property
    def requests(self) -> list[EditRequest]:
        """All requests applied so far, in order."""
        return [r for b in self._history for r in b.requests]

    @property
    def context_templates(self) -> list[str]:
        """``["{}"]`` + generated prefixes; made once per editor from the unedited model."""
        if self._contexts is None:
            self._contexts = generate_context_templates(
                self.model, self.tokenizer, words=self.hparams.context_words,
                length=self.hparams.context_length, seed=self.hparams.context_seed)
        return self._contexts

    def weight_norms(self) -> dict[int, float]:
        """Current ‖W‖_F of every edited matrix."""
        return {l: float(self.view.weight(l).detach().float().norm()) for l in self.hparams.layers}

    def layer_states(self) -> dict[int, LayerState]:
        """Per-layer ``C0`` (computed or loaded on first use, from the original model) and ``S``."""
        if self._states is None:
            c0 = self._given_stats or self._compute_stats()
            missing = [l for l in self.hparams.layers if l not in c0]
            if missing:
                raise ValueError(f"stats given for layers {sorted(c0)}, missing {missing}")
            self._states = {
                l: LayerState(c0=c0[l].to(self.view.device, torch.float64))
                for l in self.hparams.layers
            }
        return self._states

    def _compute_stats(self) -> dict[int, torch.Tensor]:
        if self._history:
            raise RuntimeError("statistics must be computed on the original model; reset() first")
        corpus = self.corpus if self.corpus is not None else default_corpus()
        if corpus is None:
            corpus = sample_corpus(self.model, self.tokenizer)
        cache = self.stats_cache
        return second_moments(
            self.view, self.tokenizer, self.hparams.layers, corpus,
            n_samples=self.hparams.stats_samples, max_length=self.hparams.stats_max_length,
            fingerprint=self.fingerprint, model_name=self.model_name,
            cache=None if cache is True else cache, progress=self.progress,
        )

    # ------------------------------------------------------------------ editing

    def edit(
        self,
        requests: Iterable[EditRequest | Mapping[str, Any]],
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> list[BatchReport]:
        """Apply ``requests`` in batches of ``batch_size`` (default ``hparams.batch_size``),
        one after another on the model as edited so far. All requests are validated first;
        a bad one raises :class:`RequestError` before any weight changes."""
        reqs = as_requests(requests)
        if not reqs:
            return []
        bs = batch_size or self.hparams.batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        progress = self.progress if progress is None else progress
        validate_requests(reqs, self.tokenizer, self._max_request_length())
        self.layer_states()
        reports = []
        bar = tqdm(total=len(reqs), desc=f"{self.method} edits", unit="edit",
                   disable=not progress)
        for s in range(0, len(reqs), bs):
            reports.append(self._edit_batch(reqs[s : s + bs], bar))
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
        cfg, view = self.hparams, self.view
        t0 = time.perf_counter()
        contexts = self.context_templates
        prompts = [build_value_prompts(self.tokenizer, r, contexts) for r in reqs]
        z_layer = cfg.layers[-1]
        with _frozen(self.model):
            if self.engine == "fast":
                from encore_fast.values.fast import optimize_values

                values = optimize_values(view, self.tokenizer, prompts, z_layer, cfg,
                                         progress=bar, max_tokens=self.max_value_tokens)
            else:
                from encore_fast.values.reference import optimize_values as reference_values

                values = reference_values(view, self.tokenizer, prompts, z_layer, cfg,
                                          progress=bar)
        t1 = time.perf_counter()
        zs = torch.stack([v.z for v in values])
        batch = _Batch(requests=list(reqs))
        w_norms, d_norms = {}, {}
        states = self.layer_states()
        fwd = SubjectForwards(view, self.tokenizer, reqs, contexts,
                              reuse_below=cfg.layers[0] if self.engine == "fast" else None)
        for i, layer in enumerate(cfg.layers):
            fwd.freeze_below(layer)  # the layers before it are final for this batch
            keys = fwd.keys(layer)
            cur = fwd.block_outputs(z_layer)
            resid = (zs - cur) / (len(cfg.layers) - i)
            k64 = keys.T.double()
            solver = self._solver(layer)
            v = solver.solve(k64, resid.T.double())
            u32, v32 = resid.T.contiguous(), v.float().contiguous()
            w_norms[layer], d_norms[layer] = self._apply(layer, u32, v32)
            self.rule.after_batch(k64, states[layer])
            solver.after_batch()
            batch.factors[layer] = (u32.cpu(), v32.cpu(), keys.T.contiguous().cpu())
        self._history.append(batch)
        t2 = time.perf_counter()
        return BatchReport(
            batch_index=len(self._history) - 1, n_requests=len(reqs), seconds=t2 - t0,
            steps=[v.updates for v in values], mpes_stopped=[v.mpes_stopped for v in values],
            weight_norms=w_norms, delta_norms=d_norms, seconds_values=t1 - t0,
            seconds_update=t2 - t1,
        )

    @torch.no_grad()
    def _apply(self, layer: int, u: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
        """``W += U Vᵀ`` in the weight's own dtype, through the kernel dispatch."""
        w = self.view.weight(layer)
        dev = w.device
        norms = apply_lowrank_update_(w.data, u.to(dev), v.to(dev),
                                      transposed=self.view.arch.transposed)
        return float(norms[0]), float(norms[1])

    # ------------------------------------------------------------------ history

    def reset(self) -> None:
        """Restore the original weights and forget all edits and sequential state."""
        with torch.no_grad():
            for layer, w0 in self._original.items():
                self.view.weight(layer).data.copy_(w0)
        self._history.clear()
        if self._states is not None:
            for st in self._states.values():
                st.s = None
        self._on_state_change()

    def undo(self) -> list[EditRequest]:
        """Take back the last batch (weights and sequential state); returns its requests."""
        if not self._history:
            raise RuntimeError("nothing to undo: no batch has been applied")
        kept = self._history[:-1]
        last = self._history[-1]
        self._replay(kept)
        return last.requests

    def _replay(self, batches: list[_Batch]) -> None:
        """Set weights and ``S`` to original + the given batches, applied in order (exact:
        the same operations on the same inputs as when they were first applied)."""
        self.reset()
        states = self.layer_states()
        for batch in batches:
            for layer, (u, v, k) in batch.factors.items():
                self._apply(layer, u, v)
                self.rule.after_batch(k.to(states[layer].c0.device).double(), states[layer])
            self._history.append(batch)
        self._on_state_change()

    def _solver(self, layer: int) -> DirectSolver | WoodburySolver:
        """The solver of ``layer``: Woodbury (fast engine, built from ``C0`` and ``S``) or the
        rule's direct float64 solve (reference engine)."""
        if layer not in self._solvers:
            state = self.layer_states()[layer]
            solver: DirectSolver | WoodburySolver | None = None
            if self.engine == "fast":
                try:
                    solver = WoodburySolver(self.rule, state, self.hparams)
                except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
                    if type(exc) is RuntimeError and "allocate" not in str(exc):
                        raise  # CPU allocation failures are RuntimeErrors; nothing else is ours

                    d = state.c0.shape[0]
                    warnings.warn(
                        f"layer {layer}: the Woodbury solver's float64 {d}x{d} inverse "
                        f"({d * d * 8 / 2**30:.2f} GiB) does not fit on {state.c0.device} "
                        f"({type(exc).__name__}); solving the full system each batch instead "
                        "(same result, slower)", stacklevel=3)
            self._solvers[layer] = solver or DirectSolver(self.rule, state, self.hparams)
        return self._solvers[layer]

    def _on_state_change(self) -> None:
        """Derived solver state no longer matches ``S``: rebuild it lazily."""
        self._solvers = {}

    # ------------------------------------------------------------------ save / load

    def save_edits(self, path: str | os.PathLike) -> Path:
        """Write all applied batches (low-rank factors, keys, requests, settings) to a
        safetensors file, atomically. Load it with :meth:`load_edits` on the same model."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        for b, batch in enumerate(self._history):
            for layer, (u, v, k) in batch.factors.items():
                tensors[f"b{b}.l{layer}.U"] = u.contiguous()
                tensors[f"b{b}.l{layer}.V"] = v.contiguous()
                tensors[f"b{b}.l{layer}.K"] = k.contiguous()
        meta = {
            "format": EDITS_FORMAT,
            "method": self.method,
            "model_name": self.model_name,
            "model_fingerprint": self.fingerprint,
            "config": json.dumps(self.hparams.to_dict()),
            "batches": json.dumps([[r.to_dict() for r in b.requests] for b in self._history]),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    def load_edits(self, path: str | os.PathLike) -> int:
        """Apply the batches saved in ``path`` to this (unedited) editor's model; returns the
        number of batches. Refuses a file made for another model, method or layers."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no edits file at {path}")
        if self._history:
            raise RuntimeError(f"cannot load {path}: this editor already has "
                               f"{self.num_batches} batch(es); call reset() first")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != EDITS_FORMAT:
                raise ValueError(f"{path} is not an encore_fast edits file")
            if meta["model_fingerprint"] != self.fingerprint:
                raise ValueError(f"{path} was made for another model ({meta['model_name']}, "
                                 f"fingerprint {meta['model_fingerprint'][:12]}); this model's "
                                 f"fingerprint is {self.fingerprint[:12]}")
            saved_cfg = EditConfig.from_dict(json.loads(meta["config"]))
            if meta["method"] != self.method or saved_cfg.layers != self.hparams.layers:
                raise ValueError(f"{path} holds {meta['method']} edits of layers "
                                 f"{saved_cfg.layers}; this editor is {self.method} on layers "
                                 f"{self.hparams.layers}")
            batches = []
            for b, reqs in enumerate(json.loads(meta["batches"])):
                batch = _Batch(requests=[EditRequest(**r) for r in reqs])
                for layer in self.hparams.layers:
                    batch.factors[layer] = tuple(  # type: ignore[assignment]
                        f.get_tensor(f"b{b}.l{layer}.{n}") for n in "UVK")
                batches.append(batch)
        self._replay(batches)
        return len(batches)


class _frozen:
    """Context manager: parameters do not require grad inside; flags restored after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = list(model.parameters())

    def __enter__(self) -> None:
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, f in zip(self.params, self.flags, strict=True):
            p.requires_grad_(f)


@torch.no_grad()
def sample_corpus(model: torch.nn.Module, tokenizer: Any, n: int = 64, length: int = 64,
                  seed: int = 0) -> list[str]:
    """Texts sampled from the model itself: the fallback corpus for ``C0`` when no text is
    available offline (a warning says so; real text is better)."""
    warnings.warn("no corpus given and no WikiText-2 found: estimating C0 from text sampled "
                  "from the model (pass corpus=... for real text)", stacklevel=3)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    starts = ["The", "In", "A", "It", "He", "She", "This", "When"]
    prompts = [starts[i % len(starts)] for i in range(n)]
    ids = [encode(tokenizer, p) for p in prompts]
    x = torch.tensor(ids, device=device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=50,
                         max_new_tokens=length, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def edit_requests_from_json(path: str | os.PathLike) -> list[EditRequest]:
    """Requests from a JSON list or JSON-lines file (any supported layout)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        records: Sequence[Any] = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    return as_requests(records)
