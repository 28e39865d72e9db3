"""The edits file: what :meth:`Editor.save_edits` writes and :meth:`Editor.load_edits` checks.

One safetensors file holds the edits of one editor:

* per kept batch ``b`` and layer ``l``: ``b{b}.l{l}.U``, ``.V`` (``Δ = U Vᵀ``) and ``.K`` (keys);
* when the bounded history dropped the first batches (``Editor(history=N)``), the state after
  them instead of their factors: ``base.l{l}.W`` (the edited matrix, the fp32 master of a 16-bit
  model), ``base.l{l}.S`` and ``base.l{l}.inv`` (the Woodbury inverse; its counters in the
  metadata), so that loading continues bit-for-bit;
* metadata: format, method, model name and fingerprint, settings, every batch's requests,
  the index of the first kept batch, the context templates, a SHA-256 of all tensors, and the
  caller's extras.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from encore_fast.config import EditConfig
from encore_fast.errors import EditError, EditsFileError
from encore_fast.io import tensors_digest
from encore_fast.methods import LayerState
from encore_fast.methods.solver import DirectSolver, WoodburySolver
from encore_fast.requests import EditRequest

EDITS_FORMAT = "encore_fast.edits/2"
RecordShape = Callable[[int, int, int], tuple[int, int]]  # (n, d_in, d_out) -> a batch's "K"
_READABLE = ("encore_fast.edits/1", EDITS_FORMAT)  # /1: no base, every batch's factors


@dataclass
class Batch:
    """One applied batch: its requests and, per layer, ``Δ = U Vᵀ`` and the keys ``K``; for a
    layer whose update a transform masked, ``Δ = M ⊙ (U Vᵀ)`` with ``masks[layer] = M``."""

    requests: list[EditRequest]
    factors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, layer: int, u: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        """Keep ``layer``'s applied update (on the CPU): factors, keys ``[n, d_in]``, mask."""
        self.factors[layer] = (u.cpu(), v.cpu(), keys.cpu())
        if mask is not None:
            self.masks[layer] = mask.cpu()


@dataclass
class Base:
    """The state after the batches a bounded history no longer keeps: the edited matrices
    (fp32 masters where there are), ``S`` and the solvers, advanced by the same operations
    as the live state, so that undo down to it and save/load from it stay bit-exact."""

    weights: dict[int, torch.Tensor]
    states: dict[int, LayerState]
    solvers: dict[int, DirectSolver | WoodburySolver]


@dataclass
class SavedEdits:
    """What a checked edits file holds (nothing applied yet)."""

    batches: list[Batch]  # the kept batches, with factors
    dropped: list[list[EditRequest]]  # requests of the batches folded into the base
    contexts: list[str] | None
    base: dict[int, dict[str, torch.Tensor]]  # layer -> {"W", "S"?, "inv"?}; {} without one
    counters: dict[int, tuple[int, int]]  # layer -> Woodbury (batches, refactorisations)


def edits_header(method: str, model_name: str, fingerprint: str, config: EditConfig,
                 contexts: list[str], extra: Mapping[str, Any] | None) -> dict[str, str]:
    """The editor's part of an edits file's metadata (:func:`pack_edits` adds the rest)."""
    return {
        "method": method,
        "model_name": model_name,
        "model_fingerprint": fingerprint,
        "config": json.dumps(config.to_dict()),
        "contexts": json.dumps(contexts),
        "extra": json.dumps(dict(extra or {})),
    }


def pack_edits(meta: dict[str, str], window: list[Batch], dropped: list[list[EditRequest]],
               base: Base | None) -> dict[str, torch.Tensor]:
    """The tensors of an edits file (and the batch/base entries of ``meta``, in place)."""
    tensors: dict[str, torch.Tensor] = {}
    first = len(dropped)
    for b, batch in enumerate(window, start=first):
        for layer, (u, v, k) in batch.factors.items():
            tensors[f"b{b}.l{layer}.U"] = u.contiguous()
            tensors[f"b{b}.l{layer}.V"] = v.contiguous()
            tensors[f"b{b}.l{layer}.K"] = k.contiguous()
        for layer, mask in batch.masks.items():
            tensors[f"b{b}.l{layer}.M"] = pack_bits(mask)
    counters = {}
    if base is not None:
        for layer, w in base.weights.items():
            tensors[f"base.l{layer}.W"] = w.detach()
            s = base.states[layer].s
            if s is not None:
                tensors[f"base.l{layer}.S"] = s
            for name, t in base.states[layer].extra.items():
                tensors[f"base.l{layer}.x.{name}"] = t
            solver = base.solvers.get(layer)
            if isinstance(solver, WoodburySolver):
                tensors[f"base.l{layer}.inv"] = solver.inv
                counters[str(layer)] = [solver.batches, solver.refactorisations]
    meta["format"] = EDITS_FORMAT
    meta["batches"] = json.dumps([[r.to_dict() for r in reqs] for reqs in dropped]
                                 + [[r.to_dict() for r in b.requests] for b in window])
    meta["window_start"] = str(first)
    meta["solver_counters"] = json.dumps(counters)
    meta["sha256"] = tensors_digest(tensors)
    return tensors


