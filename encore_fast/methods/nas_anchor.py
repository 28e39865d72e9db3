"""NAS's anchor ``μ``: the mean norm of the values the unedited model's value optimisation asks
for, computed once per model and edited layer and cached by model fingerprint (like ``C0``).

``v* = v0 + δ`` for the first ``anchor_samples`` records of ``anchor_data`` (default
``counterfact-train.json`` records 0–999), each optimised alone on its bare prompt (no context
prefixes) with the editor's value settings and no MPES, as MEMIT does; the norms above their
``1 − anchor_trim`` quantile (default: the top 5%) are dropped and the rest averaged. Roughly
``anchor_samples`` value optimisations: minutes on a small model; the cache makes it once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from encore_fast.data import locate
from encore_fast.errors import ConfigError
from encore_fast.io import atomic_write_text
from encore_fast.methods.checks import number
from encore_fast.methods.transforms import ValueContext
from encore_fast.requests import read_requests_file
from encore_fast.values.keys import SubjectForwards

ANCHOR_SETTINGS: dict[str, Any] = {"anchor": None, "anchor_samples": 1000,
                                   "anchor_data": "counterfact-train", "anchor_trim": 0.05}
_CHUNK = 50  # requests optimised together


def check_anchor_settings(opts: dict[str, Any]) -> None:
    """NAS's own settings: numbers in range, a data set name or file (a ConfigError else)."""
    if opts["anchor"] is not None:  # (None: computed)
        number("nas.anchor", opts["anchor"], open_low=True)
    number("nas.anchor_samples", opts["anchor_samples"], 1, integer=True)
    number("nas.anchor_trim", opts["anchor_trim"], 0, 0.99)
    number("nas.skip_factor", opts["skip_factor"], open_low=True)
    if not isinstance(opts["anchor_data"], str) or not opts["anchor_data"]:
        raise ConfigError(f"nas.anchor_data must be a data set name or a file, got "
                          f"{opts['anchor_data']!r}")


def anchor(ctx: ValueContext, opts: dict[str, Any], memo: dict[str, float]) -> float:
    """``μ`` for the editor's model and last edited layer: the setting, ``memo`` (what this
    transform computed before), the cache, or computed (on the unedited model only: a
    ConfigError once edits were made)."""
    if opts["anchor"] is not None:
        return float(opts["anchor"])
    key = json.dumps([ctx.fingerprint, ctx.layer, _key_fields(ctx, opts)], sort_keys=True)
    if key not in memo:
        memo[key] = _cached_or_computed(ctx, opts)
    return memo[key]


def _cached_or_computed(ctx: ValueContext, opts: dict[str, Any]) -> float:
    path = _cache_path(ctx, opts)
    if path is not None and path.is_file():
        return float(json.loads(path.read_text(encoding="utf-8"))["anchor"])
    if ctx.edited:
        raise ConfigError(
            "NAS needs its anchor from the unedited model, and this one has edits and no "
            f"cached anchor{f' at {path}' if path else ''}: set nas.anchor=<value> (the run "
            "that made the edits computed it) or load the edits into an editor whose cache "
            "holds it")
    norms = value_norms(ctx, opts)
    mu, kept = trimmed_mean(norms, opts["anchor_trim"])
    if path is not None:
        atomic_write_text(path, json.dumps({
            "anchor": mu, "samples": len(norms), "kept": kept, "layer": ctx.layer,
            "fingerprint": ctx.fingerprint, "settings": _key_fields(ctx, opts)}, indent=1))
    return mu


def trimmed_mean(norms: torch.Tensor, trim: float) -> tuple[float, int]:
    """Mean of ``norms`` without those above their ``1 − trim`` quantile; how many it kept."""
    norms = norms.double()
    kept = norms if trim == 0 else norms[norms <= torch.quantile(norms, 1 - trim)]
    return float(kept.mean()), int(kept.numel())


def value_norms(ctx: ValueContext, opts: dict[str, Any]) -> torch.Tensor:
    """‖v0 + δ‖ of the anchor records' value optimisations on the current model."""
    source = Path(opts["anchor_data"])
    if not source.is_file():
        source = locate(opts["anchor_data"], progress=ctx.progress)
    reqs = read_requests_file(source)[: opts["anchor_samples"]]
    cfg = ctx.cfg.replace(mpes_extra_steps=None)
    out = []
    for s in tqdm(range(0, len(reqs), _CHUNK), desc="NAS anchor", unit="chunk",
                  disable=not ctx.progress):
        chunk = reqs[s : s + _CHUNK]
        values = ctx.optimize(chunk, ["{}"], cfg)
        delta = torch.stack([(v.z - v.h0).float() for v in values])
        v0 = SubjectForwards(ctx.view, ctx.tokenizer, chunk, []).mlp_outputs(ctx.layer)
        out.append((v0.to(delta.device) + delta).norm(dim=1).cpu())
    return torch.cat(out)


def _key_fields(ctx: ValueContext, opts: dict[str, Any]) -> dict[str, Any]:
    keys = ("layers", "v_lr", "v_num_grad_steps", "v_weight_decay", "clamp_norm_factor",
            "kl_factor", "loss_cutoff")
    return {**{k: getattr(ctx.cfg, k) for k in keys},
            **{k: opts[k] for k in ("anchor_samples", "anchor_data", "anchor_trim")}}


def _cache_path(ctx: ValueContext, opts: dict[str, Any]) -> Path | None:
    if ctx.cache is None:
        return None
    digest = hashlib.sha256(json.dumps(_key_fields(ctx, opts), sort_keys=True).encode())
    return (ctx.cache / "anchors" /
            f"nas-{ctx.fingerprint[:16]}-layer{ctx.layer}-{digest.hexdigest()[:12]}.json")
