"""Each edited layer's sequential state to start from: ``C0`` (given by the caller, or computed
once from a corpus on the original model), on the device where the layer's state lives, with
``S`` not yet started (:class:`LayerState`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from encore_fast.config import EditConfig
from encore_fast.distributed import Group
from encore_fast.errors import ConfigError
from encore_fast.methods import LayerState
from encore_fast.models.arch import ModelView
from encore_fast.models.fingerprint import weights_fingerprint
from encore_fast.models.hooks import editing_mode
from encore_fast.paths import default_corpus
from encore_fast.stats import check_second_moments, sample_corpus, second_moments


def checked_stats(stats: Any, layers: list[int],
                  d_in: Callable[[int], int]) -> dict[int, torch.Tensor]:
    """User-given ``C0``: every edited layer present, each one finite, symmetric, of the
    layer's shape (``d_in(layer)`` square); checked before anything uses it."""
    if not isinstance(stats, Mapping):
        raise ConfigError(f"stats must be a mapping layer -> C0, got {type(stats).__name__}")
    missing = [l for l in layers if l not in stats]
    if missing and stats:
        raise ConfigError(f"stats given for layers {sorted(stats)}, missing {missing}")
    return {l: check_second_moments(c, l, d_in(l), "stats= given to the Editor")
            for l, c in stats.items() if l in layers}


def checked_sites(view: ModelView, sites: list[Any]) -> list[Any]:
    """The sites a method edits (``models.arch.Site``), each one this model has, none twice."""
    if not sites or len(set(map(str, sites))) != len(sites):
        raise ConfigError(f"the edited sites must be distinct and not empty, got {sites!r}")
    for site in sites:
        try:
            view.linear(site)
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot edit {site!r} of this model: {exc}") from None
    return list(sites)


def checked_state_device(chosen: Any) -> Any:
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


def state_device(chosen: Any, layer: int, view: ModelView) -> torch.device:
    """Where ``layer``'s ``C0``, ``S`` and solver state live: as ``chosen`` (a device, or
    ``{layer: device}``: the editor's ``state_device``) says, else where the layer computes."""
    if isinstance(chosen, Mapping):
        chosen = chosen.get(layer)
    return torch.device(chosen) if chosen is not None else view.layer_device(layer)


def initial_states(c0: Mapping[int, torch.Tensor], layers: list[int], chosen: Any,
                   view: ModelView) -> dict[int, LayerState]:
    """Every layer's state before its first batch: its ``C0`` in float64 on its state device
    (see :func:`state_device`)."""
    missing = [l for l in layers if l not in c0]
    if missing:
        raise ConfigError(f"stats given for layers {sorted(c0)}, missing {missing}")
    return {l: LayerState(c0=c0[l].to(state_device(chosen, l, view), torch.float64))
            for l in layers}


def corpus_c0(view: ModelView, tokenizer: Any, cfg: EditConfig, corpus: Any, *,
              fingerprint: str, model_name: str, cache: Any, progress: bool,
              group: Group | None) -> dict[int, torch.Tensor]:
    """``C0`` of the edited layers from ``corpus`` (default WikiText-2 from the data folder,
    else text sampled from the model), read from or written to ``cache`` (True: default)."""
    corpus = corpus if corpus is not None else default_corpus()
    if corpus is None:
        corpus = sample_corpus(view.model, tokenizer)
    weights = weights_fingerprint(view.model)
    with editing_mode(view.model):
        c0 = second_moments(
            view, tokenizer, cfg.layers, corpus,
            n_samples=cfg.stats_samples, max_length=cfg.stats_max_length,
            fingerprint=fingerprint, model_name=model_name,
            cache=None if cache is True else cache, progress=progress,
            weights_fingerprint=weights, group=group,
        )
    for layer, c in c0.items():
        check_second_moments(c, layer, view.d_in(layer), "C0 computed from the corpus")
    return c0
