"""Key statistics ``C0 = E[k kᵀ]`` per edited layer, with an on-disk cache.

All edited layers are collected in one forward pass that stops after the last edited layer.
Padding is excluded, accumulation is fp32 through the covariance kernel. The cache (safetensors)
is keyed by model fingerprint, layer, corpus and sample count, written atomically, and an
interrupted computation resumes from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from encore_fast.errors import EncoreFastError, StatsError
from encore_fast.io import atomic_save, tensors_digest
from encore_fast.kernels import covariance_update_, mirror_upper_
from encore_fast.models.arch import ModelView
from encore_fast.models.hooks import capture_mlp_inputs, run_until
from encore_fast.models.loading import pad_id
from encore_fast.models.placement import input_device
from encore_fast.paths import cache_dir
from encore_fast.requests import encode


class StatsCacheError(EncoreFastError, RuntimeError):
    """A statistics cache file that is damaged or does not belong to this model, layer or
    corpus; the message names the file."""


# ----------------------------------------------------------------------------- corpora

def load_corpus(corpus: Any, n_samples: int) -> tuple[list[str], str]:
    """The first ``n_samples`` texts of ``corpus`` and a short id for cache keys.

    ``corpus``: an iterable of strings; a ``.txt`` file (one text per non-empty line, WikiText
    headings skipped); a ``.json``/``.jsonl`` file of records with a ``text`` field; or, when
    online, a Hugging Face dataset name (``"name"`` or ``"name:config"``, needs ``datasets``).
    """
    if isinstance(corpus, (str, os.PathLike)) and Path(corpus).exists():
        path = Path(corpus)
        texts = list(itertools.islice(_texts_from_file(path), n_samples))
        label = path.stem
    elif isinstance(corpus, str):
        texts = list(itertools.islice(_texts_from_hub(corpus), n_samples))
        label = corpus.replace("/", "_").replace(":", "_")
    else:
        texts = [str(t) for t in itertools.islice(iter(corpus), n_samples)]
        label = "texts"
    if not texts:
        raise ValueError(f"corpus {corpus!r} has no usable text")
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]
    return texts, f"{label}-{digest}"


def _texts_from_file(path: Path) -> Iterator[str]:
    if path.suffix in (".json", ".jsonl"):
        with path.open() as f:
            if path.suffix == ".json":
                records = json.load(f)
            else:
                records = (json.loads(line) for line in f if line.strip())
            for rec in records:
                text = rec["text"] if isinstance(rec, dict) else str(rec)
                if text.strip():
                    yield text.strip()
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not (line.startswith("=") and line.endswith("=")):
                yield line


def _texts_from_hub(name: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"corpus {name!r} is neither a file nor an iterable, and the 'datasets' package "
            "needed to download it is not installed"
        ) from None
    ds_name, _, config = name.partition(":")
    ds = datasets.load_dataset(ds_name, config or None, split="train", streaming=True)
    for rec in ds:
        text = rec.get("text", "")
        if text and text.strip():
            yield text.strip()


# ----------------------------------------------------------------------------- computation

CHECKPOINT_EVERY = 50  # batches of texts between checkpoints of an interrupted pass


@torch.no_grad()
def accumulate_second_moments(
    view: ModelView,
    tokenizer: Any,
    layers: list[int],
    texts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    state: dict[str, Any] | None = None,
    checkpoint: Any = None,
    checkpoint_every: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Sum ``k kᵀ`` over all non-padding tokens of ``texts`` for every layer in one pass.

    Returns a state dict ``{"sums": {layer: fp32 [d,d] (upper triangle valid)}, "tokens": int,
    "texts_done": int}``. ``state`` continues an earlier partial run; ``checkpoint(state)`` is
    called every ``checkpoint_every`` batches (default :data:`CHECKPOINT_EVERY`) so an
    interrupted run can resume.
    """
    every = checkpoint_every or CHECKPOINT_EVERY

    device = view.device
    if state is None:
        state = {
            "sums": {l: torch.zeros(view.d_in(l), view.d_in(l), device=device) for l in layers},
            "tokens": 0,
            "texts_done": 0,
        }
    state["sums"] = {l: s.to(device) for l, s in state["sums"].items()}
    start = state["texts_done"]
    n_batches = (len(texts) - start + batch_size - 1) // batch_size
    bar = tqdm(total=len(texts), initial=start, desc="C0 statistics", unit="text",
               disable=not progress)
    with capture_mlp_inputs(view, layers, stop_after=max(layers)) as keys:
        for b in range(n_batches):
            chunk = texts[start + b * batch_size : start + (b + 1) * batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            run_until(view.model, input_ids=enc["input_ids"],
                      attention_mask=enc["attention_mask"])
            mask = enc["attention_mask"]
            for layer in layers:
                covariance_update_(state["sums"][layer], keys[layer], mask=mask, mirror=False)
            state["tokens"] += int(mask.sum())
            state["texts_done"] += len(chunk)
            bar.update(len(chunk))
            if checkpoint is not None and (b + 1) % every == 0:
                checkpoint(state)
    bar.close()
    return state


def finalize(state: dict[str, Any]) -> dict[int, torch.Tensor]:
    """``C0 = sum / tokens`` per layer, mirrored to a full symmetric matrix."""
    out = {}
    for layer, s in state["sums"].items():
        c = mirror_upper_(s.clone()) / max(1, state["tokens"])
        out[layer] = c
    return out


def accumulate_in_group(
    view: ModelView,
    tokenizer: Any,
    layers: list[int],
    texts: list[str],
    group: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`accumulate_second_moments` over every rank's share of ``texts`` (rank ``r`` takes
    texts ``r, r + world, ...``), summed over the ranks: every rank gets the state of all
    ``texts``. ``group``: a :class:`encore_fast.distributed.Group`, or ``None`` for one process.
    A rank whose share fails makes every rank raise (no rank waits for it)."""
    if group is None:
        return accumulate_second_moments(view, tokenizer, layers, texts, **kwargs)
    state: dict[str, Any] = {}
    error = None
    try:
        state = accumulate_second_moments(view, tokenizer, layers,
                                          texts[group.rank :: group.world], **kwargs)
    except Exception as exc:  # told to the other ranks, then raised here too
        error = exc
    group.agree(error, "the statistics pass")
    for layer in layers:
        group.all_reduce_(state["sums"][layer], f"summing C0 of layer {layer}")
    tokens = torch.tensor([state["tokens"]], dtype=torch.float64, device=view.device)
    state["tokens"] = int(group.all_reduce_(tokens, "summing the token counts").item())
    state["texts_done"] = len(texts)
    return state


# ----------------------------------------------------------------------------- checks

def check_second_moments(c0: Any, layer: int, d_in: int, source: str) -> torch.Tensor:
    """``c0`` if it can be a layer's ``C0``: a finite ``[d_in, d_in]`` tensor, symmetric to
    1e-5 of its largest entry, with a non-negative diagonal; else :class:`StatsError` naming
    ``source`` (who gave it: the caller, or a cache file) and the problem."""
    where = f"{source}: C0 of layer {layer}"
    if not isinstance(c0, torch.Tensor):
        raise StatsError(f"{where} is a {type(c0).__name__}, not a tensor")
    if tuple(c0.shape) != (d_in, d_in):
        raise StatsError(f"{where} has shape {tuple(c0.shape)}; the layer's keys need "
                         f"({d_in}, {d_in})")
    c = c0.detach().double()
    bad = int((~torch.isfinite(c)).sum())
    if bad:
        raise StatsError(f"{where} has {bad} non-finite entries (NaN or inf)")
    scale = float(c.abs().max())
    asym = float((c - c.T).abs().max())
    if asym > 1e-5 * scale:
        raise StatsError(f"{where} is not symmetric (max |C - Cᵀ| = {asym:.3g}, largest entry "
                         f"{scale:.3g})")
    low = float(c.diagonal().min())
    if low < -1e-6 * scale:
        raise StatsError(f"{where} has a negative diagonal entry ({low:.3g}): not a matrix of "
                         "second moments E[k kᵀ]")
    return c0


# ----------------------------------------------------------------------------- cache

def _read_meta(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise StatsCacheError(f"statistics cache {path} is not a readable safetensors file "
                              f"({exc}); delete it to recompute") from None


def second_moments(
    view: ModelView,
    tokenizer: Any,
    layers: list[int],
    corpus: Any,
    *,
    n_samples: int,
    max_length: int,
    fingerprint: str,
    model_name: str = "model",
    cache: str | os.PathLike | None = None,
    batch_size: int = 8,
    progress: bool = True,
    weights_fingerprint: str | None = None,
    group: Any = None,
) -> dict[int, torch.Tensor]:
    """``C0`` for ``layers``, from the cache when present, else computed and cached.

    ``cache=None`` uses ``<cache_dir>/stats``; pass ``cache=False`` to disable caching. Entries
    are keyed by the model's fingerprint and dtype (two models of one name get two entries);
    given ``weights_fingerprint`` (dtype-blind, see ``models.fingerprint``), a 16-bit model
    reuses the fp32 statistics of the same weights, which estimate ``E[k kᵀ]`` more precisely
    than its own 16-bit activations would. A file that is damaged (checksum), of the wrong
    shape, or not finite is refused with its path.

    ``group`` (a :class:`encore_fast.distributed.Group`): the ranks share the texts and sum
    their moments, every rank returns the same ``C0``; rank 0 writes the cache (the others wait
    until it is written), each rank checkpoints its own share, so an interrupted pass resumes
    per rank (with the same number of ranks).
    """
    texts, corpus_id = load_corpus(corpus, n_samples)
    run = dict(max_length=max_length, batch_size=batch_size)
    if cache is False:
        return finalize(accumulate_in_group(view, tokenizer, layers, texts, group,
                                            progress=progress, **run))
    spot = _CacheSpot.of(cache, model_name, view.dtype_name, fingerprint, weights_fingerprint,
                         corpus_id, len(texts), max_length)
    result = _from_cache(view, {layer: spot.layer_file(layer) for layer in layers},
                         fingerprint, weights_fingerprint)
    missing = _missing_layers(layers, result, group)
    if missing:
        partial = spot.partial_file(missing, group)
        state = _accumulate_resumable(view, tokenizer, missing, texts, group, partial,
                                      fingerprint, progress=progress, **run)
        _store(spot, finalize(state), state["tokens"], result, group)
        partial.unlink(missing_ok=True)
        if group is not None:
            group.barrier("writing the statistics cache")
    return {layer: result[layer].to(view.device) for layer in layers}


@dataclass(frozen=True)
class _CacheSpot:
    """Where one model's statistics of one corpus sample are cached, and what their files
    record about it."""

    folder: Path
    dtype: str
    fingerprint: str
    weights_fingerprint: str | None
    model_name: str
    corpus_id: str
    n_used: int
    max_length: int

    @classmethod
    def of(cls, cache: str | os.PathLike | None, model_name: str, dtype: str, fingerprint: str,
           weights_fingerprint: str | None, corpus_id: str, n_used: int,
           max_length: int) -> _CacheSpot:
        """The spot under ``cache`` (None: ``<cache_dir>/stats``): one folder per model name,
        weights family (16-bit models share the fp32 one) and corpus sample."""
        root = Path(cache) if cache is not None else cache_dir() / "stats"
        safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[-60:]
        family = (weights_fingerprint or fingerprint)[:16]
        folder = root / safe_name / family / f"{corpus_id}-n{n_used}-len{max_length}"
        return cls(folder, dtype, fingerprint, weights_fingerprint, model_name, corpus_id,
                   n_used, max_length)

    def layer_file(self, layer: int) -> Path:
        """The finished ``C0`` of ``layer`` for this model and dtype."""
        return self.folder / f"layer{layer}-{self.dtype}-{self.fingerprint[:12]}.safetensors"

    def partial_file(self, layers: list[int], group: Any) -> Path:
        """The checkpoint of an unfinished pass over ``layers`` (one per rank in a group)."""
        rank = "" if group is None else f"-rank{group.rank}of{group.world}"
        return self.folder / (f"partial-{self.dtype}-{self.fingerprint[:12]}-"
                              + "-".join(map(str, layers)) + f"{rank}.safetensors")

    def meta(self, layer: int, tokens: int, c0: torch.Tensor) -> dict[str, str]:
        """The header of ``layer``'s file: what it was computed from, and its checksum."""
        return {"fingerprint": self.fingerprint,
                "weights_fingerprint": self.weights_fingerprint or "", "dtype": self.dtype,
                "layer": str(layer), "corpus": self.corpus_id, "n_samples": str(self.n_used),
                "max_length": str(self.max_length), "tokens": str(tokens),
                "model": self.model_name, "sha256": tensors_digest({"C0": c0})}


def _missing_layers(layers: list[int], found: dict[int, torch.Tensor], group: Any) -> list[int]:
    """The layers not in the cache; in a group, those missing on any rank (the pass that
    computes them is collective, so every rank computes the same layers)."""
    missing = [layer for layer in layers if layer not in found]
    if group is not None:
        missing = sorted(set().union(*group.gather(missing, "checking the statistics cache")))
    return missing


def _accumulate_resumable(view: ModelView, tokenizer: Any, layers: list[int], texts: list[str],
                          group: Any, partial: Path, fingerprint: str, *, progress: bool,
                          **run: Any) -> dict[str, Any]:
    """The summed moments of ``layers``, resumed from the checkpoint ``partial`` when there is
    one, and checkpointed to it as the pass goes."""
    state = _load_partial(partial, layers, fingerprint) if partial.exists() else None

    def checkpoint(st: dict[str, Any]) -> None:
        tensors = {f"sum.{l}": s for l, s in st["sums"].items()}
        atomic_save(partial, tensors, {"fingerprint": fingerprint, "tokens": str(st["tokens"]),
                                       "texts_done": str(st["texts_done"]),
                                       "sha256": tensors_digest(tensors)})

    return accumulate_in_group(view, tokenizer, layers, texts, group, state=state,
                               checkpoint=checkpoint,
                               progress=progress and (group is None or group.is_main), **run)


def _store(spot: _CacheSpot, c0s: dict[int, torch.Tensor], tokens: int,
           result: dict[int, torch.Tensor], group: Any) -> None:
    """Put the computed ``c0s`` (on the CPU) into ``result`` and write them to the cache (only
    rank 0 of a group writes)."""
    for layer, c0 in c0s.items():
        c0 = result[layer] = c0.cpu()
        if group is None or group.is_main:
            atomic_save(spot.layer_file(layer), {"C0": c0}, spot.meta(layer, tokens, c0))


def _from_cache(view: ModelView, files: dict[int, Path], fingerprint: str,
                weights_fingerprint: str | None) -> dict[int, torch.Tensor]:
    """The layers' ``C0`` found in the cache: this model's own entries, or (16-bit model) the
    fp32 entries of the same weights."""
    result: dict[int, torch.Tensor] = {}
    for layer, path in files.items():
        if path.exists():
            result[layer] = _load_checked(path, layer, view.d_in(layer), fingerprint=fingerprint)
        elif weights_fingerprint is not None and view.dtype_name in ("bfloat16", "float16"):
            for other in sorted(path.parent.glob(f"layer{layer}-float32-*.safetensors")):
                result[layer] = _load_checked(other, layer, view.d_in(layer),
                                              weights_fingerprint=weights_fingerprint)
                break
    return result


def _load_checked(path: Path, layer: int, d_in: int, *, fingerprint: str | None = None,
                  weights_fingerprint: str | None = None) -> torch.Tensor:
    meta = _read_meta(path)
    key, want = (("fingerprint", fingerprint) if fingerprint is not None
                 else ("weights_fingerprint", weights_fingerprint))
    if meta.get(key) != want:
        raise StatsCacheError(
            f"statistics cache {path} was computed for another model ({key} "
            f"{(meta.get(key) or '?')[:12]}, this model is {str(want)[:12]}); "
            "delete it or choose another cache directory"
        )
    tensors = _load_file_checked(path, meta)
    c0 = tensors.get("C0")
    if meta.get("layer") != str(layer) or c0 is None or tuple(c0.shape) != (d_in, d_in):
        raise StatsCacheError(
            f"statistics cache {path} holds layer {meta.get('layer')} with shape "
            f"{None if c0 is None else tuple(c0.shape)}, expected layer {layer} with shape "
            f"({d_in}, {d_in})"
        )
    try:
        return check_second_moments(c0, layer, d_in, f"statistics cache {path}")
    except StatsError as exc:
        raise StatsCacheError(f"{exc}; delete the file to recompute") from None


def _load_file_checked(path: Path, meta: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a cache file, refused if they do not match the stored checksum."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise StatsCacheError(f"statistics cache {path} is not a readable safetensors file "
                              f"({exc}); delete it to recompute") from None
    digest = meta.get("sha256")
    if digest is not None and tensors_digest(tensors) != digest:
        raise StatsCacheError(f"statistics cache {path} is damaged (its data do not match the "
                              "checksum in its header); delete it to recompute")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise StatsCacheError(f"statistics cache {path}: tensor {name!r} has non-finite "
                                  "entries; delete the file to recompute")
    return tensors


def _load_partial(path: Path, layers: list[int], fingerprint: str) -> dict[str, Any] | None:
    meta = _read_meta(path)
    if meta.get("fingerprint") != fingerprint:
        raise StatsCacheError(f"partial statistics {path} belong to another model; delete it")
    tensors = _load_file_checked(path, meta)
    missing = [l for l in layers if f"sum.{l}" not in tensors]
    if missing:
        raise StatsCacheError(f"partial statistics {path} lack layers {missing}; delete it")
    return {
        "sums": {l: tensors[f"sum.{l}"] for l in layers},
        "tokens": int(meta["tokens"]),
        "texts_done": int(meta["texts_done"]),
    }


@torch.no_grad()
def sample_corpus(model: torch.nn.Module, tokenizer: Any, n: int = 64, length: int = 64,
                  seed: int = 0) -> list[str]:
    """Texts sampled from the model itself: the fallback corpus for ``C0`` when no text is
    available offline (a warning says so; real text is better)."""
    warnings.warn("no corpus given and no WikiText-2 found: estimating C0 from text sampled "
                  "from the model; for real text run 'encore-fast data fetch wikitext-2-valid' "
                  "(used from then on) or pass corpus=...", stacklevel=3)
    torch.manual_seed(seed)
    device = input_device(model)
    starts = ["The", "In", "A", "It", "He", "She", "This", "When"]
    prompts = [starts[i % len(starts)] for i in range(n)]
    ids = [encode(tokenizer, p) for p in prompts]
    x = torch.tensor(ids, device=device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, top_k=50,
                         max_new_tokens=length, pad_token_id=pad_id(tokenizer))
    return tokenizer.batch_decode(out, skip_special_tokens=True)