def read_edits_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` extras stored by :meth:`Editor.save_edits` in ``path``."""
    meta = edits_meta(Path(path))
    try:
        return dict(json.loads(meta.get("extra") or "{}"))
    except ValueError as exc:
        raise EditsFileError(f"{path}: its metadata extras are not valid JSON ({exc})") from None


def edits_meta(path: Path) -> dict[str, str]:
    """The header of an edits file (an :class:`EditsFileError` for anything else)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors has its own error types for damaged files
        raise EditsFileError(f"{path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") not in _READABLE:
        raise EditsFileError(f"{path} is not an encore_fast edits file")
    return meta


def read_edits(path: Path, *, fingerprint: str, method: str, config: EditConfig,
               weight_shapes: Mapping[Any, tuple[int, ...]], transposed: bool,
               record_shape: RecordShape | None = None) -> SavedEdits:
    """Every check of an edits file against the editor that loads it (its model's
    ``fingerprint``, its ``method`` and ``config``, the shapes of its edited weights per site,
    stored ``transposed`` or not, what a batch records per site); changes nothing."""
    meta = edits_meta(path)
    if meta.get("model_fingerprint") != fingerprint:
        raise EditsFileError(
            f"{path} was made for another model ({meta.get('model_name')}, fingerprint "
            f"{str(meta.get('model_fingerprint'))[:12]}); this model's fingerprint is "
            f"{fingerprint[:12]}")
    saved_cfg, requests, contexts, first, counters = _read_meta(path, meta)
    if meta.get("method") != method or saved_cfg.layers != config.layers:
        raise EditsFileError(f"{path} holds {meta.get('method')} edits of layers "
                             f"{saved_cfg.layers}; this editor is {method} on layers "
                             f"{config.layers}")
    differ = sorted(k for k, v in saved_cfg.to_dict().items() if config.to_dict()[k] != v)
    if differ:
        warnings.warn(f"{path} was made with other settings ({', '.join(differ)}); its edits "
                      "are loaded as saved, later batches use this editor's", stacklevel=4)
    tensors = _read_tensors(path, meta)
    sites = list(weight_shapes)
    base = _read_base(path, sites, weight_shapes, transposed, tensors) if first else {}
    batches = []
    for b, reqs in enumerate(requests[first:], start=first):
        batch = Batch(requests=reqs)
        for layer in sites:
            names = [f"b{b}.l{layer}.{n}" for n in "UVK"]
            if any(n not in tensors for n in names):
                raise EditsFileError(f"{path}: batch {b} lacks the factors of layer {layer}")
            u, v, k = (tensors[n] for n in names)
            try:
                check_update(layer, k.T, u, v, weight_shapes[layer], transposed, n=len(reqs),
                             record_shape=record_shape)
            except EditError as exc:
                raise EditsFileError(f"{path}: batch {b}: {exc}") from None
            batch.factors[layer] = (u, v, k)
            packed = tensors.get(f"b{b}.l{layer}.M")
            if packed is not None:
                batch.masks[layer] = _read_mask(path, packed, weight_shapes[layer], transposed)
        batches.append(batch)
    return SavedEdits(batches=batches, dropped=requests[:first], contexts=contexts, base=base,
                      counters=counters)


def _read_meta(path: Path, meta: dict[str, str]) -> tuple[
        EditConfig, list[list[EditRequest]], list[str] | None, int, dict[int, tuple[int, int]]]:
    """The settings, every batch's requests, the context templates, the first kept batch
    and the solver counters in an edits file's header."""
    try:
        saved_cfg = EditConfig.from_dict(json.loads(meta["config"]))
        records = json.loads(meta["batches"])
        contexts = json.loads(meta["contexts"]) if "contexts" in meta else None
        requests = [[EditRequest(**r) for r in reqs] for reqs in records]
        first = int(meta.get("window_start", "0"))
        counters = {int(l): (int(c[0]), int(c[1]))
                    for l, c in json.loads(meta.get("solver_counters", "{}")).items()}
        if not 0 <= first <= len(requests):
            raise ValueError(f"window_start {first} outside 0..{len(requests)}")
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EditsFileError(f"{path}: damaged metadata ({type(exc).__name__}: {exc})") from None
    return saved_cfg, requests, contexts, first, counters


def _read_tensors(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """Every tensor of an edits file, checked against the checksum in its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise EditsFileError(f"{path}: its tensors cannot be read ({exc})") from None
    if "sha256" in meta and tensors_digest(tensors) != meta["sha256"]:
        raise EditsFileError(f"{path} is damaged: its data do not match the checksum in its "
                             "header")
    return tensors


def _read_base(path: Path, layers: list[Any], weight_shapes: Mapping[Any, tuple[int, ...]],
               transposed: bool, tensors: dict[str, torch.Tensor]) -> dict[
        int, dict[str, torch.Tensor]]:
    """The base state's tensors per layer, each of the right shape and finite."""
    base: dict[int, dict[str, torch.Tensor]] = {}
    for layer in layers:
        w_shape = tuple(weight_shapes[layer])
        d_in = w_shape[0] if transposed else w_shape[1]
        want = {"W": w_shape, "S": (d_in, d_in), "inv": (d_in, d_in)}
        entry = {}
        for name, shape in want.items():
            t = tensors.get(f"base.l{layer}.{name}")
            if t is None:
                if name == "W":
                    raise EditsFileError(f"{path}: its base state lacks the weights of layer "
                                         f"{layer}")
                continue
            if tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
                raise EditsFileError(f"{path}: base.l{layer}.{name} has shape "
                                     f"{tuple(t.shape)} (expected {shape}) or non-finite "
                                     "entries")
            entry[name] = t
        prefix = f"base.l{layer}.x."
        for name, t in tensors.items():  # (a rule's own state: finite, its shape its own)
            if name.startswith(prefix):
                if not bool(torch.isfinite(t).all()):
                    raise EditsFileError(f"{path}: {name} has non-finite entries")
                entry["x." + name[len(prefix):]] = t
        base[layer] = entry
    return base


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, eight entries per byte (the last byte zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` packed."""
    bits = (packed.to(torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[: math.prod(shape)].bool().reshape(shape)


def _read_mask(path: Path, packed: torch.Tensor, w_shape: tuple[int, ...],
               transposed: bool) -> torch.Tensor:
    """A batch's saved update mask, ``[d_out, d_in]``, checked against the weight's size."""
    d_out, d_in = (w_shape[1], w_shape[0]) if transposed else (w_shape[0], w_shape[1])
    if packed.dtype != torch.uint8 or packed.numel() != -(-d_out * d_in // 8):
        raise EditsFileError(f"{path}: an update mask has {packed.numel()} bytes, expected "
                             f"{-(-d_out * d_in // 8)} for a {d_out}x{d_in} update")
    return unpack_bits(packed, (d_out, d_in))


def check_update(layer: Any, keys: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                 w_shape: tuple[int, ...], transposed: bool, n: int | None = None,
                 record_shape: RecordShape | None = None) -> None:
    """Raise :class:`EditError` unless ``Δ = U Vᵀ`` fits the weight and all are finite (``U``,
    ``V`` of rank ``r``: the batch's ``n`` keys, and more where a transform added terms)."""
    d_out, d_in = (w_shape[1], w_shape[0]) if transposed else (w_shape[0], w_shape[1])
    n = keys.shape[0] if n is None else n
    r = u.shape[-1]
    k_shape = (n, d_in) if record_shape is None else tuple(record_shape(n, d_in, d_out))
    want = {"U": (d_out, r), "V": (d_in, r), "K": k_shape}
    for name, t in (("U", u), ("V", v), ("K", keys)):
        if tuple(t.shape) != want[name]:
            raise EditError(f"layer {layer}: {name} has shape {tuple(t.shape)}, expected "
                            f"{want[name]} for a weight of shape {w_shape}")
        if not bool(torch.isfinite(t).all()):
            raise EditError(f"layer {layer}: {name} has non-finite entries (NaN or inf)")
