"""Weight snapshots of a run: the edited layers' weights at an evaluation point.

A snapshot is a partial ``state_dict`` (parameter names as the model names them, the weights as
the model holds them, e.g. bf16 rounded from the fp32 masters) with the model's fingerprint and
the run position in its metadata. Loaded into a fresh copy of the original model it gives the
edited model of that point, so evaluations can run later, again, or in another process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from encore_fast.errors import EditsFileError
from encore_fast.io import atomic_save, tensors_digest
from encore_fast.models.fingerprint import model_fingerprint

SNAPSHOT_FORMAT = "encore_fast.snapshot/1"
_NAME = re.compile(r"^weights-(\d{5,})\.safetensors$")


def save_snapshot(editor: Any, path: str | os.PathLike[str], info: Mapping[str, Any]) -> Path:
    """Write ``editor``'s edited weights (as its model holds them: every edited site's, e.g.
    UltraEdit's gate and up projections) and ``info`` atomically."""
    sites = getattr(editor, "sites", None) or editor.hparams.layers
    wanted = {id(editor.view.weight(s)) for s in sites}
    tensors = {name: p.detach() for name, p in editor.model.named_parameters()
               if id(p) in wanted}
    meta = {"format": SNAPSHOT_FORMAT, "model_fingerprint": editor.fingerprint,
            "info": json.dumps(dict(info), default=float),
            "sha256": tensors_digest(tensors)}
    return atomic_save(path, tensors, meta)


def read_snapshot(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor],
                                                         dict[str, Any], str]:
    """Tensors, info and fingerprint of a snapshot (checked: format and checksum)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise EditsFileError(f"{path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != SNAPSHOT_FORMAT:
        raise EditsFileError(f"{path} is not an encore_fast weight snapshot")
    if tensors_digest(tensors) != meta.get("sha256"):
        raise EditsFileError(f"{path} is damaged: its data do not match its checksum")
    return tensors, json.loads(meta.get("info") or "{}"), meta.get("model_fingerprint", "")


@torch.no_grad()
def load_snapshot(model: torch.nn.Module, path: str | os.PathLike[str],
                  fingerprint: str | None = None) -> dict[str, Any]:
    """Put a snapshot's weights into ``model`` (a copy of the run's original model: its
    fingerprint must match); returns the snapshot's info."""
    tensors, info, saved = read_snapshot(path)
    fingerprint = fingerprint or model_fingerprint(model)
    if saved != fingerprint:
        raise EditsFileError(f"{path} was made for another model (fingerprint {saved[:12]}, "
                             f"this one {fingerprint[:12]})")
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params or params[name].shape != t.shape:
            raise EditsFileError(f"{path}: {name} does not fit this model")
        params[name].copy_(t)
    return info


def list_snapshots(folder: str | os.PathLike[str]) -> dict[int, Path]:
    """``{batches done: path}`` of the snapshots in a run's snapshot folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))
