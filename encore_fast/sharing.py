"""A batch edited data-parallel over the ranks of a process group (``Editor(process_group=)``),
and what that is without one.

Each rank optimises the values of its share of the batch's requests and all of them are
gathered on every rank; then rank 0 solves and applies the update and broadcasts its factors,
which the other ranks apply as they are, so that every rank's weights stay bit-identical. A
failure on any rank is told to the others, so that none waits forever and none changes a thing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from encore_fast.distributed import Group
from encore_fast.edits_file import Batch
from encore_fast.errors import EditError
from encore_fast.io import atomic_save
from encore_fast.requests import EditRequest
from encore_fast.values.objective import ValueResult

# A batch's update: the batch (requests, factors), its keys in float64 on each layer's state
# device, and per layer ‖W‖ after it and ‖Δ‖.
Update = tuple[Batch, dict[int, torch.Tensor], dict[int, float], dict[int, float]]


def shared_values(group: Group | None, reqs: list[EditRequest],
                  optimize: Callable[[list[EditRequest]], list[ValueResult]], bar: Any,
                  what: str, device: torch.device) -> list[ValueResult]:
    """The values of all ``reqs`` (``optimize``): in one process (no group), or each rank its
    share, then gathered (every rank gets all of them, in request order, on ``device``)."""
    if group is None:
        return optimize(reqs)
    mine: list[ValueResult] = []
    error = None
    try:
        share = reqs[group.share(len(reqs))]
        mine = optimize(share) if share else []
    except Exception as exc:  # told to the other ranks, then raised here too
        error = exc
    group.agree(error, what)
    parts = group.gather([replace(v, z=v.z.cpu(), h0=v.h0.cpu()) for v in mine], what)
    if bar is not None:
        bar.update(len(reqs) - len(mine))
    return [replace(v, z=v.z.to(device), h0=v.h0.to(device)) for part in parts for v in part]


def update_from_main(group: Group | None, reqs: list[EditRequest], solve: Callable[[], Update],
                     apply_factors: Callable[[Batch], dict[int, torch.Tensor]],
                     what: str) -> Update:
    """The batch's update: solved and applied here (no group), or by rank 0 (``solve``), which
    sends its factors, and the other ranks apply those very factors (``apply_factors``, which
    returns the keys)."""
    if group is None:
        return solve()
    if group.is_main:
        try:
            batch, keys64, w_norms, d_norms = solve()
        except Exception as exc:
            group.broadcast(("error", f"{type(exc).__name__}: {exc}"), what)
            raise
        group.broadcast(("ok", (batch.factors, batch.masks, w_norms, d_norms)), what)
        return batch, keys64, w_norms, d_norms
    status, payload = group.broadcast(None, what)
    if status == "error":
        raise EditError(f"rank {group.rank}: {what} failed on rank 0 (nothing was changed "
                        f"on any rank): {payload}")
    factors, masks, w_norms, d_norms = payload
    batch = Batch(requests=list(reqs), factors=factors, masks=masks)
    return batch, apply_factors(batch), w_norms, d_norms


def write_edits(group: Group | None, path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                meta: dict[str, str]) -> Path:
    """Write an edits file atomically: this process, or under a process group rank 0 (the
    others wait for it, and raise if it fails)."""
    if group is None:
        return atomic_save(path, tensors, meta)
    error = None
    try:
        if group.is_main:
            atomic_save(path, tensors, meta)
    except Exception as exc:
        error = exc
    group.agree(error, f"saving the edits to {path}")
    return Path(path)
